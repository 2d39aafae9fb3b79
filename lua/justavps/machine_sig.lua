-- Machine-token signatures: the daemon's internal API, the daemon's calls
-- to the platform (heartbeats) and the platform's check of those calls.
--
-- A signed call carries three headers. The signature is
-- "v1=" .. hex(HMAC-SHA256(token, S)), where S joins these fields with "\n":
--   JUSTAVPS-MACHINE-V1, method, request-target, timestamp (Unix seconds),
--   nonce, lowercase hex SHA-256 of the body (of "" when there is none).
-- The receiver accepts a timestamp within WINDOW seconds of its clock and
-- rejects a nonce it has seen within its nonce cache's TTL.
local core = require("justavps.core")

local crypto = core.crypto
local concat = table.concat
local floor = math.floor
local tostring = tostring
local tonumber = tonumber
local type = type
local error = error
local sfind = string.find

local _M = {}

_M.HEADER_TIMESTAMP = "X-JustAVPS-Machine-Timestamp"
_M.HEADER_NONCE = "X-JustAVPS-Machine-Nonce"
_M.HEADER_SIGNATURE = "X-JustAVPS-Machine-Signature"

_M.PREFIX = "JUSTAVPS-MACHINE-V1"

-- Seconds a timestamp may differ from the receiver's clock, either way.
_M.WINDOW = 30

-- A nonce cache for verify must remember a nonce at least as long as a
-- timestamp stays acceptable: a call stamped WINDOW seconds ahead is valid
-- until 2 * WINDOW seconds after it arrives.
_M.NONCE_TTL = 120

-- HTTP status for each failure code of verify.
_M.STATUS = {
  missing_signature = 401,
  bad_signature = 401,
  stale_timestamp = 401,
  replayed_nonce = 401,
  bad_nonce = 401,
  nonce_cache_full = 503,
}

local NONCE_LENGTH = 32


local function check_string(value, name)
  if type(value) ~= "string" then
    error("machine_sig: " .. name .. " must be a string", 3)
  end
end


-- Returns the string S that the signature covers. timestamp is the
-- decimal text as sent in the header.
function _M.string_to_sign(method, target, timestamp, nonce, body)
  local body_hash = crypto.hex_encode(crypto.sha256(body or ""))
  return concat({ _M.PREFIX, method, target, timestamp, nonce, body_hash },
    "\n")
end


-- Returns the "v1=..." signature value of a call: the HMAC of
-- string_to_sign's result, without building it.
function _M.signature(token, method, target, timestamp, nonce, body)
  local body_hash = crypto.hex_encode(crypto.sha256(body or ""))
  return "v1=" .. crypto.hmac_sha256_join(token, "\n", _M.PREFIX, method,
    target, timestamp, nonce, body_hash)
end


-- Signs a call. now (Unix seconds, default the wall clock) and nonce
-- (default 32 random characters) are for specs. Returns a table of the
-- three headers to add to the request.
function _M.sign(token, method, target, body, now, nonce)
  check_string(token, "token")
  check_string(method, "method")
  check_string(target, "target")
  if body ~= nil then
    check_string(body, "body")
  end

  local timestamp = tostring(floor(now or core.time()))
  nonce = nonce or crypto.random_token(NONCE_LENGTH)
  if not nonce then
    error("machine_sig: random_token failed", 2)
  end

  return {
    [_M.HEADER_TIMESTAMP] = timestamp,
    [_M.HEADER_NONCE] = nonce,
    [_M.HEADER_SIGNATURE] = _M.signature(token, method, target, timestamp,
      nonce, body),
  }
end


local function valid_nonce(nonce)
  return #nonce >= 16 and #nonce <= 64
    and not sfind(nonce, "[^A-Za-z0-9_-]")
end


-- Verifies a signed call. req needs method, target and
-- header_count(name), the number of fields and the first value (a
-- core.http request fits). body is the whole request body ("" or nil when
-- there is none). nonce_cache is a core.nonce cache whose TTL is at least
-- NONCE_TTL. now (Unix seconds) defaults to the wall clock.
--
-- Checks, in order: the three headers are present, the nonce is well
-- formed, the timestamp is within WINDOW, the signature matches (compared
-- in constant time), the nonce is unseen. The nonce is recorded only after
-- the signature verifies, so a caller without the token cannot fill the
-- cache. Returns true, or nil, message, code with code a key of STATUS.
function _M.verify(token, req, body, nonce_cache, now)
  check_string(token, "token")
  now = now or core.time()

  local nts, timestamp = req:header_count(_M.HEADER_TIMESTAMP)
  local nnonce, nonce = req:header_count(_M.HEADER_NONCE)
  local nsig, signature = req:header_count(_M.HEADER_SIGNATURE)
  -- A header sent twice is malformed: which copy counts would depend on
  -- the reader.
  if nts ~= 1 or nnonce ~= 1 or nsig ~= 1 or type(timestamp) ~= "string"
      or type(nonce) ~= "string" or type(signature) ~= "string" then
    return nil, "the call must carry the " .. _M.HEADER_TIMESTAMP .. ", "
      .. _M.HEADER_NONCE .. " and " .. _M.HEADER_SIGNATURE
      .. " headers once each", "missing_signature"
  end

  if not valid_nonce(nonce) then
    return nil, "invalid nonce: expected 16 to 64 characters of "
      .. "[A-Za-z0-9_-], got " .. #nonce .. " characters", "bad_nonce"
  end

  if not sfind(timestamp, "^%d+$") or #timestamp > 12 then
    return nil, "invalid timestamp: expected Unix seconds as decimal "
      .. "digits", "bad_signature"
  end
  local skew = tonumber(timestamp) - now
  if skew > _M.WINDOW or skew < -_M.WINDOW then
    return nil, "timestamp is " .. floor(skew) .. " s from this "
      .. "machine's clock; the limit is " .. _M.WINDOW .. " s",
      "stale_timestamp"
  end

  local expected = _M.signature(token, req.method, req.target, timestamp,
    nonce, body)
  if not crypto.constant_time_equal(expected, signature) then
    return nil, "signature does not match the call", "bad_signature"
  end

  local fresh, err, code = nonce_cache:check_and_add(nonce, now)
  if fresh == nil and code == "full" then
    return nil, "the nonce cache is full; retry later", "nonce_cache_full"
  elseif fresh == nil then
    return nil, "invalid nonce: " .. tostring(err), "bad_nonce"
  elseif not fresh then
    return nil, "nonce was already used", "replayed_nonce"
  end
  return true
end


return _M
