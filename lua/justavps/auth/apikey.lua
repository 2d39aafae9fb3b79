-- API keys for scripts and agents: `sk_live_` followed by 43 random
-- characters of [A-Za-z0-9_-] (258 bits), sent as
-- `Authorization: Bearer sk_live_...`.
--
--   local new = apikey.generate()   -- show new.key once, store new.hash
--   local prefix, key = apikey.parse(headers["authorization"])
--   if key and apikey.verify(key, row.key_hash) then ... end
--
-- The stored hash is a plain SHA-256, not a password KDF: a key has 258
-- random bits, so nobody can search the key space from a leaked hash, and
-- a fast hash keeps the per-request check cheap.
local core = require("justavps.core")

local crypto = core.crypto
local sha256 = crypto.sha256
local hex_encode = crypto.hex_encode
local random_token = crypto.random_token
local constant_time_equal = crypto.constant_time_equal

local type = type
local error = error
local ipairs = ipairs
local tostring = tostring
local format = string.format
local sfind = string.find
local slower = string.lower
local ssub = string.sub
local smatch = string.match
local concat = table.concat

local _M = {}

_M.KEY_PREFIX = "sk_live_"
-- Random characters after KEY_PREFIX, 6 bits each.
_M.RANDOM_LENGTH = 43
_M.KEY_LENGTH = #_M.KEY_PREFIX + _M.RANDOM_LENGTH
-- Characters shown in lists and logs: KEY_PREFIX and 4 random characters.
-- Those 24 bits tell a user's keys apart but collide across many keys, so
-- look keys up by hash, not by prefix.
_M.DISPLAY_LENGTH = 12

-- Scopes in their canonical order. No scope implies another: a key with
-- write but not read cannot read.
_M.SCOPES = { "read", "write", "delete", "exec", "proxy" }

local known_scopes = {}
for i, scope in ipairs(_M.SCOPES) do
  known_scopes[scope] = i
end

local KEY_PATTERN = "^" .. _M.KEY_PREFIX .. ("[A-Za-z0-9_-]"):rep(
  _M.RANDOM_LENGTH) .. "$"

-- Maximum length of an Authorization value in bytes. parse rejects a
-- longer value before any pattern matching.
local MAX_HEADER_LENGTH = 1024


local function fail(message, code)
  return nil, message, code
end


-- Returns the lowercase hex SHA-256 of key, the form stored in the
-- database.
function _M.hash(key)
  if type(key) ~= "string" then
    error("apikey.hash: key must be a string, got " .. type(key), 2)
  end
  return hex_encode(sha256(key))
end


-- Creates a key. Returns { key, prefix, hash }, or nil, message, code
-- when the random generator fails. Show key to the user once and store
-- only prefix and hash.
function _M.generate()
  local random, message, code = random_token(_M.RANDOM_LENGTH)
  if not random then
    return fail(message, code)
  end
  local key = _M.KEY_PREFIX .. random
  return {
    key = key,
    prefix = ssub(key, 1, _M.DISPLAY_LENGTH),
    hash = _M.hash(key),
  }
end


-- Checks the format of a key. Returns its display prefix and the key, or
-- nil, message, "invalid_api_key". The message never contains the key.
function _M.parse_key(key)
  if type(key) ~= "string" then
    return fail("API key is missing", "invalid_api_key")
  end
  if ssub(key, 1, #_M.KEY_PREFIX) ~= _M.KEY_PREFIX then
    return fail("API key must start with " .. _M.KEY_PREFIX,
      "invalid_api_key")
  end
  if #key ~= _M.KEY_LENGTH then
    return fail(format("API key must be %d characters, got %d",
      _M.KEY_LENGTH, #key), "invalid_api_key")
  end
  if not sfind(key, KEY_PATTERN) then
    return fail("API key contains a character outside [A-Za-z0-9_-]",
      "invalid_api_key")
  end
  return ssub(key, 1, _M.DISPLAY_LENGTH), key
end


-- Parses an Authorization header value of the form `Bearer <key>`.
-- The scheme is case-insensitive and may be followed by one or more
-- spaces (RFC 7235, section 2.1), and whitespace around the whole value
-- is ignored. Returns prefix, key, or nil, message, code:
--   missing_authorization  no header, or an empty one
--   unsupported_scheme     a scheme other than Bearer, such as Basic
--   invalid_api_key        a Bearer token that is not a well-formed key
function _M.parse(header_value)
  if header_value == nil then
    return fail("Authorization header is missing", "missing_authorization")
  end
  if type(header_value) ~= "string" then
    error("apikey.parse: header value must be a string or nil, got "
      .. type(header_value), 2)
  end
  if #header_value > MAX_HEADER_LENGTH then
    return fail("Authorization header is longer than " .. MAX_HEADER_LENGTH
      .. " bytes", "invalid_api_key")
  end

  local value = smatch(header_value, "^[ \t]*(.-)[ \t]*$")
  if value == "" then
    return fail("Authorization header is empty", "missing_authorization")
  end

  local scheme, credentials = smatch(value, "^([^ ]+) +(.+)$")
  if not scheme then
    scheme = value
  end
  if slower(scheme) ~= "bearer" then
    return fail("Authorization scheme must be Bearer", "unsupported_scheme")
  end
  if not credentials then
    return fail("Bearer token is missing", "invalid_api_key")
  end
  return _M.parse_key(credentials)
end


-- Returns true when key hashes to stored_hash (lowercase hex). The
-- comparison takes the same time wherever the hashes differ.
function _M.verify(key, stored_hash)
  if type(key) ~= "string" or type(stored_hash) ~= "string" then
    return false
  end
  return constant_time_equal(_M.hash(key), stored_hash)
end


-- Quotes a caller's scope for an error message, cut short.
local function quote(value)
  local text = tostring(value)
  if #text > 40 then
    text = ssub(text, 1, 40) .. "..."
  end
  return format("%q", text)
end


-- Validates a requested list of scopes. Returns a new list without
-- duplicates, in the order of SCOPES, or nil, message, code:
--   invalid_scope  an entry that is not a known scope; the message names it
--   empty_scopes   no scope at all, or scopes is not a list
function _M.validate_scopes(scopes)
  if type(scopes) ~= "table" or #scopes == 0 then
    return fail("at least one scope is required, from: "
      .. concat(_M.SCOPES, ", "), "empty_scopes")
  end

  local wanted = {}
  for _, scope in ipairs(scopes) do
    if not known_scopes[scope] then
      return fail("unknown scope " .. quote(scope) .. "; expected one of: "
        .. concat(_M.SCOPES, ", "), "invalid_scope")
    end
    wanted[scope] = true
  end

  local out = {}
  for _, scope in ipairs(_M.SCOPES) do
    if wanted[scope] then
      out[#out + 1] = scope
    end
  end
  return out
end


-- Returns true when the list granted contains the scope needed. Exact
-- match only: no scope implies another.
function _M.has_scope(granted, needed)
  if type(granted) ~= "table" then
    return false
  end
  for _, scope in ipairs(granted) do
    if scope == needed then
      return true
    end
  end
  return false
end


return _M
