-- The provisioning job queue in the jobs table (sql/0003_jobs.sql).
--
-- A worker claims one due job with FOR UPDATE SKIP LOCKED, so two workers
-- in any number of platform processes never claim the same job. A claim
-- is a lease: locked_by names the worker and locked_until ends the lease.
-- The worker renews the lease while the job runs. A running job whose
-- lease ran out belongs to a worker that died, and reclaim_expired puts
-- it back in the queue, so a killed platform loses no job.
--
-- Every function runs queries through justavps.db.db, so it must run in a
-- core coroutine, and returns nil, message, code on a database failure.
local db = require("justavps.db.db")
local json = require("justavps.json")

local type = type
local error = error
local ipairs = ipairs
local tostring = tostring
local smatch = string.match
local concat = table.concat
local min = math.min

local _M = {}

local KIND_PATTERN = "^[a-z][a-z0-9_]*$"

local JOB_COLUMNS = "id, kind, machine_id, payload::text AS payload, "
  .. "state, attempts, locked_by, last_error"


local function decode_payload(job)
  local payload = json.decode(job.payload or "{}")
  job.payload = type(payload) == "table" and payload or {}
  return job
end


-- Returns the PostgreSQL array literal of kinds. Each kind matches the
-- jobs.kind CHECK pattern, so no element needs quoting.
local function kinds_literal(kinds)
  if type(kinds) ~= "table" or #kinds == 0 then
    error("jobs: kinds must be a non-empty list of job kinds", 3)
  end
  for _, kind in ipairs(kinds) do
    if type(kind) ~= "string" or not smatch(kind, KIND_PATTERN) then
      error("jobs: invalid job kind " .. tostring(kind), 3)
    end
  end
  return "{" .. concat(kinds, ",") .. "}"
end


-- Returns the retry delay in seconds after attempt number attempts (1 for
-- the first): base doubled per attempt, at most max.
function _M.backoff(attempts, base, max)
  return min(max, base * 2 ^ (attempts - 1))
end


-- Queues a job of kind for machine_id (a UUID or nil) with payload (a
-- table). A job of the same kind for the same machine that already
-- exists is kept as it is. Returns the job id, or nil when the job
-- existed.
function _M.enqueue(kind, machine_id, payload)
  kinds_literal({ kind })
  local rows, err, code = db.rows(
    "INSERT INTO jobs (kind, machine_id, payload) "
      .. "VALUES ($1, $2, $3::jsonb) "
      .. "ON CONFLICT (machine_id, kind) DO NOTHING RETURNING id",
    { kind, machine_id, json.encode(payload or {}), n = 3 })
  if not rows then
    return nil, err, code
  end
  return rows[1] and rows[1].id or nil
end


-- Claims the due queued job of one of kinds (a list) with the earliest
-- run_at for worker_id, with a lease of lease seconds, and counts the
-- attempt. Returns the job { id, kind, machine_id, payload (a table),
-- attempts, ... }, or false when no job is due.
function _M.claim(worker_id, lease, kinds)
  local rows, err, code = db.rows(
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, "
      .. "locked_by = $1, locked_until = now() + $2::float8 "
      .. "* interval '1 second' "
      .. "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' "
      .. "AND run_at <= now() AND kind = ANY($3::text[]) "
      .. "ORDER BY run_at FOR UPDATE SKIP LOCKED LIMIT 1) "
      .. "RETURNING " .. JOB_COLUMNS,
    { worker_id, lease, kinds_literal(kinds) })
  if not rows then
    return nil, err, code
  end
  if not rows[1] then
    return false
  end
  return decode_payload(rows[1])
end


-- Extends the lease of job (claimed by worker_id) to lease seconds from
-- now. Returns true, or false when the worker no longer holds the job
-- because its lease ran out and another worker reclaimed it.
function _M.renew(job, worker_id, lease)
  local res, err, code = db.query(
    "UPDATE jobs SET locked_until = now() + $3::float8 * interval '1 second' "
      .. "WHERE id = $1 AND locked_by = $2 AND state = 'running'",
    { job.id, worker_id, lease })
  if not res then
    return nil, err, code
  end
  return res.affected == 1
end


-- Marks job done and releases its lease. Returns true, or false when
-- worker_id no longer held the job.
function _M.complete(job, worker_id)
  local res, err, code = db.query(
    "UPDATE jobs SET state = 'done', locked_by = NULL, "
      .. "locked_until = NULL, last_error = NULL "
      .. "WHERE id = $1 AND locked_by = $2 AND state = 'running'",
    { job.id, worker_id })
  if not res then
    return nil, err, code
  end
  return res.affected == 1
end


-- Records a failed attempt of job with the message. opts: retry (false
-- makes the job dead at once), max_attempts, backoff_base and
-- backoff_max (seconds). A job with attempts left goes back to queued
-- with run_at moved by the backoff, else it becomes dead. Returns the new
-- state ("queued" or "dead"), or false when worker_id no longer held the
-- job.
function _M.fail(job, worker_id, message, opts)
  local dead = opts.retry == false or job.attempts >= opts.max_attempts
  local delay = _M.backoff(job.attempts, opts.backoff_base, opts.backoff_max)
  local rows, err, code = db.rows(
    "UPDATE jobs SET state = $3, last_error = $4, locked_by = NULL, "
      .. "locked_until = NULL, "
      .. "run_at = now() + $5::float8 * interval '1 second' "
      .. "WHERE id = $1 AND locked_by = $2 AND state = 'running' "
      .. "RETURNING state",
    { job.id, worker_id, dead and "dead" or "queued", tostring(message),
      delay })
  if not rows then
    return nil, err, code
  end
  if not rows[1] then
    return false
  end
  return rows[1].state
end


-- Puts running jobs whose lease has run out back in the queue, due now,
-- or makes them dead when they have had max_attempts attempts. Returns
-- the list of { id, kind, machine_id, state, previous_worker }.
function _M.reclaim_expired(max_attempts)
  return db.rows(
    "UPDATE jobs j SET state = CASE WHEN j.attempts >= $1 THEN 'dead' "
      .. "ELSE 'queued' END, run_at = now(), "
      .. "last_error = 'lease of worker ' || COALESCE(j.locked_by, '?') "
      .. "|| ' expired', locked_by = NULL, locked_until = NULL "
      .. "FROM (SELECT id, locked_by FROM jobs WHERE state = 'running' "
      .. "AND locked_until < now() FOR UPDATE SKIP LOCKED) old "
      .. "WHERE j.id = old.id "
      .. "RETURNING j.id, j.kind, j.machine_id, j.state, "
      .. "old.locked_by AS previous_worker",
    { max_attempts })
end


-- Returns the job with this id, for specs and operators.
function _M.get(id)
  local row, err, code = db.one("SELECT " .. JOB_COLUMNS
    .. " FROM jobs WHERE id = $1", { id })
  if not row then
    return nil, err, code
  end
  return decode_payload(row)
end


return _M
