-- The machines API: create, list, show and delete machines, and read the
-- ports and metrics their heartbeats reported. Creating and deleting only
-- record the request and queue a job; the provisioning worker does the
-- provider calls and moves the stages on.
--
-- The module is callable, route(api) adds the routes, and it carries the
-- helpers that the events and access routes share: load_machine,
-- db_failure, parse_query and parse_count.
local json = require("justavps.json")
local log = require("justavps.log")
local api_mod = require("justavps.platform.api")
local machines = require("justavps.platform.machines")
local state = require("justavps.platform.state")
local providers = require("providers.init")

local type = type
local pairs = pairs
local rawget = rawget
local tonumber = tonumber
local setmetatable = setmetatable
local schar = string.char
local sfind = string.find
local ssub = string.sub
local sgsub = string.gsub
local smatch = string.match

local _M = {}


-- Returns the response for a failed data-layer call that is not the
-- caller's fault: 503 when the database is unreachable, else 500. what
-- names the operation in the log.
function _M.db_failure(what, err, code, fields)
  fields = fields or {}
  fields.error = err
  fields.code = code
  if code == "database_unavailable" or code == "timeout" then
    log.warn(what .. " failed: database unavailable", fields)
    return api_mod.error(503, "database_unavailable",
      "the database is unavailable; retry later")
  end
  log.err(what .. " failed", fields)
  return api_mod.error(500, "internal", "internal server error")
end


-- Returns the live machine ctx.params.slug of the caller's account, or
-- nil, status, headers, body of the error response: 404 also for a
-- machine of another account, so nobody learns which slugs exist.
function _M.load_machine(ctx)
  local slug = ctx.params.slug
  local machine, err, code = machines.find(ctx.user.account_id, slug)
  if machine then
    return machine
  end
  if code == "not_found" then
    return nil, api_mod.error(404, "not_found", "no machine " .. slug)
  end
  return nil, _M.db_failure("machine lookup", err, code, { slug = slug })
end


-- Returns n when s is a decimal integer from 0 to max, else nil.
function _M.parse_count(s, max)
  if type(s) ~= "string" or not smatch(s, "^%d+$") or #s > 15 then
    return nil
  end
  local n = tonumber(s)
  if n > max then
    return nil
  end
  return n
end


local function hex_char(hex)
  return schar(tonumber(hex, 16))
end


local function unescape(s)
  return (sgsub(sgsub(s, "+", " "), "%%(%x%x)", hex_char))
end


-- Parses a query string into a table of decoded names to their first
-- value. "+" is a space, as in HTML forms.
function _M.parse_query(query)
  local out = {}
  if type(query) ~= "string" then
    return out
  end
  for pair in (query .. "&"):gmatch("([^&]*)&") do
    if pair ~= "" then
      local eq = sfind(pair, "=", 1, true)
      local name = unescape(eq and ssub(pair, 1, eq - 1) or pair)
      if out[name] == nil then
        out[name] = unescape(eq and ssub(pair, eq + 1) or "")
      end
    end
  end
  return out
end


-- Reads ?limit: nil when absent, or nil, error response when invalid.
local function read_limit(query, max)
  local text = query.limit
  if text == nil then
    return nil
  end
  local limit = _M.parse_count(text, max)
  if not limit or limit < 1 then
    return nil, api_mod.error(400, "invalid_request",
      "limit must be an integer from 1 to " .. max)
  end
  return limit
end


-- Checks that fields.provider exists and is configured in this platform,
-- and, for a provider with one fixed region and server type (such as
-- local), that the request names them. Returns nil, or a status, headers,
-- body error reply. Checks that need the provider's API, such as a cloud
-- region's capacity, are left to the provisioning worker.
local function check_provider(fields)
  local name = fields.provider
  -- "init" names the registry module itself, not a provider.
  local module, err = nil, "reserved name"
  if name ~= "init" then
    module, err = providers.get(name)
  end
  if not module then
    -- The reason lists the module search path, so only the log has it.
    log.warn("machine requested for an unknown provider",
      { provider = name, error = err })
    return api_mod.error(400, "unknown_provider", "provider: unknown "
      .. "provider '" .. name .. "'")
  end
  -- rawget: the validated record raises on a key it does not declare.
  local conf = rawget(state.conf.provision.providers, name)
  local driver_conf = {}
  for k, v in pairs(conf or {}) do
    driver_conf[k] = v
  end
  local driver, derr
  if conf then
    driver, derr = providers.new(name, driver_conf)
  end
  if not driver then
    -- The reason may quote configuration values, so only the log has it.
    log.warn("machine requested for an unconfigured provider",
      { provider = name, error = derr })
    return api_mod.error(400, "provider_not_configured", "provider: "
      .. name .. " is not configured on this platform")
  end
  if module.REGION and fields.region ~= module.REGION then
    return api_mod.error(400, "invalid_request", "region: the " .. name
      .. " provider has only the region " .. module.REGION)
  end
  if module.SERVER_TYPE and fields.server_type ~= module.SERVER_TYPE then
    return api_mod.error(400, "invalid_request", "server_type: the " .. name
      .. " provider has only the server type " .. module.SERVER_TYPE)
  end
  return nil
end


local function create(ctx)
  local body = ctx.body
  local fields = {
    name = body.name,
    provider = body.provider or state.conf.machines.default_provider,
    region = body.region,
    server_type = body.server_type,
    requested_by = ctx.user.id,
  }
  local status, headers, reply = check_provider(fields)
  if status then
    return status, headers, reply
  end
  local machine, err, code = machines.create(ctx.user.account_id, fields)
  if not machine then
    return _M.db_failure("machine create", err, code,
      { account_id = ctx.user.account_id })
  end
  log.info("machine requested", { slug = machine.slug,
    account_id = ctx.user.account_id, provider = fields.provider })
  return 202, machines.public(machine)
end


local function list(ctx)
  local query = _M.parse_query(ctx.query)
  local limit, s, h, b = read_limit(query, machines.MAX_MACHINES_PAGE)
  if s then
    return s, h, b
  end
  local page, err, code = machines.list(ctx.user.account_id,
    { limit = limit, cursor = query.cursor })
  if not page then
    if code == "invalid_cursor" then
      return api_mod.error(400, "invalid_cursor", err)
    end
    return _M.db_failure("machine list", err, code)
  end
  return 200, { items = page.items, next_cursor = page.next_cursor
    or json.null }
end


local function show(ctx)
  local machine, s, h, b = _M.load_machine(ctx)
  if not machine then
    return s, h, b
  end
  return 200, machines.public(machine)
end


local function delete(ctx)
  local slug = ctx.params.slug
  local machine, err, code = machines.request_delete(ctx.user.account_id,
    slug, ctx.user.id)
  if not machine then
    if code == "not_found" then
      return api_mod.error(404, "not_found", "no machine " .. slug)
    end
    if code == "invalid_transition" then
      return api_mod.error(409, "invalid_stage", err)
    end
    return _M.db_failure("machine delete", err, code, { slug = slug })
  end
  log.info("machine deletion requested", { slug = slug,
    account_id = ctx.user.account_id })
  return 202, machines.public(machine)
end


local function ports(ctx)
  local machine, s, h, b = _M.load_machine(ctx)
  if not machine then
    return s, h, b
  end
  local port_list = json.decode(machine.ports)
  return 200, {
    ports = json.array(type(port_list) == "table" and port_list or {}),
    last_seen_at = machine.last_seen_at,
  }
end


-- RFC 3339 as clients send it: a date, "T", a time, optional fraction
-- and a zone. PostgreSQL parses it; this only keeps other text out.
local SINCE_TIME = "^%d%d%d%d%-%d%d%-%d%d[T ]%d%d:%d%d:%d%d[%.%d]*"
  .. "[Zz+%-]?[%d:]*$"


local function metrics(ctx)
  local machine, s, h, b = _M.load_machine(ctx)
  if not machine then
    return s, h, b
  end
  local query = _M.parse_query(ctx.query)
  local limit, ls, lh, lb = read_limit(query, machines.MAX_METRICS)
  if ls then
    return ls, lh, lb
  end

  local since = query.since
  if since ~= nil then
    if smatch(since, "^%d+%.?%d*$") then
      since = tonumber(since)
    elseif not smatch(since, SINCE_TIME) then
      return api_mod.error(400, "invalid_request", "since must be Unix "
        .. "seconds or an RFC 3339 time such as 2026-01-02T03:04:05Z")
    end
  end

  local rows, err, code = machines.metrics(machine.id,
    { since = since, limit = limit })
  if not rows then
    if code == "22007" or code == "22008" then
      return api_mod.error(400, "invalid_request",
        "since is not a valid time: " .. err)
    end
    return _M.db_failure("metrics read", err, code,
      { slug = machine.slug })
  end
  return 200, { items = rows }
end


local function add_routes(api)
  api:route({
    method = "POST", path = "/api/v1/machines", name = "createMachine",
    auth = "user", scope = "write", status = 202,
    summary = "Create a machine; provisioning runs in the background",
    body = { fields = {
      { name = { type = "string", required = true, len_min = 1,
        len_max = 100, description = "display name" } },
      { provider = { type = "string", match = "^[a-z0-9_-]+$",
        len_max = 40, description = "provider module, such as hetzner "
          .. "or local; default: machines.default_provider" } },
      { region = { type = "string", required = true, len_min = 1,
        len_max = 100, description = "provider region" } },
      { server_type = { type = "string", required = true, len_min = 1,
        len_max = 100, description = "provider server type" } },
    } },
    handler = create,
  })

  api:route({
    method = "GET", path = "/api/v1/machines", name = "listMachines",
    auth = "user", scope = "read",
    summary = "List the account's machines, newest first; ?limit, ?cursor",
    handler = list,
  })

  api:route({
    method = "GET", path = "/api/v1/machines/{slug}", name = "getMachine",
    auth = "user", scope = "read", summary = "Show one machine",
    handler = show,
  })

  api:route({
    method = "DELETE", path = "/api/v1/machines/{slug}",
    name = "deleteMachine", auth = "user", scope = "delete", status = 202,
    summary = "Delete a machine; deletion runs in the background",
    handler = delete,
  })

  api:route({
    method = "GET", path = "/api/v1/machines/{slug}/ports",
    name = "getMachinePorts", auth = "user", scope = "read",
    summary = "Listening ports from the machine's last heartbeat",
    handler = ports,
  })

  api:route({
    method = "GET", path = "/api/v1/machines/{slug}/metrics",
    name = "getMachineMetrics", auth = "user", scope = "read",
    summary = "Metrics history; ?since (Unix seconds or RFC 3339), ?limit",
    handler = metrics,
  })
end


_M.handlers = {
  create = create, list = list, show = show, delete = delete,
  ports = ports, metrics = metrics,
}

return setmetatable(_M, { __call = function(_, api)
  return add_routes(api)
end })
