-- The provisioning stages of a machine and the transitions allowed between
-- them. transition() is the one writer of machines.stage for the
-- provisioning jobs: it checks the move against TRANSITIONS, updates the
-- machine and inserts its machine_events row in the caller's transaction,
-- so the stage and its history never disagree.
--
--   db.tx(function(tx)
--     return stages.transition(tx, machine, "server_created",
--       { provider_server_id = id })
--   end)
local json = require("justavps.json")
local log = require("justavps.log")

local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local tostring = tostring

local _M = {}

-- Every stage, in the order provisioning passes them. The schema's
-- machine_stage domain lists the same values.
_M.STAGES = {
  "server_creating", "server_created", "cloud_init_running",
  "cloud_init_done", "services_ready", "failed", "deleting", "deleted",
}

-- TRANSITIONS[from][to] is true when a machine in stage `from` may move
-- to `to`. The stages a daemon reports (cloud_init_running,
-- cloud_init_done, services_ready) move forward only but may skip stages,
-- and may arrive before server_created: a fast boot can send its first
-- heartbeat before the provider call that created the server returns.
-- failed and deleting can follow any live stage, deleted only deleting,
-- and nothing follows deleted.
_M.TRANSITIONS = {
  server_creating = {
    server_created = true, cloud_init_running = true,
    cloud_init_done = true, services_ready = true,
    failed = true, deleting = true,
  },
  server_created = {
    cloud_init_running = true, cloud_init_done = true,
    services_ready = true, failed = true, deleting = true,
  },
  cloud_init_running = {
    cloud_init_done = true, services_ready = true,
    failed = true, deleting = true,
  },
  cloud_init_done = {
    services_ready = true, failed = true, deleting = true,
  },
  services_ready = {
    failed = true, deleting = true,
  },
  failed = {
    deleting = true,
  },
  deleting = {
    deleted = true, failed = true,
  },
  deleted = {},
}

local KNOWN = {}
for _, stage in ipairs(_M.STAGES) do
  KNOWN[stage] = true
end


-- Returns true when stage is one of STAGES.
function _M.is_stage(stage)
  return KNOWN[stage] == true
end


-- Returns true when a machine in stage from may move to stage to.
function _M.allowed(from, to)
  local targets = _M.TRANSITIONS[from]
  return targets ~= nil and targets[to] == true
end


-- Returns the sorted list of stages that may follow stage from.
function _M.next_stages(from)
  local out = {}
  for _, stage in ipairs(_M.STAGES) do
    if _M.allowed(from, stage) then
      out[#out + 1] = stage
    end
  end
  return out
end


-- Moves machine (a table with id, and slug for the log) to stage `to`
-- inside the transaction tx (a justavps.db.db transaction). The current
-- stage is read from the row under FOR UPDATE, not taken from machine, so
-- two jobs cannot both move the same machine from the same stage. detail
-- (a table, default {}) goes into the event row. Moving to deleted also
-- sets machines.deleted_at.
--
-- Returns the event { id, machine_id, stage, from, detail, created_at },
-- or nil, message, code: "invalid_transition" (logged, nothing written),
-- "not_found" for an unknown machine, or a database code. Return the
-- failure from the db.tx function so that the transaction rolls back.
function _M.transition(tx, machine, to, detail)
  if type(machine) ~= "table" or type(machine.id) ~= "string" then
    error("stages.transition: machine must be a table with an id", 2)
  end
  if not KNOWN[to] then
    error("stages.transition: unknown stage " .. tostring(to), 2)
  end
  if detail ~= nil and type(detail) ~= "table" then
    error("stages.transition: detail must be a table or nil", 2)
  end

  local row, err, code = tx:one(
    "SELECT stage::text AS stage FROM machines WHERE id = $1 FOR UPDATE",
    { machine.id })
  if not row then
    return nil, err, code
  end

  local from = row.stage
  if not _M.allowed(from, to) then
    log.warn("stage transition rejected", { slug = machine.slug,
      machine_id = machine.id, from = from, to = to })
    return nil, "a machine in stage " .. from .. " cannot move to " .. to,
      "invalid_transition"
  end

  local _, uerr, ucode = tx:query(
    "UPDATE machines SET stage = $2::text, deleted_at = CASE WHEN "
      .. "$2::text = 'deleted' THEN now() ELSE deleted_at END WHERE id = $1",
    { machine.id, to })
  if ucode then
    return nil, uerr, ucode
  end

  local event, eerr, ecode = tx:one(
    "INSERT INTO machine_events (machine_id, stage, detail) "
      .. "VALUES ($1, $2, $3::jsonb) RETURNING id, to_char(created_at AT "
      .. "TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "
      .. "AS created_at",
    { machine.id, to, json.encode(detail or {}) })
  if not event then
    return nil, eerr, ecode
  end

  local out = {}
  for k, v in pairs(event) do
    out[k] = v
  end
  out.machine_id = machine.id
  out.stage = to
  out.from = from
  out.detail = detail or {}
  return out
end


return _M
