-- Group commit of steady-state heartbeats: the ones that change no stage
-- and carry no update outcome. Each waits in a queue, and a writer
-- records a whole batch (the machines' version, ports and last_seen_at,
-- and one machine_metrics row per heartbeat) with one statement, so a
-- batch costs one round trip and one commit. Every heartbeat of the batch
-- gets its result when that statement has committed.
--
--   local ok, err, code = heartbeat_batch.submit({ machine_id = id,
--     version = "1.2.3", ports = "[...]", metrics = { ... } })
--
-- A batch starts when a heartbeat arrives and fewer than
-- heartbeat.batch_writers writes are in flight. It collects heartbeats for
-- heartbeat.batch_delay seconds, or until heartbeat.batch_max_rows, then
-- writes them. Heartbeats that arrive while a write is in flight wait for
-- the next batch, so batches grow with the load.
--
-- Two batches in flight never hold the same machine: a heartbeat of a
-- machine in a batch being written waits for the next one. The batch
-- statement is then the only writer that locks several machine rows, and
-- it cannot deadlock with another batch of this process.
local core = require("justavps.core")
local db = require("justavps.db.db")
local log = require("justavps.log")
local state = require("justavps.platform.state")

local type = type
local error = error
local pairs = pairs
local pcall = pcall
local tonumber = tonumber
local tostring = tostring
local format = string.format
local sgsub = string.gsub
local concat = table.concat
local huge = math.huge
local max = math.max
local min = math.min

local _M = {}

-- Settings used when the platform config sets none (specs that load this
-- module without a platform).
local DEFAULTS = { batch_max_rows = 256, batch_delay = 0.0005,
  batch_writers = 4 }

-- Columns of machine_metrics that a heartbeat fills, in the order of
-- entry.metrics; the first four are real, the next four bigint.
local METRIC_COUNT = 9

-- One statement for the whole batch. $1 to $12 are arrays with one
-- element per heartbeat. record_heartbeats (sql/0005_record_heartbeats.sql)
-- updates each machine that is not deleted from its last heartbeat,
-- inserts one machine_metrics row per heartbeat of those machines, and
-- returns the ids of the machines it updated.
local WRITE_SQL = "SELECT id::text AS id FROM record_heartbeats("
  .. "$1::uuid[], $2::text[], $3::jsonb[], $4::real[], $5::real[], "
  .. "$6::real[], $7::real[], $8::bigint[], $9::bigint[], $10::bigint[], "
  .. "$11::bigint[], $12::jsonb[]) AS id"

-- Codes after which the statement did not reach a verdict on the data,
-- so running its rows one by one would fail the same way.
local NOT_DATA_ERRORS = { database_unavailable = true, timeout = true,
  closed = true, internal = true }

local queue = {}
-- machine_id -> true while a batch with that machine is being written.
local busy = {}
-- Writer coroutines running, collecting or writing.
local writers = 0
-- The waiter of the writer that is collecting its batch, if one is.
local collecting = nil


local function settings()
  local conf = state.conf
  return conf and conf.heartbeat or DEFAULTS
end


-- Returns the batch writes allowed in flight: heartbeat.batch_writers,
-- but at most database.pool_size - 1, so that batch writes never hold
-- the whole pool while lookups and stage changes wait for it.
local function writer_limit(conf)
  local pool_size = state.conf and state.conf.database.pool_size
  if pool_size then
    return max(1, min(conf.batch_writers, pool_size - 1))
  end
  return conf.batch_writers
end


-- Returns the text PostgreSQL reads back as number v, as core.pg sends
-- numbers.
local function number_text(v)
  if v ~= v then
    return "NaN"
  elseif v == huge then
    return "Infinity"
  elseif v == -huge then
    return "-Infinity"
  end
  local text = format("%.15g", v)
  if tonumber(text) ~= v then
    text = format("%.17g", v)
  end
  return text
end


-- Returns an array literal of strings (nil for NULL), each quoted with
-- '"' and '\' escaped.
local function text_array(values, n)
  local parts = {}
  for i = 1, n do
    local v = values[i]
    if v == nil then
      parts[i] = "NULL"
    else
      parts[i] = '"' .. sgsub(v, '[\\"]', "\\%0") .. '"'
    end
  end
  return "{" .. concat(parts, ",") .. "}"
end


-- Returns an array literal of numbers (nil for NULL).
local function number_array(values, n)
  local parts = {}
  for i = 1, n do
    local v = values[i]
    parts[i] = v == nil and "NULL" or number_text(v)
  end
  return "{" .. concat(parts, ",") .. "}"
end


local function write_params(batch)
  local n = #batch
  local ids, versions, ports, nets = {}, {}, {}, {}
  local columns = {}
  for c = 1, METRIC_COUNT - 1 do
    columns[c] = {}
  end
  for i = 1, n do
    local entry = batch[i]
    ids[i] = entry.machine_id
    versions[i] = entry.version
    ports[i] = entry.ports
    local metrics = entry.metrics
    for c = 1, METRIC_COUNT - 1 do
      columns[c][i] = metrics[c]
    end
    nets[i] = metrics[METRIC_COUNT]
  end

  local params = { "{" .. concat(ids, ",") .. "}", text_array(versions, n),
    text_array(ports, n) }
  for c = 1, METRIC_COUNT - 1 do
    params[#params + 1] = number_array(columns[c], n)
  end
  params[#params + 1] = text_array(nets, n)
  return params
end


-- Runs the batch statement once. Returns the set of machine ids it
-- updated, or nil, message, code.
local function run_statement(batch)
  local ok, res, err, code = pcall(db.query, WRITE_SQL, write_params(batch))
  if not ok then
    log.err("heartbeat batch raised", { error = tostring(res),
      rows = #batch })
    return nil, "heartbeat batch failed", "internal"
  end
  if not res then
    return nil, err, code
  end
  local updated = {}
  for i = 1, #res do
    updated[res[i].id] = true
  end
  return updated
end


local function finish(entry, ok, err, code)
  entry.done = true
  entry.ok, entry.err, entry.code = ok, err, code
  entry.waiter:wake(true)
end


local function finish_all(batch, updated, err, code)
  for i = 1, #batch do
    local entry = batch[i]
    if not updated then
      finish(entry, nil, err, code)
    elseif updated[entry.machine_id] then
      finish(entry, true)
    else
      finish(entry, nil, "machine is deleted", "not_found")
    end
  end
end


-- Writes one batch and wakes each of its heartbeats with the result. A
-- deadlock or serialization failure (a batch of another platform process
-- holding the same machines) is retried once. A batch that fails on its
-- data, such as a metric outside a CHECK, is written again one heartbeat
-- at a time, so only the heartbeat at fault fails.
local function write(batch)
  local updated, err, code = run_statement(batch)
  if not updated and db.is_retryable(code) then
    updated, err, code = run_statement(batch)
  end
  if updated or #batch == 1 or NOT_DATA_ERRORS[code] then
    if not updated then
      log.err("heartbeat batch not recorded", { rows = #batch,
        error = err, code = code })
    end
    finish_all(batch, updated, err, code)
    return
  end

  log.warn("heartbeat batch failed; writing its rows one by one",
    { rows = #batch, error = err, code = code })
  for i = 1, #batch do
    local single = { batch[i] }
    local one_updated, one_err, one_code = run_statement(single)
    if not one_updated then
      log.err("heartbeat not recorded", { machine_id = batch[i].machine_id,
        error = one_err, code = one_code })
    end
    finish_all(single, one_updated, one_err, one_code)
  end
end


-- Takes up to max_rows queued heartbeats whose machines are in no batch
-- being written, and marks those machines busy.
local function take_batch(max_rows)
  local batch, rest = {}, {}
  local batch_machines = {}
  for i = 1, #queue do
    local entry = queue[i]
    local id = entry.machine_id
    if #batch < max_rows and (batch_machines[id] or not busy[id]) then
      batch[#batch + 1] = entry
      batch_machines[id] = true
    else
      rest[#rest + 1] = entry
    end
  end
  queue = rest
  for id in pairs(batch_machines) do
    busy[id] = true
  end
  return batch, batch_machines
end


local function run_writer()
  local conf = settings()
  if conf.batch_delay > 0 and #queue < conf.batch_max_rows then
    collecting = core.waiter()
    collecting:wait(conf.batch_delay)
    collecting = nil
  end

  while #queue > 0 do
    local batch, batch_machines = take_batch(conf.batch_max_rows)
    if #batch == 0 then
      -- Every queued machine is in a batch in flight, and that batch's
      -- writer takes them when it finishes.
      break
    end
    local ok, err = pcall(write, batch)
    if not ok then
      log.err("heartbeat batch writer raised", { error = tostring(err) })
      for i = 1, #batch do
        if not batch[i].done then
          finish(batch[i], nil, "heartbeat batch failed", "internal")
        end
      end
    end
    for id in pairs(batch_machines) do
      busy[id] = nil
    end
  end
  writers = writers - 1
end


-- Queues a steady-state heartbeat and waits until its batch is written.
-- entry: machine_id, version (string or nil), ports (JSON array text),
-- metrics (the machine_metrics values from cpu_percent to net, nil for
-- NULL, net as JSON text). Returns true once the heartbeat is committed;
-- nil, message, "not_found" when the machine was deleted; or nil,
-- message, code: database_unavailable, timeout, internal or an
-- SQLSTATE.
function _M.submit(entry)
  if type(entry.machine_id) ~= "string" then
    error("heartbeat_batch.submit: entry.machine_id must be a string", 2)
  end
  local conf = settings()
  entry.waiter = core.waiter()
  queue[#queue + 1] = entry

  if collecting and #queue >= conf.batch_max_rows then
    collecting:wake(true)
  end
  if writers < writer_limit(conf) and not collecting then
    writers = writers + 1
    core.spawn(run_writer)
  end

  if not entry.done then
    entry.waiter:wait()
  end
  return entry.ok, entry.err, entry.code
end


return _M
