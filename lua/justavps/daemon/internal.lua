-- The daemon's internal API on 127.0.0.1:7777. Every call is verified with
-- the machine-token signature (machine_sig) before routing. A failure is a
-- 401 (503 when the nonce cache is full) with the stable error code.
--
--   GET /v1/health    {"status":"ok"}
--   GET /v1/uptime    {"system_s":…, "daemon_s":…}
--   GET /v1/version   {"version":"X.Y.Z"}
--   GET /v1/services  state of the configured systemd units
--   GET /v1/system    CPU, load, memory, disk and network figures
--   GET /v1/ports     the port watcher's catalogue
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local router = require("justavps.router")
local proxy = require("justavps.proxy")
local machine_sig = require("justavps.machine_sig")
local state = require("justavps.daemon.state")
local background = require("justavps.daemon.background")
local metrics = require("justavps.daemon.metrics")
local ports = require("justavps.daemon.ports")

local pcall = pcall
local tostring = tostring
local concat = table.concat

local _M = {}

-- Bytes of request body read for the signature check. The API takes no
-- body today, so this only bounds what a caller can make the daemon hash.
local MAX_BODY = 64 * 1024

-- Units reported by /v1/services unless the config lists others.
_M.DEFAULT_UNITS = { "justavps-daemon.service", "docker.service",
  "ssh.service" }

local error_response = proxy.error_response


local function json_response(status, value)
  return status, { ["Content-Type"] = "application/json",
    ["Cache-Control"] = "no-store" }, json.encode(value) .. "\n"
end


-- Returns conf[key], or default when the config schema has no such key
-- (reading an undeclared key of a validated config raises).
local function conf_value(conf, key, default)
  local ok, value = pcall(function()
    return conf[key]
  end)
  if ok and value ~= nil then
    return value
  end
  return default
end


-- Reads the whole body, at most MAX_BODY bytes. Returns the body, or nil,
-- status, code, message.
local function read_body(req)
  local parts, size = {}, 0
  while true do
    local chunk, err = req:read()
    if not chunk then
      if err then
        return nil, 400, "bad_request", "reading the body failed: " .. err
      end
      break
    end
    size = size + #chunk
    if size > MAX_BODY then
      return nil, 413, "too_large", "the request body is larger than "
        .. MAX_BODY .. " bytes"
    end
    parts[#parts + 1] = chunk
  end
  return concat(parts)
end


local routes = router.new()

routes:add({ method = "GET", path = "/v1/health", handler = function()
  return json_response(200, { status = "ok" })
end })

routes:add({ method = "GET", path = "/v1/uptime", handler = function()
  local uptime, err = metrics.uptime()
  if not uptime then
    return error_response(500, "internal", "cannot read the uptime: "
      .. tostring(err))
  end
  return json_response(200, uptime)
end })

routes:add({ method = "GET", path = "/v1/version", handler = function()
  return json_response(200, { version = core.version })
end })

routes:add({ method = "GET", path = "/v1/services", handler = function()
  local units = conf_value(state.conf, "services", _M.DEFAULT_UNITS)
  return json_response(200, metrics.services(units))
end })

routes:add({ method = "GET", path = "/v1/system", handler = function()
  local disk_path = conf_value(state.conf, "disk_path", "/")
  return json_response(200, metrics.system({ disk_path = disk_path }))
end })

routes:add({ method = "GET", path = "/v1/ports", handler = function()
  local list, updated_at = ports.catalogue(0)
  return json_response(200, { ports = list, updated_at = updated_at,
    watching = ports.watching() })
end })


-- Serves one request on the internal listener.
function _M.handle(req)
  local conf = state.conf
  local body, status, code, message = read_body(req)
  if not body then
    return error_response(status, code, message)
  end

  local ok, err, err_code = machine_sig.verify(conf.token, req, body,
    background.nonce_cache())
  if not ok then
    log.warn("rejected an internal API call", { code = err_code,
      error = err, path = req.path, client_ip = req:peer() })
    return error_response(machine_sig.STATUS[err_code] or 401, err_code,
      err)
  end

  local route, reason, extra = routes:match(req.method, req.target)
  if not route then
    if reason == "method_not_allowed" then
      local s, h, b = error_response(405, "method_not_allowed",
        "method " .. req.method .. " is not allowed on " .. req.path)
      h["Allow"] = concat(extra, ", ")
      return s, h, b
    end
    if reason == "bad_request" then
      return error_response(400, "bad_request", extra)
    end
    return error_response(404, "not_found", "no internal API endpoint at "
      .. req.path)
  end
  return route.handler(req)
end


return _M
