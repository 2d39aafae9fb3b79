-- Host names the edge serves: {slug}.{domain} for a machine and
-- {port}-{slug}.{domain} for one port of a machine. Matching ignores case
-- and the port of the Host header; the lowercased header, port kept, is
-- what the edge signs.
local tonumber = tonumber
local type = type
local slower = string.lower
local sfind = string.find
local smatch = string.match
local ssub = string.sub

local _M = {}


local function is_slug(s)
  return #s >= 3 and #s <= 40 and not sfind(s, "[^a-z0-9-]")
end


-- Splits a Host header value into the name and an optional port. Returns
-- nil for an IP literal in brackets, an empty name or a bad port.
local function split_host(value)
  if ssub(value, 1, 1) == "[" then
    return nil
  end
  local name, port = smatch(value, "^([^:]*):(%d+)$")
  if not name then
    if sfind(value, ":", 1, true) then
      return nil
    end
    name = value
  end
  if port and (#port > 5 or tonumber(port) > 65535) then
    return nil
  end
  -- A fully qualified name may end with a dot.
  if ssub(name, -1) == "." then
    name = ssub(name, 1, -2)
  end
  if name == "" then
    return nil
  end
  return name
end


-- Parses a Host header value against domain (lowercase, without a
-- leading dot). Returns a table { kind = "machine" or "port", slug,
-- port (a number, for kind "port"), host (the header lowercased, port
-- kept) }, or nil when the host is not one of the edge's.
--
-- A first label of the form DIGITS-REST is a port host when DIGITS is a
-- port from 1 to 65535 without a leading zero, so a machine whose slug
-- starts with such digits and a hyphen is reachable only through its
-- port hosts.
function _M.parse(value, domain)
  if type(value) ~= "string" or value == "" then
    return nil
  end
  local lower = slower(value)
  local name = split_host(lower)
  if not name then
    return nil
  end

  local suffix = "." .. domain
  if #name <= #suffix or ssub(name, -#suffix) ~= suffix then
    return nil
  end
  local label = ssub(name, 1, #name - #suffix)
  if sfind(label, ".", 1, true) then
    return nil
  end

  local digits, rest = smatch(label, "^(%d+)%-(.+)$")
  if digits and #digits <= 5 and ssub(digits, 1, 1) ~= "0" then
    local port = tonumber(digits)
    if port >= 1 and port <= 65535 then
      if not is_slug(rest) then
        return nil
      end
      return { kind = "port", slug = rest, port = port, host = lower }
    end
  end

  if not is_slug(label) then
    return nil
  end
  return { kind = "machine", slug = label, host = lower }
end


-- Results of parse by Host value, for one domain at a time, for hosts of
-- the edge only. A value always parses to the same result,
-- so the map only spares the patterns. It keeps at most LOOKUP_MAX values
-- and is emptied when full, so that made-up host names cost memory only
-- up to that bound.
local LOOKUP_MAX = 1024
local parsed = {}
local parsed_count = 0
local parsed_domain = nil


-- Returns parse(value, domain) through the map above. The table returned
-- is shared by every request with the same Host, so callers must not
-- change it.
function _M.lookup(value, domain)
  if domain ~= parsed_domain or parsed_count >= LOOKUP_MAX then
    parsed = {}
    parsed_count = 0
    parsed_domain = domain
  end
  if type(value) ~= "string" then
    return nil
  end
  local host = parsed[value]
  if host == nil then
    host = _M.parse(value, domain)
    -- Only hosts of the edge are kept: a client can send any number of
    -- made-up ones, up to the head limit each, before any credential.
    if host then
      parsed[value] = host
      parsed_count = parsed_count + 1
    end
  end
  return host
end


return _M
