-- The edge-to-broker request signature, version 1: the eight
-- X-JustAVPS-* headers, the string they sign and the formats of their
-- values. The edge signs with sign(); the broker reads the headers with
-- parse() and checks them with verify(). Both sides share this module so
-- the wire form lives in one place.
--
-- The signed string is these lines joined by "\n", without a trailing
-- newline: JUSTAVPS-HMAC-SHA256-V1, method, host (the Host header
-- lowercased, port kept), request-target (byte for byte), target IP,
-- target port, slug, client IP, timestamp, nonce, broker id. The key is
-- the broker's shared secret and the signature is "v1=" followed by the
-- lowercase hex HMAC-SHA256. Bodies are not signed.
local core = require("justavps.core")
local cidr = require("justavps.cidr")

local ipairs = ipairs
local tonumber = tonumber
local tostring = tostring
local type = type
local error = error
local floor = math.floor
local slower = string.lower
local sfind = string.find
local ssub = string.sub
local sbyte = string.byte
local tnew = require("table.new")

local crypto = core.crypto

local _M = {}

_M.PREFIX = "JUSTAVPS-HMAC-SHA256-V1"

-- The eight headers in signing order, with the field name each fills.
_M.HEADERS = {
  { field = "target_ip", name = "X-JustAVPS-Target-IP" },
  { field = "target_port", name = "X-JustAVPS-Target-Port" },
  { field = "slug", name = "X-JustAVPS-Slug" },
  { field = "client_ip", name = "X-JustAVPS-Client-IP" },
  { field = "timestamp", name = "X-JustAVPS-Timestamp" },
  { field = "nonce", name = "X-JustAVPS-Nonce" },
  { field = "broker_id", name = "X-JustAVPS-Broker" },
  { field = "signature", name = "X-JustAVPS-Signature" },
}

-- Lower-case names of the eight headers, as a set: what the edge drops
-- from client requests and the broker drops before forwarding.
_M.HEADER_SET = {}
for _, h in ipairs(_M.HEADERS) do
  _M.HEADER_SET[slower(h.name)] = true
end

-- Nonces are 16 to 64 characters; random_token gives 6 bits each.
local NONCE_LENGTH = 32

-- Longest accepted IP literal: a full IPv6 address with an IPv4 tail has
-- 45 characters.
local MAX_IP_LENGTH = 45

-- Longest accepted timestamp: Unix seconds fit in 12 digits until the
-- year 33658.
local MAX_TIMESTAMP_DIGITS = 12


-- Results of check_ip_literal by string. The broker checks two addresses
-- per request, mostly the same few, and cidr.parse costs more than a
-- lookup. The map keeps at most IP_CHECKS_MAX strings and is emptied
-- when full.
local IP_CHECKS_MAX = 4096
local ip_checks = {}
local ip_check_count = 0


local function check_ip_literal(s)
  if #s == 0 or #s > MAX_IP_LENGTH then
    return false
  end
  if sfind(s, "^[%d.]+$") then
    -- "010.0.0.1" would be ambiguous (octal to some parsers), so a
    -- leading zero is invalid.
    if sfind(s, "^0%d") or sfind(s, "%.0%d") then
      return false
    end
    return cidr.parse(s) ~= nil
  end
  if not sfind(s, ":", 1, true) or sfind(s, "[^%x:.]") then
    return false
  end
  return cidr.parse(s) ~= nil
end


-- Returns true for an IPv4 literal in dotted decimal without leading
-- zeros, or an IPv6 literal without a zone id.
local function is_ip_literal(s)
  -- Checked before the map, so that no value too long to be an address
  -- is ever stored: the broker runs this before the signature.
  if #s == 0 or #s > MAX_IP_LENGTH then
    return false
  end
  local ok = ip_checks[s]
  if ok == nil then
    ok = check_ip_literal(s)
    if ip_check_count >= IP_CHECKS_MAX then
      ip_checks = {}
      ip_check_count = 0
    end
    ip_checks[s] = ok
    ip_check_count = ip_check_count + 1
  end
  return ok
end

_M.is_ip_literal = is_ip_literal


-- Byte sets for the format checks below, indexed by byte value. The
-- checks loop over string.byte, which LuaJIT compiles, where a pattern
-- with a character class runs in the interpreter at some 40 instructions
-- a byte.
local function byte_set(chars)
  local set = {}
  for b = 0, 255 do
    set[b] = false
  end
  for i = 1, #chars do
    set[sbyte(chars, i)] = true
  end
  return set
end

local DIGITS = "0123456789"
local LOWER = "abcdefghijklmnopqrstuvwxyz"
local UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
local DIGIT_BYTES = byte_set(DIGITS)
local SLUG_BYTES = byte_set(LOWER .. DIGITS .. "-")
local NONCE_BYTES = byte_set(UPPER .. LOWER .. DIGITS .. "_-")
local BROKER_ID_BYTES = byte_set(UPPER .. LOWER .. DIGITS .. "._-")
local HEX_BYTES = byte_set(DIGITS .. "abcdef")


-- Returns true when s has a byte at position first and every byte from
-- there on is in set.
local function only_bytes(s, set, first)
  local n = #s
  if n < first then
    return false
  end
  for i = first, n do
    if not set[sbyte(s, i)] then
      return false
    end
  end
  return true
end


local function is_decimal(s, max_digits)
  return #s <= max_digits and only_bytes(s, DIGIT_BYTES, 1)
    and (s == "0" or sbyte(s, 1) ~= 48)
end


-- Format checks per field: each returns true when the value is well
-- formed.
local CHECKS = {
  target_ip = is_ip_literal,
  target_port = function(s)
    if not is_decimal(s, 5) then
      return false
    end
    local n = tonumber(s)
    return n >= 1 and n <= 65535
  end,
  slug = function(s)
    return #s >= 3 and #s <= 40 and only_bytes(s, SLUG_BYTES, 1)
  end,
  client_ip = is_ip_literal,
  timestamp = function(s)
    return is_decimal(s, MAX_TIMESTAMP_DIGITS)
  end,
  nonce = function(s)
    return #s >= 16 and #s <= 64 and only_bytes(s, NONCE_BYTES, 1)
  end,
  broker_id = function(s)
    return #s >= 1 and #s <= 64 and only_bytes(s, BROKER_ID_BYTES, 1)
  end,
  signature = function(s)
    return #s == 67 and ssub(s, 1, 3) == "v1=" and only_bytes(s, HEX_BYTES, 4)
  end,
}

local FORMATS = {
  target_ip = "an IPv4 or IPv6 literal",
  target_port = "a decimal port 1-65535 without leading zeros",
  slug = "3 to 40 characters of [a-z0-9-]",
  client_ip = "an IPv4 or IPv6 literal",
  timestamp = "Unix seconds in decimal",
  nonce = "16 to 64 characters of [A-Za-z0-9_-]",
  broker_id = "1 to 64 characters of [A-Za-z0-9._-]",
  signature = "v1= followed by 64 lowercase hex digits",
}


-- Builds the string to sign from fields: method, host, target,
-- target_ip, target_port, slug, client_ip, timestamp, nonce, broker_id
-- (strings; the port and timestamp may be numbers). The host is
-- lowercased here, so either side may pass it as received.
function _M.string_to_sign(f)
  return _M.PREFIX .. "\n" .. f.method .. "\n" .. slower(f.host) .. "\n"
    .. f.target .. "\n" .. f.target_ip .. "\n" .. tostring(f.target_port)
    .. "\n" .. f.slug .. "\n" .. f.client_ip .. "\n" .. tostring(f.timestamp)
    .. "\n" .. f.nonce .. "\n" .. f.broker_id
end


-- Returns the hex HMAC-SHA256 of the string to sign under secret, or
-- nil when OpenSSL failed. Same as hashing string_to_sign(f), without
-- building it.
local function signature_hex(secret, method, host, target, target_ip,
                             target_port, slug, client_ip, timestamp, nonce,
                             broker_id)
  return (crypto.hmac_sha256_join(secret, "\n", _M.PREFIX, method,
    slower(host), target, target_ip, target_port, slug, client_ip,
    timestamp, nonce, broker_id))
end


-- Returns the signature header value for fields under secret.
function _M.signature(secret, f)
  local hex = signature_hex(secret, f.method, f.host, f.target, f.target_ip,
    tostring(f.target_port), f.slug, f.client_ip, tostring(f.timestamp),
    f.nonce, f.broker_id)
  if not hex then
    error("edge_sig: HMAC-SHA256 failed", 2)
  end
  return "v1=" .. hex
end


-- Random characters for nonces, drawn NONCE_BATCH nonces at a time so
-- that a request does not pay for a call into the random generator.
-- Each character is uniform over [A-Za-z0-9_-], and no character is used
-- twice.
local NONCE_BATCH = 64
local nonce_pool = ""
local nonce_pos = 1


local function next_nonce()
  if nonce_pos + NONCE_LENGTH - 1 > #nonce_pool then
    local pool, err = crypto.random_token(NONCE_LENGTH * NONCE_BATCH)
    if not pool then
      error("edge_sig.sign: no random nonce: " .. tostring(err), 4)
    end
    nonce_pool = pool
    nonce_pos = 1
  end
  local nonce = ssub(nonce_pool, nonce_pos, nonce_pos + NONCE_LENGTH - 1)
  nonce_pos = nonce_pos + NONCE_LENGTH
  return nonce
end


-- Signs fields under secret. Returns the timestamp, the nonce and the
-- target port as strings, and the hex MAC.
local function sign_fields(secret, fields)
  local timestamp = tostring(fields.timestamp or floor(core.time()))
  local nonce = fields.nonce or next_nonce()
  local port = tostring(fields.target_port)
  local hex = signature_hex(secret, fields.method, fields.host,
    fields.target, fields.target_ip, port, fields.slug, fields.client_ip,
    timestamp, nonce, fields.broker_id)
  if not hex then
    error("edge_sig: HMAC-SHA256 failed", 3)
  end
  return timestamp, nonce, port, hex
end


-- Signs a request for the edge. fields as for string_to_sign; timestamp
-- defaults to now and nonce to a fresh random token. Returns a table of
-- the eight header names to values, for the edge to set after it has
-- dropped any of them that the client sent.
function _M.sign(secret, fields)
  if type(secret) ~= "string" or secret == "" then
    error("edge_sig.sign: secret must be a non-empty string", 2)
  end
  local timestamp, nonce, port, hex = sign_fields(secret, fields)
  return {
    ["X-JustAVPS-Target-IP"] = fields.target_ip,
    ["X-JustAVPS-Target-Port"] = port,
    ["X-JustAVPS-Slug"] = fields.slug,
    ["X-JustAVPS-Client-IP"] = fields.client_ip,
    ["X-JustAVPS-Timestamp"] = timestamp,
    ["X-JustAVPS-Nonce"] = nonce,
    ["X-JustAVPS-Broker"] = fields.broker_id,
    ["X-JustAVPS-Signature"] = "v1=" .. hex,
  }
end


-- Signs like sign, and returns the eight headers in signing order as one
-- string of "Name: value\r\n" lines, the extra_headers of
-- req:forward_head. One string costs less to build and to copy into the
-- forwarded head than a table of eight entries.
function _M.sign_lines(secret, fields)
  if type(secret) ~= "string" or secret == "" then
    error("edge_sig.sign_lines: secret must be a non-empty string", 2)
  end
  local timestamp, nonce, port, hex = sign_fields(secret, fields)
  return "X-JustAVPS-Target-IP: " .. fields.target_ip
    .. "\r\nX-JustAVPS-Target-Port: " .. port
    .. "\r\nX-JustAVPS-Slug: " .. fields.slug
    .. "\r\nX-JustAVPS-Client-IP: " .. fields.client_ip
    .. "\r\nX-JustAVPS-Timestamp: " .. timestamp
    .. "\r\nX-JustAVPS-Nonce: " .. nonce
    .. "\r\nX-JustAVPS-Broker: " .. fields.broker_id
    .. "\r\nX-JustAVPS-Signature: v1=" .. hex .. "\r\n"
end


-- Reads the eight headers and Host from list ({{name, value}, ...} as
-- req:header_list() returns it). Returns a table of fields (strings,
-- with host lowercased) or nil, code, message, where code is
-- "missing_header" or "invalid_header" and the message names the header.
-- A header sent more than once is invalid, because the two sides could
-- read different copies.
function _M.parse(list)
  local values, counts = {}, {}
  for _, pair in ipairs(list) do
    local lname = slower(pair[1])
    counts[lname] = (counts[lname] or 0) + 1
    if counts[lname] == 1 then
      values[lname] = pair[2]
    end
  end

  local f = {}
  for _, h in ipairs(_M.HEADERS) do
    local lname = slower(h.name)
    local v = values[lname]
    if v == nil then
      return nil, "missing_header", "missing header " .. h.name
    end
    if counts[lname] > 1 then
      return nil, "invalid_header", "header " .. h.name
        .. " was sent more than once"
    end
    if not CHECKS[h.field](v) then
      return nil, "invalid_header", "invalid header " .. h.name
        .. ": expected " .. FORMATS[h.field]
    end
    f[h.field] = v
  end

  local host = values["host"]
  if host == nil or host == "" then
    return nil, "missing_header", "missing header Host"
  end
  if counts["host"] > 1 then
    return nil, "invalid_header", "header Host was sent more than once"
  end
  f.host = slower(host)
  return f
end


-- The eight header names in signing order, then Host, for
-- req:header_values.
local REQUEST_NAMES
do
  local list = {}
  for i, h in ipairs(_M.HEADERS) do
    list[i] = h.name
  end
  list[#list + 1] = "Host"
  REQUEST_NAMES = core.http.header_names(list)
end
local HOST_INDEX = #_M.HEADERS + 1


-- Reads the eight headers and Host from the server request req as parse
-- reads them from a header list, with the same results, but looks the
-- names up in the parsed head in one call instead of building the list.
function _M.parse_request(req)
  -- header_values gives nil for a missing header and false for one sent
  -- more than once.
  local values = { req:header_values(REQUEST_NAMES) }
  -- Sized for the fields below and the method and target the broker
  -- adds, so that it never grows.
  local f = tnew(0, 12)
  for i, h in ipairs(_M.HEADERS) do
    local v = values[i]
    if v == nil then
      return nil, "missing_header", "missing header " .. h.name
    end
    if v == false then
      return nil, "invalid_header", "header " .. h.name
        .. " was sent more than once"
    end
    if not CHECKS[h.field](v) then
      return nil, "invalid_header", "invalid header " .. h.name
        .. ": expected " .. FORMATS[h.field]
    end
    f[h.field] = v
  end

  local host = values[HOST_INDEX]
  if host == nil or host == "" then
    return nil, "missing_header", "missing header Host"
  end
  if host == false then
    return nil, "invalid_header", "header Host was sent more than once"
  end
  f.host = slower(host)
  return f
end


-- Returns true when signature (the header value) matches fields under
-- secret, comparing in constant time.
function _M.verify(secret, fields, signature)
  return crypto.constant_time_equal(_M.signature(secret, fields), signature)
end


return _M
