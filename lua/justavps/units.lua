-- Parsing and formatting of durations (seconds) and byte sizes.
local type = type
local tonumber = tonumber
local tostring = tostring
local floor = math.floor
local format = string.format
local smatch = string.match
local gmatch = string.gmatch
local lower = string.lower
local ipairs = ipairs
local huge = math.huge

local _M = {}

local duration_units = {
  ms = 0.001,
  s = 1,
  m = 60,
  h = 3600,
  d = 86400,
}

-- Binary multiples: 1k = 1024 bytes.
local size_units = {
  [""] = 1,
  b = 1,
  k = 1024,
  kb = 1024,
  kib = 1024,
  m = 1024 ^ 2,
  mb = 1024 ^ 2,
  mib = 1024 ^ 2,
  g = 1024 ^ 3,
  gb = 1024 ^ 3,
  gib = 1024 ^ 3,
}


-- Parses "90", "1.5", "500ms", "30s", "5m", "1h30m", "2d" into seconds.
-- A number is taken as seconds. Returns seconds, or nil, message.
function _M.parse_duration(v)
  if type(v) == "number" then
    if v ~= v or v < 0 or v == huge then
      return nil, "expected a non-negative duration"
    end
    return v
  end

  if type(v) ~= "string" then
    return nil, "expected a duration"
  end

  local n = tonumber(v)
  if n and smatch(v, "^%s*[%d.]+%s*$") then
    return n
  end

  local s = lower(v)
  if not smatch(s, "^[%d.]+%a+[%d.%a]*$") then
    return nil, "expected a duration such as 30s, 5m, 1h30m or 500ms"
  end

  local total = 0
  local consumed = 0
  for number, unit in gmatch(s, "([%d.]+)(%a+)") do
    local value = tonumber(number)
    local scale = duration_units[unit]
    if not value or not scale then
      return nil, "expected a duration such as 30s, 5m, 1h30m or 500ms"
    end
    total = total + value * scale
    consumed = consumed + #number + #unit
  end

  if consumed ~= #s then
    return nil, "expected a duration such as 30s, 5m, 1h30m or 500ms"
  end

  return total
end


-- Parses "4096", "64k", "16M", "1.5GiB" into a whole number of bytes.
-- Returns bytes, or nil, message.
function _M.parse_size(v)
  if type(v) == "number" then
    if v ~= v or v < 0 or v ~= floor(v) or v == huge then
      return nil, "expected a non-negative whole number of bytes"
    end
    return v
  end

  if type(v) ~= "string" then
    return nil, "expected a size"
  end

  local number, unit = smatch(v, "^%s*([%d.]+)%s*(%a*)%s*$")
  local value = tonumber(number)
  local scale = unit and size_units[lower(unit)]
  if not value or not scale then
    return nil, "expected a size such as 4096, 64k, 16M or 1G"
  end

  local bytes = value * scale
  if bytes ~= floor(bytes) then
    return nil, "expected a whole number of bytes"
  end

  return bytes
end


-- Formats seconds as the shortest of "500ms", "30s", "5m", "1h30m".
function _M.format_duration(seconds)
  if seconds ~= floor(seconds) then
    if seconds < 1 then
      return format("%gms", seconds * 1000)
    end
    return format("%gs", seconds)
  end

  if seconds == 0 or seconds % 60 ~= 0 then
    return tostring(seconds) .. "s"
  end

  local out = ""
  local rest = seconds
  for _, u in ipairs({ { "d", 86400 }, { "h", 3600 }, { "m", 60 } }) do
    if rest >= u[2] then
      out = out .. floor(rest / u[2]) .. u[1]
      rest = rest % u[2]
    end
  end
  return out
end


-- Formats bytes with the largest binary unit that divides it exactly.
function _M.format_size(bytes)
  for _, u in ipairs({ { "G", 1024 ^ 3 }, { "M", 1024 ^ 2 }, { "k", 1024 } }) do
    if bytes >= u[2] and bytes % u[2] == 0 then
      return tostring(bytes / u[2]) .. u[1]
    end
  end
  return tostring(bytes)
end


return _M
