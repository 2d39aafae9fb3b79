-- Role registry. A role is a module justavps.roles.<name> that returns
--   { summary = "one line", options = { { name = field }, ... },
--     run = function(opts) ... return exit_status end }
-- where options use the field declarations of justavps.config. A role is
-- listed only when its module file exists, so adding the file adds the
-- role; modules load on first use.
local config = require("justavps.config")

local type = type
local error = error
local setmetatable = setmetatable
local ipairs = ipairs
local require = require
local searchpath = package.searchpath

local _M = {}

-- Known role names in help order, with the summary shown before the module
-- is loaded. A role outside this list needs a line here too.
local known = {
  { name = "platform", summary = "HTTP API, dashboard sessions, machines, "
    .. "provisioning and billing" },
  { name = "edge", summary = "public entry point: authenticates, signs and "
    .. "forwards requests to a broker" },
  { name = "broker", summary = "verifies edge signatures and dials machines" },
  { name = "daemon", summary = "runs on every machine: port routing, "
    .. "terminal, toolbox and internal API" },
  { name = "dev", summary = "the whole stack on loopback: Postgres, "
    .. "platform, edge, broker and a local machine" },
  { name = "serve", summary = "the HTTP host alone, serving the hello app "
    .. "with hot reload" },
  { name = "migrate", summary = "applies the SQL migrations in sql/" },
  { name = "hello", summary = "logs a greeting and exits; exercises the "
    .. "command line and the loop" },
}

-- Roles served by another module while their own does not exist yet.
local aliases = {}

local loaded = {}


-- A role exists as a file on package.path or, in a binary without a Lua
-- tree beside it, as an embedded module (package.embedded, set by main.c).
local function module_exists(name)
  local modname = "justavps.roles." .. name
  local embedded = rawget(package, "embedded")
  return searchpath(modname, package.path) ~= nil
    or (embedded ~= nil and embedded[modname] == true)
end


-- Returns the module name that implements role name, or nil.
local function resolve(name)
  if module_exists(name) then
    return name
  end
  local target = aliases[name]
  if target and module_exists(target) then
    return target
  end
  return nil
end


-- Returns the available roles in help order: { { name, summary,
-- alias_of }, ... }. alias_of is set when another module serves the role.
function _M.list()
  local out = {}
  for _, entry in ipairs(known) do
    local impl = resolve(entry.name)
    if impl then
      local summary = entry.summary
      if impl ~= entry.name then
        summary = summary .. " (for now the " .. impl .. " role)"
      end
      out[#out + 1] = {
        name = entry.name,
        summary = summary,
        alias_of = impl ~= entry.name and impl or nil,
      }
    end
  end
  return out
end


local function check_role(name, role)
  if type(role) ~= "table" then
    error("role " .. name .. ": module must return a table", 3)
  end
  if type(role.run) ~= "function" then
    error("role " .. name .. ": run must be a function", 3)
  end
  if role.options ~= nil and type(role.options) ~= "table" then
    error("role " .. name .. ": options must be a list of fields", 3)
  end
end


-- Returns the role table for name, loading its module on first use, with
-- role.schema built from role.options; or nil, "unknown_role" when no
-- module implements it. Raises when the module fails to load or has the
-- wrong shape.
function _M.get(name)
  if type(name) ~= "string" then
    error("roles.get: name must be a string", 2)
  end

  if loaded[name] then
    return loaded[name]
  end

  local impl = resolve(name)
  if not impl then
    return nil, "unknown_role"
  end

  local role = require("justavps.roles." .. impl)
  check_role(impl, role)

  local entry = {
    name = name,
    module = impl,
    summary = role.summary,
    options = role.options or {},
    run = role.run,
    schema = config.schema({ fields = role.options or {} }),
  }
  loaded[name] = entry
  return entry
end


-- Returns true when a module implements role name.
function _M.exists(name)
  return resolve(name) ~= nil
end


-- The registry as a table: roles.roles.hello is _M.get("hello"), nil for
-- an unknown name.
_M.roles = setmetatable({}, {
  __index = function(_, name)
    return (_M.get(name))
  end,
})


return _M
