-- Configuration: a JSON file plus environment overrides, validated against
-- a declarative schema, with defaults applied.
--
-- A schema is a record: { fields = { { name = field }, ... } }, fields in
-- order. A field is a table with:
--   type         string, number, integer, boolean, duration (seconds, also
--                "30s", "5m"), size (bytes, also "64k", "16M"), array, map
--                or record
--   default      value used when the key is absent (copied, validated when
--                the schema is built)
--   required     true: an absent key is an error
--   between      { min, max } for numbers and the units above
--   min, max     one bound alone
--   len_min, len_max   length bounds for strings and arrays
--   one_of       list of allowed values
--   match        Lua pattern a string must match (anchor it with ^ and $)
--   match_text   words for match in messages and help, such as "an email
--                address", shown instead of the pattern
--   description  one line for help text and docs
--   unit         word shown in help, such as "seconds" or "bytes"
--   elements     field of each array element
--   keys, values fields of map keys (strings) and values
--   fields       fields of a record
--   env          false: no environment override for this field
local json = require("justavps.json")
local units = require("justavps.units")

local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local next = next
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local getmetatable = getmetatable
local rawget = rawget
local concat = table.concat
local floor = math.floor
local huge = math.huge
local upper = string.upper
local lower = string.lower
local smatch = string.match
local sfind = string.find
local sgsub = string.gsub
local io_open = io.open
local getenv = os.getenv

local _M = {}

local SCHEMA_MT = { __name = "config.schema" }

local scalar_types = {
  string = true,
  number = true,
  integer = true,
  boolean = true,
  duration = true,
  size = true,
}

local all_types = {
  array = true,
  map = true,
  record = true,
}
for k in pairs(scalar_types) do
  all_types[k] = true
end

local function is_identifier(s)
  return smatch(s, "^[%a_][%w_]*$") ~= nil
end


local function child_path(path, key)
  if path == "" then
    return key
  end
  return path .. "." .. key
end


local function map_path(path, key)
  if is_identifier(key) then
    return child_path(path, key)
  end
  return path .. "[" .. json.encode(key) .. "]"
end


-- Renders a value for "got ..." in error messages.
local function show(v)
  local t = type(v)
  if t == "string" then
    return json.encode(v)
  end
  if t == "table" then
    if next(v) == nil then
      return "an empty table"
    end
    if v[1] ~= nil then
      return "an array"
    end
    return "an object"
  end
  return tostring(v)
end


-- Describes what a field accepts, for messages and help:
-- "integer between 1 and 65535", "string, one of a, b".
local function describe(field)
  local parts = { field.type }

  if field.between then
    parts[#parts + 1] = "between " .. field.between[1] .. " and "
      .. field.between[2]
  else
    if field.min then
      parts[#parts + 1] = "at least " .. field.min
    end
    if field.max then
      parts[#parts + 1] = "at most " .. field.max
    end
  end

  if field.len_min and field.len_max then
    parts[#parts + 1] = "of length " .. field.len_min .. " to "
      .. field.len_max
  elseif field.len_min then
    parts[#parts + 1] = "of length at least " .. field.len_min
  elseif field.len_max then
    parts[#parts + 1] = "of length at most " .. field.len_max
  end

  if field.one_of then
    local shown = {}
    for i, v in ipairs(field.one_of) do
      shown[i] = tostring(v)
    end
    parts[#parts + 1] = "one of " .. concat(shown, ", ")
  end

  if field.match_text then
    parts[#parts + 1] = "that is " .. field.match_text
  elseif field.match then
    parts[#parts + 1] = "matching " .. field.match
  end

  return concat(parts, " ")
end

_M.describe = describe


local compile_field


local function compile_fields(list, path)
  if type(list) ~= "table" then
    error("config.schema: " .. (path == "" and "schema" or path)
      .. ": fields must be a list of { name = field } tables", 3)
  end

  local out = { order = {}, by_name = {} }
  for i, entry in ipairs(list) do
    local name, field = next(entry)
    if type(name) ~= "string" or next(entry, name) ~= nil then
      error("config.schema: " .. (path == "" and "schema" or path)
        .. ": fields[" .. i .. "] must be a table with exactly one "
        .. "name = field pair", 3)
    end
    if out.by_name[name] then
      error("config.schema: " .. child_path(path, name)
        .. " is declared twice", 3)
    end
    local compiled = compile_field(field, child_path(path, name))
    compiled.name = name
    out.order[#out.order + 1] = compiled
    out.by_name[name] = compiled
  end

  return out
end


function compile_field(field, path)
  if type(field) ~= "table" then
    error("config.schema: " .. path .. ": field must be a table", 3)
  end

  if not all_types[field.type] then
    error("config.schema: " .. path .. ": unknown type "
      .. tostring(field.type), 3)
  end

  local out = {}
  for k, v in pairs(field) do
    out[k] = v
  end

  if field.type == "record" then
    out.fields = compile_fields(field.fields or {}, path)
  elseif field.type == "array" then
    if type(field.elements) ~= "table" then
      error("config.schema: " .. path .. ": array needs elements", 3)
    end
    out.elements = compile_field(field.elements, path .. "[]")
  elseif field.type == "map" then
    out.keys = compile_field(field.keys or { type = "string" }, path .. "{}")
    if out.keys.type ~= "string" then
      error("config.schema: " .. path .. ": map keys must be strings", 3)
    end
    if type(field.values) ~= "table" then
      error("config.schema: " .. path .. ": map needs values", 3)
    end
    out.values = compile_field(field.values, path .. "{}")
  end

  if field.between and (type(field.between) ~= "table"
    or type(field.between[1]) ~= "number"
    or type(field.between[2]) ~= "number") then
    error("config.schema: " .. path .. ": between must be { min, max }", 3)
  end

  if field.one_of and type(field.one_of) ~= "table" then
    error("config.schema: " .. path .. ": one_of must be a list", 3)
  end

  return out
end


local validate_field


-- Checks bounds, one_of and match on a value of the right type.
local function check_constraints(field, v)
  local n = v
  if field.type == "string" or field.type == "array" then
    n = nil
  end

  if n then
    local lo = field.between and field.between[1] or field.min
    local hi = field.between and field.between[2] or field.max
    if (lo and n < lo) or (hi and n > hi) then
      return false
    end
  end

  if field.type == "string" or field.type == "array" then
    local len = #v
    if (field.len_min and len < field.len_min)
      or (field.len_max and len > field.len_max) then
      return false
    end
  end

  if field.one_of then
    local found = false
    for _, allowed in ipairs(field.one_of) do
      if allowed == v then
        found = true
        break
      end
    end
    if not found then
      return false
    end
  end

  if field.match and type(v) == "string" and not sfind(v, field.match) then
    return false
  end

  return true
end


local function add_error(errors, path, message)
  errors[#errors + 1] = { path = path, message = message }
end


local function bad(errors, field, path, v)
  add_error(errors, path, "expected " .. describe(field) .. ", got "
    .. show(v))
  return nil
end


-- Frozen tables: writes raise, and records raise on reads of keys their
-- schema does not declare, so a typo fails loudly instead of reading nil.
local frozen_array_mt = {
  __jsontype = "array",
  __newindex = function(_, k)
    error("config is read-only: cannot set [" .. tostring(k) .. "]", 2)
  end,
}

local frozen_map_mt = {
  __newindex = function(_, k)
    error("config is read-only: cannot set " .. tostring(k), 2)
  end,
}


local function freeze_record(t, fields, path)
  return setmetatable(t, {
    __index = function(_, k)
      if fields.by_name[k] == nil then
        error("config: " .. child_path(path, tostring(k))
          .. " is not a declared key", 2)
      end
      return nil
    end,
    __newindex = function(_, k)
      error("config is read-only: cannot set "
        .. child_path(path, tostring(k)), 2)
    end,
  })
end


local function is_list(v)
  local n = 0
  for k in pairs(v) do
    if type(k) ~= "number" or k < 1 or k ~= floor(k) then
      return false
    end
    n = n + 1
  end
  return n == #v
end


local function validate_record(field, v, path, errors)
  if type(v) ~= "table" or v[1] ~= nil or json.is_array(v) then
    return bad(errors, field, path, v)
  end

  local fields = field.fields
  local out = {}

  for k in pairs(v) do
    if type(k) ~= "string" or not fields.by_name[k] then
      add_error(errors, child_path(path, tostring(k)), "unknown key")
    end
  end

  for _, sub in ipairs(fields.order) do
    local value = rawget(v, sub.name)
    out[sub.name] = validate_field(sub, value, child_path(path, sub.name),
      errors)
  end

  return freeze_record(out, fields, path)
end


local function validate_array(field, v, path, errors)
  if type(v) ~= "table" or not is_list(v) then
    return bad(errors, field, path, v)
  end

  local out = {}
  for i = 1, #v do
    out[i] = validate_field(field.elements, v[i], path .. "[" .. i .. "]",
      errors)
  end

  if not check_constraints(field, v) then
    return bad(errors, field, path, v)
  end

  return setmetatable(out, frozen_array_mt)
end


local function validate_map(field, v, path, errors)
  if type(v) ~= "table" or v[1] ~= nil or json.is_array(v) then
    return bad(errors, field, path, v)
  end

  local out = {}
  for k, value in pairs(v) do
    local p = map_path(path, tostring(k))
    if type(k) ~= "string" then
      add_error(errors, p, "expected a string key")
    else
      validate_field(field.keys, k, p .. " (key)", errors)
      out[k] = validate_field(field.values, value, p, errors)
    end
  end

  return setmetatable(out, frozen_map_mt)
end


local function validate_scalar(field, v, path, errors)
  local t = field.type
  local value = v

  if t == "duration" then
    value = units.parse_duration(v)
  elseif t == "size" then
    value = units.parse_size(v)
  elseif t == "integer" then
    if type(v) ~= "number" or v ~= floor(v) or v == huge or v == -huge then
      value = nil
    end
  elseif t == "number" then
    if type(v) ~= "number" or v ~= v or v == huge or v == -huge then
      value = nil
    end
  elseif type(v) ~= t then
    value = nil
  end

  if value == nil or not check_constraints(field, value) then
    return bad(errors, field, path, v)
  end

  return value
end


local function copy(v)
  if type(v) ~= "table" then
    return v
  end
  local out = {}
  for k, x in pairs(v) do
    out[k] = copy(x)
  end
  return setmetatable(out, getmetatable(v))
end


function validate_field(field, v, path, errors)
  if v == json.null then
    v = nil
  end

  if v == nil then
    if field.default ~= nil then
      v = copy(field.default)
    elseif field.type == "record" then
      v = {}
    elseif field.required then
      add_error(errors, path, "required key is missing")
      return nil
    else
      return nil
    end
  end

  if field.type == "record" then
    return validate_record(field, v, path, errors)
  elseif field.type == "array" then
    return validate_array(field, v, path, errors)
  elseif field.type == "map" then
    return validate_map(field, v, path, errors)
  end

  return validate_scalar(field, v, path, errors)
end


local function env_name(prefix, path)
  return prefix .. "_" .. upper((sgsub(path, "%.", "_")))
end


-- Lists the overridable fields: { name = ENV, path = "a.b", field = f },
-- recursing through records. Two paths with one name raise.
local function collect_env(fields, path, prefix, out, seen)
  for _, field in ipairs(fields.order) do
    local p = child_path(path, field.name)
    if field.env ~= false then
      if field.type == "record" then
        collect_env(field.fields, p, prefix, out, seen)
      else
        local name = env_name(prefix, p)
        if seen[name] then
          error("config.schema: " .. p .. " and " .. seen[name]
            .. " both map to the environment variable " .. name, 4)
        end
        seen[name] = p
        out[#out + 1] = { name = name, path = p, field = field }
      end
    end
  end
  return out
end


-- Builds a schema from its declaration. Raises on a malformed declaration
-- or on a default that fails its own field.
function _M.schema(def)
  if getmetatable(def) == SCHEMA_MT then
    return def
  end

  if type(def) ~= "table" then
    error("config.schema: expected a table, got " .. type(def), 2)
  end

  local root = compile_field({
    type = "record",
    fields = def.fields or {},
  }, "")

  local errors = {}
  validate_field(root, {}, "", errors)
  for _, e in ipairs(errors) do
    if e.message ~= "required key is missing" then
      error("config.schema: default of " .. e.path .. ": " .. e.message, 2)
    end
  end

  local schema = setmetatable({ root = root, env_cache = {} }, SCHEMA_MT)
  _M.env_variables(schema)
  return schema
end


-- Returns the environment overrides a schema accepts, in declaration order:
-- { { name = "JUSTAVPS_BROKER_LISTEN_PORT", path = "broker.listen.port",
--     field = field }, ... }. prefix defaults to "JUSTAVPS".
function _M.env_variables(schema, prefix)
  prefix = prefix or "JUSTAVPS"
  local cached = schema.env_cache[prefix]
  if cached then
    return cached
  end
  local list = collect_env(schema.root.fields, "", prefix, {}, {})
  schema.env_cache[prefix] = list
  return list
end


local boolean_words = {
  ["true"] = true, yes = true, on = true, ["1"] = true,
  ["false"] = false, no = false, off = false, ["0"] = false,
}


-- Converts an environment string to the field's type. Values that do not
-- convert stay strings so the validator reports them with the input.
local function from_env(field, s)
  local t = field.type
  if t == "integer" or t == "number" then
    return tonumber(s) or s
  elseif t == "boolean" then
    local b = boolean_words[lower(s)]
    if b == nil then
      return s
    end
    return b
  elseif t == "array" then
    if smatch(s, "^%s*%[") then
      local v, err = json.decode(s)
      if v == nil then
        return nil, err
      end
      return v
    end
    local out = {}
    for item in (s .. ","):gmatch("([^,]*),") do
      item = smatch(item, "^%s*(.-)%s*$")
      if item ~= "" then
        out[#out + 1] = from_env(field.elements, item)
      end
    end
    return out
  elseif t == "map" then
    local v, err = json.decode(s)
    if v == nil then
      return nil, err
    end
    return v
  end
  return s
end


-- Returns a copy of strings (top-level names to string values, as in an
-- environment or a string-only map) with each value converted to the type
-- of its field in schema. Names the schema lacks and values that do not
-- convert are kept as they are, so validate() reports them.
function _M.from_strings(schema, strings)
  local fields = _M.schema(schema).root.fields.by_name
  local out = {}
  for name, value in pairs(strings) do
    local field = fields[name]
    if field and type(value) == "string" then
      out[name] = from_env(field, value) or value
    else
      out[name] = value
    end
  end
  return out
end


local function set_path(data, path, value)
  local node = data
  local keys = {}
  for key in path:gmatch("[^.]+") do
    keys[#keys + 1] = key
  end
  for i = 1, #keys - 1 do
    local child = node[keys[i]]
    if child == nil then
      child = {}
      node[keys[i]] = child
    elseif type(child) ~= "table" then
      return false
    end
    node = child
  end
  node[keys[#keys]] = value
  return true
end


local function format_errors(errors, sources)
  local lines = {}
  for i, e in ipairs(errors) do
    local where = e.path
    if sources[e.path] then
      where = where .. " (from " .. sources[e.path] .. ")"
    end
    lines[i] = where .. ": " .. e.message
  end
  return concat(lines, "\n")
end


-- Validates data (a table, not changed) against schema. Returns the
-- validated, read-only copy with defaults applied, or nil, message,
-- "invalid_config", errors where errors is a list of { path, message } and
-- message has one "path: problem" line per error.
function _M.validate(schema, data, sources)
  schema = _M.schema(schema)
  local errors = {}
  local out = validate_field(schema.root, data, "", errors)

  if #errors > 0 then
    return nil, format_errors(errors, sources or {}), "invalid_config",
      errors
  end

  return out
end


local function read_file(path)
  local f, err = io_open(path, "rb")
  if not f then
    return nil, err
  end
  local text, read_err = f:read("*a")
  f:close()
  if not text then
    return nil, path .. ": " .. tostring(read_err)
  end
  return text
end


-- Loads configuration. opts:
--   schema      schema or its declaration (required)
--   path        JSON file to read; absent means start from {}
--   data        table to start from instead of a file
--   env_prefix  prefix of override variables, default "JUSTAVPS"
--   getenv      function(name) -> string|nil, default os.getenv
-- Returns the config, or nil, message, code[, errors] with code
-- read_failed, invalid_json or invalid_config.
function _M.load(opts)
  if type(opts) ~= "table" or opts.schema == nil then
    error("config.load: expected { schema = ..., path = ... }", 2)
  end

  local schema = _M.schema(opts.schema)
  local data = {}

  if opts.path then
    local text, err = read_file(opts.path)
    if not text then
      return nil, "config: cannot read " .. err, "read_failed"
    end
    local decoded, derr = json.decode(text)
    if decoded == nil then
      return nil, "config: " .. opts.path .. ": " .. derr, "invalid_json"
    end
    if type(decoded) ~= "table" or json.is_array(decoded)
      or decoded[1] ~= nil then
      return nil, "config: " .. opts.path .. ": expected a JSON object",
        "invalid_config"
    end
    data = decoded
  elseif opts.data then
    data = copy(opts.data)
  end

  local lookup = opts.getenv or getenv
  local sources = {}
  local env_errors = {}

  for _, var in ipairs(_M.env_variables(schema, opts.env_prefix)) do
    local raw = lookup(var.name)
    if raw ~= nil then
      local value, err = from_env(var.field, raw)
      if value == nil then
        add_error(env_errors, var.path, err)
      elseif not set_path(data, var.path, value) then
        add_error(env_errors, var.path, "cannot override: a parent key is "
          .. "not an object")
      end
      sources[var.path] = var.name
    end
  end

  local conf, message, code, errors = _M.validate(schema, data, sources)
  if #env_errors > 0 then
    for _, e in ipairs(errors or {}) do
      env_errors[#env_errors + 1] = e
    end
    return nil, "invalid config:\n" .. format_errors(env_errors, sources),
      "invalid_config", env_errors
  end

  if not conf then
    return nil, "invalid config:\n" .. message, code, errors
  end

  return conf
end


return _M
