-- Provider registry and the provider interface as data.
--
-- A provider is a module `providers.NAME` that returns a table with:
--   name    the provider's name, the same as NAME
--   schema  a justavps.config declaration of its configuration
--   new     function(conf, deps) returning a driver, or nil, message, code
--
-- A driver is a table with the six functions of FUNCTIONS, called with a
-- colon (`driver:create_server(req)`). Every function returns its result
-- table, or nil, message, code where code is one of ERROR_CODES. Every
-- provider passes the shared conformance suite in spec/06-providers/.
local _M = {}

local type = type
local pairs = pairs
local ipairs = ipairs
local require = require
local format = string.format


-- Stable error codes a driver returns as the third value of a failure.
_M.ERROR_CODES = {
  "rate_limited",          -- the provider's rate limit held after retries
  "invalid_request",       -- the caller's arguments were rejected
  "not_found",             -- the server, image or key does not exist
  "quota_exceeded",        -- an account or project limit was reached
  "provider_unavailable",  -- 5xx, timeouts, dropped or malformed responses
  "uniqueness_conflict",   -- a name or key is taken by another resource
  "capacity_unavailable",  -- no requested region and type had capacity
  "unauthorized",          -- the credentials were rejected
}

_M.ERRORS = {}
for _, code in ipairs(_M.ERROR_CODES) do
  _M.ERRORS[code] = code
end

-- Server statuses get_server_status returns. A provider maps anything it
-- cannot place in this list to "unknown".
_M.SERVER_STATUSES = {
  "initializing", "starting", "running", "stopping", "off", "deleting",
  "unknown",
}

local status_set = {}
for _, status in ipairs(_M.SERVER_STATUSES) do
  status_set[status] = true
end

-- The interface. Each field is a type name that `check_result` verifies;
-- a name ending in "?" may be absent.
_M.FUNCTIONS = {
  {
    name = "create_server",
    args = {
      { name = "req", fields = {
        slug = "string", name = "string", region = "string",
        server_type = "string", image = "string",
        ssh_key = "table?", user_data = "string?", labels = "table?",
        fallbacks = "table?", on_event = "function?",
      } },
    },
    result = {
      id = "string", status = "string", ipv4 = "string?",
      ipv6 = "string?", region = "string", server_type = "string",
    },
  },
  {
    name = "list_server_types",
    args = {},
    result_list = {
      id = "string", name = "string", cores = "number",
      memory_gb = "number", disk_gb = "number", prices = "table",
      locations = "table",
    },
  },
  {
    name = "list_regions",
    args = {},
    result_list = {
      id = "string", name = "string", city = "string", country = "string",
    },
  },
  {
    name = "get_server_status",
    args = { { name = "id", type = "string" } },
    result = {
      id = "string", status = "string", ipv4 = "string?",
      ipv6 = "string?",
    },
  },
  {
    name = "create_image",
    args = {
      { name = "id", type = "string" },
      { name = "opts", fields = { description = "string?" } },
    },
    result = { image_id = "string", status = "string" },
  },
  {
    name = "delete_server",
    args = { { name = "id_or_slug", type = "string" } },
    result = { deleted = "boolean" },
  },
}

local functions_by_name = {}
for _, fn in ipairs(_M.FUNCTIONS) do
  functions_by_name[fn.name] = fn
end

local registered = {}


-- Registers module under name, replacing a provider of that name. Raises
-- unless module has the fields every provider has.
function _M.register(name, module)
  if type(name) ~= "string" or not name:match("^[a-z][a-z0-9_]*$") then
    error("provider name must match [a-z][a-z0-9_]*", 2)
  end
  if type(module) ~= "table" or type(module.new) ~= "function"
      or type(module.schema) ~= "table" then
    error(format("provider %s must have new() and schema", name), 2)
  end
  registered[name] = module
end


-- Returns the provider module called name, loading providers.NAME on
-- first use, or nil, message, "not_found".
function _M.get(name)
  if type(name) ~= "string" or not name:match("^[a-z][a-z0-9_]*$") then
    return nil, format("invalid provider name %q", tostring(name)),
      "not_found"
  end
  if registered[name] then
    return registered[name]
  end
  local ok, module = pcall(require, "providers." .. name)
  if not ok then
    return nil, format("provider %s not found: %s", name, module),
      "not_found"
  end
  _M.register(name, module)
  return module
end


-- Builds a driver of provider name from conf (validated against the
-- provider's schema) and deps (functions such as http and sleep).
function _M.new(name, conf, deps)
  local module, err, code = _M.get(name)
  if not module then
    return nil, err, code
  end
  local driver
  driver, err, code = module.new(conf, deps)
  if not driver then
    return nil, err, code
  end
  local ok, problem = _M.check_driver(driver)
  if not ok then
    error(format("provider %s: %s", name, problem), 2)
  end
  return driver
end


-- Returns true when driver has every interface function, else
-- false and the name of the first one missing.
function _M.check_driver(driver)
  if type(driver) ~= "table" then
    return false, "driver is not a table"
  end
  for _, fn in ipairs(_M.FUNCTIONS) do
    if type(driver[fn.name]) ~= "function" then
      return false, "driver lacks function " .. fn.name
    end
  end
  return true
end


local function check_fields(shape, value, where)
  if type(value) ~= "table" then
    return false, where .. " is not a table"
  end
  for field, expected in pairs(shape) do
    local optional = expected:sub(-1) == "?"
    local wanted = optional and expected:sub(1, -2) or expected
    local got = value[field]
    if got == nil then
      if not optional then
        return false, format("%s.%s is missing", where, field)
      end
    elseif type(got) ~= wanted then
      return false, format("%s.%s is %s, expected %s", where, field,
        type(got), wanted)
    end
  end
  return true
end


-- Returns true when value has the result shape of function fname, else
-- false and the first problem. Used by the conformance suite.
function _M.check_result(fname, value)
  local fn = functions_by_name[fname]
  if not fn then
    error("unknown provider function " .. tostring(fname), 2)
  end
  if fn.result_list then
    if type(value) ~= "table" then
      return false, fname .. " result is not a list"
    end
    for i, entry in ipairs(value) do
      local ok, problem = check_fields(fn.result_list, entry,
        format("%s[%d]", fname, i))
      if not ok then
        return false, problem
      end
    end
    return true
  end
  local ok, problem = check_fields(fn.result, value, fname)
  if not ok then
    return false, problem
  end
  if value.status and (fname == "create_server"
      or fname == "get_server_status") and not status_set[value.status] then
    return false, format("%s.status %q is not a known status", fname,
      value.status)
  end
  return true
end


-- Returns true when code is one of the fixed error codes.
function _M.is_error_code(code)
  return _M.ERRORS[code] ~= nil
end


return _M
