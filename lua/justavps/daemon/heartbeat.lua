-- The heartbeat loop: every conf.heartbeat_interval seconds the daemon
-- sends POST {platform_url}/api/v1/machines/{slug}/heartbeat, signed with
-- the machine token, with its version, provisioning stage, metrics, port
-- catalogue and the update events not yet reported. A reply may carry
-- { "update": { version, url, sha256 } }, which goes to the updater.
--
-- Failures (no connection, a status other than 2xx) are logged and retried
-- with exponential backoff and jitter, up to max_backoff seconds. Only
-- stop() ends the loop.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local machine_sig = require("justavps.machine_sig")
local metrics = require("justavps.daemon.metrics")
local ports = require("justavps.daemon.ports")
local updater = require("justavps.daemon.updater")

local crypto = core.crypto
local min = math.min
local floor = math.floor
local tostring = tostring
local type = type
local pcall = pcall
local pairs = pairs
local open = io.open
local byte = string.byte
local gsub = string.gsub

local _M = {}

_M.DEFAULTS = {
  interval = 30,
  -- Upper bound of the delay between attempts while the platform fails.
  max_backoff = 300,
  timeout = 15,
  max_reply = 1024 * 1024,
}


-- Returns the delay in seconds before the next attempt after failures
-- consecutive failures: interval * 2^failures, at most max_backoff, then
-- scaled by a random factor in [0.5, 1) so that machines that failed
-- together do not retry together. random01 (default from the CSPRNG) is
-- for specs.
function _M.backoff_delay(failures, interval, max_backoff, random01)
  local delay = min(max_backoff, interval * 2 ^ failures)
  local r = random01
  if not r then
    local b1, b2 = byte(crypto.random_bytes(2), 1, 2)
    r = (b1 * 256 + b2) / 65536
  end
  return delay * (0.5 + 0.5 * r)
end


local function exists(path)
  local f = open(path, "r")
  if f then
    f:close()
    return true
  end
  return false
end


-- Lines of cloud-init's output log sent when cloud-init failed, so the
-- user sees why without logging in.
local LOG_TAIL_LINES = 30
local LOG_TAIL_BYTES = 8192


local function read_file(path, max)
  local f = open(path, "rb")
  if not f then
    return nil
  end
  local size = f:seek("end")
  if max and size and size > max then
    f:seek("set", size - max)
  else
    f:seek("set", 0)
  end
  local data = f:read("*a")
  f:close()
  return data
end


local function last_lines(text, n)
  local lines = {}
  for line in (text or ""):gmatch("[^\n]*") do
    if line ~= "" then
      lines[#lines + 1] = line
    end
  end
  local first = #lines - n + 1
  if first < 1 then
    first = 1
  end
  local out = {}
  for i = first, #lines do
    out[#out + 1] = lines[i]
  end
  return out
end


-- Returns what cloud-init reports: { status = "absent" | "running" |
-- "done" | "error", errors = {...}, log_tail = {...} }. opts.cloud_dir
-- (default /var/lib/cloud) and opts.cloud_log (default
-- /var/log/cloud-init-output.log) are for specs.
function _M.cloud_init(opts)
  opts = opts or {}
  local dir = opts.cloud_dir or "/var/lib/cloud"
  if not exists(dir .. "/instance/.") then
    return { status = "absent" }
  end
  if not exists(dir .. "/instance/boot-finished") then
    return { status = "running" }
  end

  -- result.json is written when cloud-init finishes; a non-empty errors
  -- list means a module failed.
  local result = json.decode(read_file(dir .. "/data/result.json", 65536)
    or "{}")
  local v1 = type(result) == "table" and result.v1 or nil
  local errors = type(v1) == "table" and type(v1.errors) == "table"
    and v1.errors or {}
  if #errors > 0 then
    local log_text = read_file(opts.cloud_log
      or "/var/log/cloud-init-output.log", LOG_TAIL_BYTES)
    return { status = "error", errors = errors,
      log_tail = last_lines(log_text, LOG_TAIL_LINES) }
  end
  return { status = "done" }
end


-- Returns the provisioning stage to report: "cloud_init_running" while
-- cloud-init works, "failed" when it reported errors, else
-- "services_ready" (the daemon runs, so its services are up), and the
-- cloud-init report behind it.
function _M.stage(opts)
  local report = _M.cloud_init(opts)
  if report.status == "running" then
    return "cloud_init_running", report
  end
  if report.status == "error" then
    return "failed", report
  end
  return "services_ready", report
end


-- Builds the heartbeat body. opts.metrics (a function returning the
-- metrics table) and opts.ports (a function returning the catalogue)
-- replace the collectors. Returns the body table and the number of event
-- lines it carries. Must run in a core coroutine.
function _M.build_body(conf, opts)
  opts = opts or {}
  local collected = opts.metrics and opts.metrics()
    or metrics.system({ disk_path = opts.disk_path })
  local catalogue = opts.ports and opts.ports() or ports.catalogue()
  local events, lines = updater.pending_events(conf.state_dir)
  local stage, cloud_init = _M.stage(opts)
  return {
    version = opts.version or core.version,
    stage = stage,
    cloud_init = cloud_init,
    metrics = collected,
    ports = catalogue,
    events = events,
  }, lines
end


-- Sends one heartbeat. conf: platform_url, slug, token, state_dir. opts:
-- see build_body, plus ca (CA file for https) and timeout. Returns the
-- decoded reply (a table, {} for an empty body), or nil, message, code.
-- A 2xx reply acknowledges the events the body carried. Must run in a
-- core coroutine.
function _M.send(conf, opts)
  opts = opts or {}
  local target, terr = updater.http_target(conf.platform_url, opts)
  if not target then
    return nil, terr, "invalid_url"
  end

  local body_table, event_lines = _M.build_body(conf, opts)
  local body = assert(json.encode(body_table))
  local path = gsub(target.path, "/+$", "") .. "/api/v1/machines/"
    .. conf.slug .. "/heartbeat"

  local headers = machine_sig.sign(conf.token, "POST", path, body)
  headers["Content-Type"] = "application/json"
  headers["User-Agent"] = "justavps-daemon/" .. core.version

  local res, err, code = core.http.request({
    method = "POST", host = target.host, port = target.port, path = path,
    tls = target.tls, server_name = target.server_name, headers = headers,
    body = body, timeout = opts.timeout or _M.DEFAULTS.timeout,
  })
  if not res then
    return nil, tostring(err), code
  end
  local text, rerr, rcode = res:read_body(_M.DEFAULTS.max_reply)
  res:close()
  if not text then
    return nil, "reading the reply failed: " .. tostring(rerr), rcode
  end
  if res.status < 200 or res.status > 299 then
    return nil, "platform returned status " .. res.status .. ": "
      .. text:sub(1, 200), "http_status"
  end

  updater.ack_events(conf.state_dir, event_lines)
  updater.note_heartbeat(body_table.version)

  if text == "" then
    return {}
  end
  local reply, jerr = json.decode(text)
  if type(reply) ~= "table" then
    return nil, "invalid JSON reply: " .. tostring(jerr), "invalid_json"
  end
  return reply
end


local loop = nil


local function handle_reply(reply, conf, opts)
  if type(reply.update) ~= "table" then
    return
  end
  local uopts = {}
  for k, v in pairs(opts.update or {}) do
    uopts[k] = v
  end
  uopts.state_dir = uopts.state_dir or conf.state_dir
  core.spawn(function()
    local ok, err, code = updater.apply(reply.update, uopts)
    if not ok and code ~= "skipped" and code ~= "cooldown" then
      log.warn("update not applied", { version = reply.update.version,
        code = code, error = err })
    end
  end)
end


-- Starts the heartbeat loop; a second start replaces the first. opts:
-- interval (default conf.heartbeat_interval, else 30), max_backoff,
-- update (options for updater.apply), on_result (function(ok, info)
-- after each attempt, info = { reply, error, code, failures, delay }),
-- and the options of send. Returns nothing.
function _M.start(conf, opts)
  opts = opts or {}
  _M.stop()
  local l = { running = true, waiter = core.waiter(), failures = 0 }
  loop = l

  local interval = opts.interval or conf.heartbeat_interval
    or _M.DEFAULTS.interval
  local max_backoff = opts.max_backoff or _M.DEFAULTS.max_backoff

  core.spawn(function()
    while l.running do
      local ok, reply, err, code = pcall(_M.send, conf, opts)
      if not ok then
        reply, err, code = nil, reply, "lua_error"
      end
      local delay
      if reply then
        if l.failures > 0 then
          log.info("heartbeat accepted again", { failures = l.failures })
        end
        l.failures = 0
        delay = interval
        handle_reply(reply, conf, opts)
      else
        l.failures = l.failures + 1
        delay = _M.backoff_delay(l.failures, interval, max_backoff)
        log.warn("heartbeat failed; retrying", { error = err, code = code,
          failures = l.failures, retry_in_s = floor(delay * 10) / 10 })
      end
      if opts.on_result then
        pcall(opts.on_result, reply ~= nil, { reply = reply, error = err,
          code = code, failures = l.failures, delay = delay })
      end
      if l.running then
        l.waiter:wait(delay)
      end
    end
  end)
end


-- Stops the heartbeat loop. A heartbeat in flight finishes. Returns
-- nothing.
function _M.stop()
  if loop then
    loop.running = false
    if loop.waiter:waiting() then
      loop.waiter:wake()
    end
    loop = nil
  end
end


return _M
