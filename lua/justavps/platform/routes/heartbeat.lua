-- POST /api/v1/machines/{slug}/heartbeat: the machine-signed report a
-- daemon sends every interval. It records version, ports, metrics and the
-- provisioning stage the daemon reports.
local db = require("justavps.db.db")
local json = require("justavps.json")
local log = require("justavps.log")
local api_mod = require("justavps.platform.api")
local stages = require("justavps.provision.stages")
local releases = require("justavps.platform.releases")

local type = type
local ipairs = ipairs

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

local STAGE_ORDER = {
  server_creating = 0, server_created = 0.5,
  cloud_init_running = 1, cloud_init_done = 2, services_ready = 3,
}


local function number_or_nil(v)
  return type(v) == "number" and v or nil
end


local function metrics_row(m)
  m = type(m) == "table" and m or {}
  local cpu = type(m.cpu) == "table" and m.cpu or {}
  local load = type(m.load) == "table" and m.load or {}
  local mem = type(m.memory) == "table" and m.memory or {}
  local disk = type(m.disk) == "table" and m.disk or {}
  local net = type(m.network) == "table" and m.network.interfaces or nil
  local used
  if number_or_nil(mem.total_bytes) and number_or_nil(mem.available_bytes) then
    used = mem.total_bytes - mem.available_bytes
  end
  return {
    number_or_nil(cpu.percent),
    number_or_nil(load["1"] or load.load1 or load[1]),
    number_or_nil(load["5"] or load.load5 or load[2]),
    number_or_nil(load["15"] or load.load15 or load[3]),
    used,
    number_or_nil(mem.total_bytes),
    number_or_nil(disk.used_bytes),
    number_or_nil(disk.total_bytes),
    json.encode(type(net) == "table" and net or {}),
  }
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
      if type(body) ~= "table" then
        return api_mod.error(400, "invalid_json", derr
          or "heartbeat body must be a JSON object")
      end

      local version = type(body.version) == "string" and body.version or nil
      local ports = type(body.ports) == "table" and body.ports or {}
      local stage = body.stage
      local current = STAGE_ORDER[machine.stage]
      local cloud_init = type(body.cloud_init) == "table" and body.cloud_init
        or {}

      -- The stages this report moves the machine through, in order: a
      -- daemon that reports services_ready has finished cloud-init too,
      -- so that event is recorded on the way.
      local steps = {}
      if stage == "failed" and current and current < 3 then
        steps[1] = { stage = "failed", detail = { source = "daemon",
          reason = "cloud-init reported errors",
          errors = json.array(type(cloud_init.errors) == "table"
            and cloud_init.errors or {}),
          log_tail = json.array(type(cloud_init.log_tail) == "table"
            and cloud_init.log_tail or {}) } }
      elseif DAEMON_STAGES[stage] and current
          and DAEMON_STAGES[stage] > current then
        if stage == "services_ready" and current < 2 then
          steps[#steps + 1] = { stage = "cloud_init_done",
            detail = { source = "daemon", cloud_init = cloud_init.status } }
        end
        steps[#steps + 1] = { stage = stage, detail = { source = "daemon" } }
      end

      local ok, err, code = db.tx(function(tx)
        local _, uerr, ucode = tx:query(
          "UPDATE machines SET version = $2, ports = $3::jsonb, "
            .. "last_seen_at = now() WHERE id = $1",
          { machine.id, version, json.encode(json.array(ports)) })
        if ucode then
          return nil, uerr, ucode
        end

        local row = metrics_row(body.metrics)
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

        -- Self-update outcomes (applied, rolled_back, skipped, failed)
        -- join the machine's history at its current stage.
        local updates = type(body.events) == "table" and body.events or {}
        for i = 1, math.min(#updates, MAX_UPDATE_EVENTS) do
          local ev = updates[i]
          if type(ev) == "table" and UPDATE_OUTCOMES[ev.type] then
            local _, uerr2, ucode2 = tx:query(
              "INSERT INTO machine_events (machine_id, stage, detail) "
                .. "SELECT id, stage, $2::jsonb FROM machines WHERE id = $1",
              { machine.id, json.encode({ source = "daemon", kind = "update",
                outcome = ev.type, version = type(ev.version) == "string"
                  and ev.version or nil, reason = type(ev.reason) == "string"
                  and ev.reason:sub(1, 500) or nil }) })
            if ucode2 then
              return nil, uerr2, ucode2
            end
          end
        end

        -- Every move goes through the stage table, which checks it
        -- against the machine's stage read under a row lock; a move the
        -- table forbids (a delete that raced this heartbeat) is skipped.
        for _, step in ipairs(steps) do
          local ev, serr, scode = stages.transition(tx, machine, step.stage,
            step.detail)
          if not ev then
            if scode ~= "invalid_transition" then
              return nil, serr, scode
            end
            break
          end
        end
        return true
      end)

      if not ok then
        log.err("heartbeat not recorded", { slug = machine.slug,
          error = err, code = code })
        if code == "database_unavailable" then
          return api_mod.error(503, "database_unavailable",
            "the database is unavailable; retry later")
        end
        return api_mod.error(500, "internal", "internal server error")
      end

      local offer = releases.offer(machine, version)
      if offer then
        return 200, { update = offer }
      end
      return 200, {}
    end,
  })
end
