-- JSON over lua-cjson 2.1 (Debian's build), with explicit arrays, decode
-- limits and stable error codes.
--
-- cjson 2.1 cannot tell an empty array from an empty object, so an empty
-- Lua table encodes as {} unless it carries json.array_mt, and decode marks
-- every empty JSON array it returns with that metatable. Tables are walked
-- in Lua to reject sparse arrays, mixed keys, cycles and unsupported types
-- with a code, while strings and numbers are still encoded by cjson.
local cjson = require("cjson.safe")

local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local tostring = tostring
local getmetatable = getmetatable
local setmetatable = setmetatable
local concat = table.concat
local sort = table.sort
local floor = math.floor
local abs = math.abs
local format = string.format
local huge = math.huge
local sfind = string.find
local sgsub = string.gsub
local ssub = string.sub
local smatch = string.match
local random = math.random

local _M = {}

_M.null = cjson.null

-- Default limits of decode (and MAX_DEPTH of encode). Callers may pass
-- tighter ones per call.
_M.MAX_DEPTH = 64
_M.MAX_SIZE = 8 * 1024 * 1024

-- Arrays: a table whose metatable has __jsontype = "array" (as this one,
-- the convention dkjson also uses) always encodes as a JSON array.
_M.array_mt = { __jsontype = "array" }

local array_mt = _M.array_mt

-- One cjson instance per depth limit, created on demand.
local decoders = {}

local scalar = cjson.new()
scalar.encode_invalid_numbers(false)
scalar.encode_number_precision(14)


local function decoder(depth)
  local d = decoders[depth]
  if d then
    return d
  end

  d = cjson.new()
  d.decode_max_depth(depth)
  d.decode_invalid_numbers(false)
  decoders[depth] = d
  return d
end


-- Marks t as a JSON array and returns it.
function _M.array(t)
  if t == nil then
    t = {}
  end

  if type(t) ~= "table" then
    error("json.array: expected a table, got " .. type(t), 2)
  end

  return setmetatable(t, array_mt)
end


local function is_array(t)
  local mt = getmetatable(t)
  return mt ~= nil and mt.__jsontype == "array"
end


function _M.is_array(t)
  return type(t) == "table" and is_array(t)
end


-- A shared, read-only empty array.
_M.empty_array = setmetatable({}, {
  __jsontype = "array",
  __newindex = function()
    error("json.empty_array is read-only; use json.array() for a new one", 2)
  end,
})


local function fail(message, code)
  return nil, message, code
end


local function encode_string(s)
  local out = scalar.encode(s)
  if sfind(s, "/", 1, true) then
    -- cjson 2.1 escapes "/" as "\/". Both forms are valid JSON and the
    -- plain one is easier to read. The replacement cannot hit an escaped
    -- backslash, because cjson writes a literal backslash as two.
    out = sgsub(out, "\\/", "/")
  end
  return out
end


local encode_value


-- Returns n when t's keys are exactly 1..n, 0 for an empty table, or nil,
-- message, code when the table mixes key kinds or has holes.
local function array_length(t, path)
  local n, max = 0, 0
  local has_string = false

  for k in pairs(t) do
    local kt = type(k)
    if kt == "number" then
      if k ~= floor(k) or k < 1 or k == huge then
        return fail(path .. ": table key " .. tostring(k)
          .. " is not a positive integer", "invalid_key")
      end
      n = n + 1
      if k > max then
        max = k
      end
    elseif kt == "string" then
      has_string = true
    else
      return fail(path .. ": table key of type " .. kt
        .. " cannot be encoded", "invalid_key")
    end
  end

  if n == 0 then
    return 0, has_string
  end

  if has_string then
    return fail(path .. ": table mixes integer and string keys",
      "mixed_table")
  end

  if max ~= n then
    return fail(path .. ": sparse array: " .. n .. " elements, highest index "
      .. max .. "; fill holes with json.null", "sparse_array")
  end

  return n, false
end


local function encode_table(t, buf, depth, seen, path)
  if seen[t] then
    return fail(path .. ": circular reference", "circular_reference")
  end

  if depth > _M.MAX_DEPTH then
    return fail(path .. ": nested deeper than " .. _M.MAX_DEPTH .. " levels",
      "too_deep")
  end

  local n, has_string, length_code = array_length(t, path)
  if n == nil then
    return nil, has_string, length_code
  end

  local array = is_array(t)

  if array and has_string then
    return fail(path .. ": array has string keys", "mixed_table")
  end

  seen[t] = true

  if n > 0 or array then
    buf[#buf + 1] = "["
    for i = 1, n do
      if i > 1 then
        buf[#buf + 1] = ","
      end
      local ok, err, code = encode_value(t[i], buf, depth + 1, seen,
        path .. "[" .. i .. "]")
      if not ok then
        return nil, err, code
      end
    end
    buf[#buf + 1] = "]"
    seen[t] = nil
    return true
  end

  -- Objects are written in sorted key order so output is stable.
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  sort(keys)

  buf[#buf + 1] = "{"
  for i, k in ipairs(keys) do
    if i > 1 then
      buf[#buf + 1] = ","
    end
    buf[#buf + 1] = encode_string(k)
    buf[#buf + 1] = ":"
    local ok, err, code = encode_value(t[k], buf, depth + 1, seen,
      path .. "." .. k)
    if not ok then
      return nil, err, code
    end
  end
  buf[#buf + 1] = "}"
  seen[t] = nil
  return true
end


function encode_value(v, buf, depth, seen, path)
  local vt = type(v)

  if vt == "string" then
    buf[#buf + 1] = encode_string(v)
    return true
  end

  if vt == "number" then
    if v == floor(v) and abs(v) < 2 ^ 53 then
      -- Integers keep every digit; cjson would switch to %.14g.
      buf[#buf + 1] = format("%d", v)
      return true
    end
    local out = scalar.encode(v)
    if not out then
      return fail(path .. ": " .. tostring(v) .. " is not a finite number",
        "invalid_number")
    end
    buf[#buf + 1] = out
    return true
  end

  if vt == "boolean" then
    buf[#buf + 1] = v and "true" or "false"
    return true
  end

  if v == nil or v == cjson.null then
    buf[#buf + 1] = "null"
    return true
  end

  if vt == "table" then
    return encode_table(v, buf, depth, seen, path)
  end

  return fail(path .. ": values of type " .. vt .. " cannot be encoded",
    "unsupported_type")
end


-- Encodes v as JSON. Returns the string, or nil, message, code where code
-- is one of invalid_key, mixed_table, sparse_array, circular_reference,
-- too_deep, invalid_number, unsupported_type.
function _M.encode(v)
  local buf = {}
  local ok, err, code = encode_value(v, buf, 1, {}, "$")
  if not ok then
    return nil, "json encode: " .. err, code
  end
  return concat(buf)
end


-- Marker for empty arrays while decoding: a random string that no input
-- can be expected to contain, replaced by a fresh json.array() afterwards.
local EMPTY_MARK = "\0justavps-empty-array-" .. tostring(random(1, 2 ^ 30))
  .. "-" .. tostring({}):sub(8) .. "\0"
local EMPTY_JSON = encode_string(EMPTY_MARK)


-- Rewrites every empty array outside string literals into EMPTY_JSON.
-- Returns nil when the text has none.
local function mark_empty_arrays(s)
  if not sfind(s, "%[[ \t\r\n]*%]") then
    return nil
  end

  local out = {}
  local pos = 1
  local len = #s

  while pos <= len do
    local at = sfind(s, "[\"%[]", pos)
    if not at then
      break
    end

    if ssub(s, at, at) == "\"" then
      -- Skip the string literal, honouring backslash escapes.
      local i = at + 1
      while true do
        local q = sfind(s, "[\"\\]", i)
        if not q then
          i = len + 1
          break
        end
        if ssub(s, q, q) == "\\" then
          i = q + 2
        else
          i = q + 1
          break
        end
      end
      out[#out + 1] = ssub(s, pos, i - 1)
      pos = i
    else
      local close = smatch(s, "^%[[ \t\r\n]*()%]", at)
      if close then
        out[#out + 1] = ssub(s, pos, at - 1)
        out[#out + 1] = EMPTY_JSON
        pos = close + 1
      else
        out[#out + 1] = ssub(s, pos, at)
        pos = at + 1
      end
    end
  end

  out[#out + 1] = ssub(s, pos)
  return concat(out)
end


local function unmark(v)
  if v == EMPTY_MARK then
    return setmetatable({}, array_mt)
  end

  if type(v) == "table" then
    for k, x in next, v do
      if x == EMPTY_MARK or type(x) == "table" then
        v[k] = unmark(x)
      end
    end
  end

  return v
end


-- Decodes s. opts.max_depth and opts.max_size (bytes) override the module
-- defaults. Returns the value, or nil, message, code where code is
-- invalid_json, too_deep or too_large. Messages keep cjson's "at character
-- N" position.
function _M.decode(s, opts)
  if type(s) ~= "string" then
    error("json.decode: expected a string, got " .. type(s), 2)
  end

  local max_size = opts and opts.max_size or _M.MAX_SIZE
  local max_depth = opts and opts.max_depth or _M.MAX_DEPTH

  if #s > max_size then
    return nil, "json decode: document of " .. #s
      .. " bytes exceeds the limit of " .. max_size, "too_large"
  end

  local d = decoder(max_depth)
  local marked = mark_empty_arrays(s)
  local v, err = d.decode(marked or s)

  if err ~= nil then
    if marked then
      -- Positions refer to the rewritten text: report the original's.
      local _, original = d.decode(s)
      err = original or err
    end
    local code = "invalid_json"
    if sfind(err, "too many nested", 1, true) then
      code = "too_deep"
    end
    return nil, "json decode: " .. err, code
  end

  if marked then
    v = unmark(v)
  end

  return v
end


return _M
