-- POST /api/v1/machines/{slug}/heartbeat: the machine-signed report a
-- daemon sends every interval. It records version, ports, metrics and the
-- provisioning stage the daemon reports.
--
-- Two paths write a heartbeat. One that changes no stage and carries no
-- update outcome (the steady state) joins a group commit in
-- justavps.platform.heartbeat_batch. Any other runs its own transaction
-- that locks the machine row, reads the stage there, and writes the stage
-- change with its machine_events row (and so its NOTIFY). Either way the
-- reply goes out after the data has committed.
local db = require("justavps.db.db")
local json = require("justavps.json")
local log = require("justavps.log")
local api_mod = require("justavps.platform.api")
local stages = require("justavps.provision.stages")
local releases = require("justavps.platform.releases")
local machines = require("justavps.platform.machines")
local heartbeat_batch = require("justavps.platform.heartbeat_batch")

local type = type
local next = next
local pairs = pairs
local ipairs = ipairs
local getmetatable = getmetatable
local setmetatable = setmetatable
local sgsub = string.gsub
local min = math.min

-- Stages a daemon may report, in the order provisioning passes them. A
-- report moves a machine forward only; the platform's own stages
-- (server_creating, server_created, failed, deleting, deleted) come from
-- the provisioning jobs.
local DAEMON_STAGES = {
  cloud_init_running = 1,
  cloud_init_done = 2,
  services_ready = 3,
}

-- Update outcomes a daemon reports, and how many one heartbeat may carry.
local UPDATE_OUTCOMES = { applied = true, rolled_back = true,
  skipped = true, failed = true }
local MAX_UPDATE_EVENTS = 20

-- Maximum length in bytes of the version a heartbeat reports.
local MAX_VERSION = 64

local STAGE_ORDER = {
  server_creating = 0, server_created = 0.5,
  cloud_init_running = 1, cloud_init_done = 2, services_ready = 3,
}


local function number_or_nil(v)
  return type(v) == "number" and v or nil
end


-- Returns true when t is a JSON array: decoded empty arrays carry
-- json.array_mt, others are tables with the keys 1..n only.
local function is_list(t)
  if type(t) ~= "table" then
    return false
  end
  if json.is_array(t) then
    return true
  end
  local n, count = #t, 0
  for _ in pairs(t) do
    count = count + 1
  end
  return n > 0 and count == n
end


-- Largest values of the machine_metrics columns: real, and the largest
-- double below 2^63 for bigint.
local REAL_MAX = 3.4e38
local BIGINT_MAX = 2 ^ 63 - 1024


-- Returns v when it is a number in [lo, hi], else nil. A value that the
-- column's CHECK or type would reject is stored as NULL, so one odd
-- reading never costs the machine its heartbeat.
local function in_range(v, lo, hi)
  if type(v) == "number" and v >= lo and v <= hi then
    return v
  end
  return nil
end


-- Returns a copy of v whose strings PostgreSQL can store. In a string with
-- a NUL byte or with bytes that are not UTF-8 (a process name can be any
-- bytes), those bytes become "?".
local function storable_copy(v)
  if type(v) == "string" then
    if api_mod.storable(v) then
      return v
    end
    return (sgsub(v, "[%z\128-\255]", "?"))
  end
  if type(v) ~= "table" then
    return v
  end
  local out = setmetatable({}, getmetatable(v))
  for k, x in pairs(v) do
    out[storable_copy(k)] = storable_copy(x)
  end
  return out
end


-- Returns the machine_metrics values of a report's metrics, from
-- cpu_percent to net (JSON text), with nil for a missing value. The
-- metrics have the shape of the daemon's /v1/system reply (see
-- justavps.daemon.metrics.system): cpu.usage_percent, memory.total and
-- memory.available in bytes, disk.used_bytes and disk.total_bytes.
local function metrics_row(m)
  m = type(m) == "table" and m or {}
  local cpu = type(m.cpu) == "table" and m.cpu or {}
  local load = type(m.load) == "table" and m.load or {}
  local mem = type(m.memory) == "table" and m.memory or {}
  local disk = type(m.disk) == "table" and m.disk or {}
  local net = type(m.network) == "table" and m.network.interfaces or nil
  local total = in_range(mem.total, 0, BIGINT_MAX)
  local used
  if total and number_or_nil(mem.available) then
    used = in_range(total - mem.available, 0, BIGINT_MAX)
  end
  return {
    in_range(cpu.usage_percent, 0, 100),
    in_range(load["1"] or load.load1 or load[1], 0, REAL_MAX),
    in_range(load["5"] or load.load5 or load[2], 0, REAL_MAX),
    in_range(load["15"] or load.load15 or load[3], 0, REAL_MAX),
    used,
    total,
    in_range(disk.used_bytes, 0, BIGINT_MAX),
    in_range(disk.total_bytes, 0, BIGINT_MAX),
    json.encode(storable_copy(type(net) == "table" and net or {})),
  }
end


-- Returns the stages a report moves a machine in stage `current` through,
-- in order, each { stage, detail }. A daemon that reports services_ready
-- has finished cloud-init too, so that event is recorded on the way.
local function plan_steps(reported, current, cloud_init)
  local order = STAGE_ORDER[current]
  local steps = {}
  if reported == "failed" and order and order < 3 then
    steps[1] = { stage = "failed", detail = { source = "daemon",
      reason = "cloud-init reported errors",
      errors = json.array(type(cloud_init.errors) == "table"
        and cloud_init.errors or {}),
      log_tail = json.array(type(cloud_init.log_tail) == "table"
        and cloud_init.log_tail or {}) } }
  elseif DAEMON_STAGES[reported] and order
      and DAEMON_STAGES[reported] > order then
    if reported == "services_ready" and order < 2 then
      steps[#steps + 1] = { stage = "cloud_init_done",
        detail = { source = "daemon", cloud_init = cloud_init.status } }
    end
    steps[#steps + 1] = { stage = reported, detail = { source = "daemon" } }
  end
  return steps
end


-- Returns the event details of the self-update outcomes (applied,
-- rolled_back, skipped, failed) a report carries, at most
-- MAX_UPDATE_EVENTS.
local function update_outcomes(body)
  local updates = type(body.events) == "table" and body.events or {}
  local out = {}
  for i = 1, min(#updates, MAX_UPDATE_EVENTS) do
    local ev = updates[i]
    if type(ev) == "table" and UPDATE_OUTCOMES[ev.type] then
      out[#out + 1] = { source = "daemon", kind = "update",
        outcome = ev.type, version = type(ev.version) == "string"
          and storable_copy(ev.version:sub(1, MAX_VERSION)) or nil,
        reason = type(ev.reason) == "string"
          and storable_copy(ev.reason:sub(1, 500)) or nil }
    end
  end
  return out
end


-- Writes a heartbeat that changes the stage or carries update outcomes,
-- in one transaction on the locked machine row. Returns the machine's
-- stage after it, or nil, message, code ("not_found" for a machine
-- deleted since its lookup).
local function record_locked(tx, machine, report)
  local locked, lerr, lcode = tx:one(
    "SELECT stage::text AS stage FROM machines "
      .. "WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", { machine.id })
  if not locked then
    return nil, lerr, lcode
  end

  local _, uerr, ucode = tx:query(
    "UPDATE machines SET version = $2, ports = $3::jsonb, "
      .. "last_seen_at = now() WHERE id = $1",
    { machine.id, report.version, report.ports })
  if ucode then
    return nil, uerr, ucode
  end

  local row = report.metrics
  local _, merr, mcode = tx:query(
    "INSERT INTO machine_metrics (machine_id, cpu_percent, load_1, "
      .. "load_5, load_15, mem_used_bytes, mem_total_bytes, "
      .. "disk_used_bytes, disk_total_bytes, net) VALUES ($1, $2, "
      .. "$3, $4, $5, $6, $7, $8, $9, $10::jsonb)",
    { machine.id, row[1], row[2], row[3], row[4], row[5], row[6],
      row[7], row[8], row[9], n = 10 })
  if mcode then
    return nil, merr, mcode
  end

  -- Self-update outcomes join the machine's history at its current
  -- stage.
  for _, detail in ipairs(report.outcomes) do
    local _, eerr, ecode = tx:query(
      "INSERT INTO machine_events (machine_id, stage, detail) "
        .. "SELECT id, stage, $2::jsonb FROM machines WHERE id = $1",
      { machine.id, json.encode(detail) })
    if ecode then
      return nil, eerr, ecode
    end
  end

  -- The steps come from the stage read under the lock, not from the
  -- lookup, which may be cached and older. Every move goes through the
  -- stage table, and a move it forbids (a delete that raced this
  -- heartbeat) is skipped.
  local stage = locked.stage
  for _, step in ipairs(plan_steps(report.stage, stage, report.cloud_init)) do
    local ev, serr, scode = stages.transition(tx, machine, step.stage,
      step.detail)
    if not ev then
      if scode ~= "invalid_transition" then
        return nil, serr, scode
      end
      break
    end
    stage = step.stage
  end
  return stage
end


local function write_failed(machine, err, code)
  if code == "not_found" then
    machines.forget_heartbeat_identity(machine.slug)
    log.warn("heartbeat for a deleted machine", { slug = machine.slug })
    return api_mod.error(401, "unknown_machine",
      "unknown machine or bad signature")
  end
  log.err("heartbeat not recorded", { slug = machine.slug,
    error = err, code = code })
  if code == "database_unavailable" or code == "timeout" then
    return api_mod.error(503, "database_unavailable",
      "the database is unavailable; retry later")
  end
  return api_mod.error(500, "internal", "internal server error")
end


return function(api)
  api:route({
    method = "POST", path = "/api/v1/machines/{slug}/heartbeat",
    name = "heartbeat", auth = "machine", raw_body = true,
    max_body = 256 * 1024,
    summary = "Machine-signed heartbeat from the daemon",
    handler = function(ctx)
      local machine = ctx.machine
      local body, derr = json.decode(ctx.raw_body)
      if type(body) ~= "table" or is_list(body) then
        return api_mod.error(400, "invalid_json", derr
          or "heartbeat body must be a JSON object")
      end

      local version = type(body.version) == "string" and body.version or nil
      if version and (#version > MAX_VERSION
          or not api_mod.storable(version)) then
        return api_mod.error(400, "invalid_request", "version must be "
          .. "UTF-8 text of at most " .. MAX_VERSION .. " bytes without "
          .. "NUL characters")
      end
      if body.ports == json.null then
        body.ports = nil
      end
      if body.ports ~= nil and not is_list(body.ports)
          and not (type(body.ports) == "table" and next(body.ports) == nil)
      then
        return api_mod.error(400, "invalid_request",
          "ports must be an array of the machine's listening ports")
      end
      local ports = body.ports and storable_copy(body.ports) or {}
      local report = {
        version = version,
        ports = json.encode(json.array(ports)),
        metrics = metrics_row(body.metrics),
        stage = body.stage,
        cloud_init = type(body.cloud_init) == "table"
          and storable_copy(body.cloud_init) or {},
        outcomes = update_outcomes(body),
      }

      -- machine.stage may come from the lookup cache. A stale stage
      -- only sends the report to the locked path, which reads the stage
      -- again, because stages never move back to one a daemon reports.
      local ok, err, code
      if #report.outcomes == 0
          and #plan_steps(report.stage, machine.stage, report.cloud_init)
            == 0 then
        ok, err, code = heartbeat_batch.submit({ machine_id = machine.id,
          version = version, ports = report.ports,
          metrics = report.metrics })
      else
        local stage
        stage, err, code = db.tx(record_locked, machine, report)
        if stage then
          machines.note_heartbeat_stage(machine.slug, stage)
          ok = true
        end
      end
      if not ok then
        return write_failed(machine, err, code)
      end

      local offer = releases.offer(machine, version)
      if offer then
        return 200, { update = offer }
      end
      return 200, {}
    end,
  })
end
