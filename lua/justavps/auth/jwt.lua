-- JSON Web Tokens signed with HS256 (RFC 7519 over the compact JWS form of
-- RFC 7515), and nothing else: no other algorithm, no JWK, no encryption.
--
--   local token = jwt.encode({ sub = "42", exp = now + 900 }, secret)
--   local claims, message, code = jwt.decode_verify(token, secret,
--     { audience = "justavps:proxy" })
--
-- A small subset over core.crypto rather than a library: Debian ships no
-- Lua JWT package, and lua-resty-jwt needs OpenResty's ngx API. Accepting
-- only HS256 also removes the algorithm-confusion class of bugs by
-- construction.
local core = require("justavps.core")
local json = require("justavps.json")

local crypto = core.crypto
local hmac_sha256 = crypto.hmac_sha256
local b64url_encode = crypto.base64url_encode
local b64url_decode = crypto.base64url_decode
local constant_time_equal = crypto.constant_time_equal

local type = type
local error = error
local ipairs = ipairs
local rawget = rawget
local tostring = tostring
local format = string.format
local sfind = string.find
local ssub = string.sub
local slower = string.lower
local huge = math.huge

local _M = {}

-- Maximum size of a token accepted or issued, in bytes. A token must fit
-- in one cookie, and browsers need only store 4096 bytes per cookie
-- (RFC 6265, section 6.1).
_M.MAX_TOKEN_SIZE = 4096

-- Minimum secret size, in bytes. RFC 7518, section 3.2: HS256 needs
-- a key at least as long as the hash output, 256 bits.
_M.MIN_SECRET_SIZE = 32

-- The one header this module writes. Its text is fixed, so every token
-- from encode starts with the same first part.
local HEADER_JSON = '{"alg":"HS256","typ":"JWT"}'
local HEADER_PART = b64url_encode(HEADER_JSON)

-- Headers and payloads are small, flat objects.
local JSON_LIMITS = { max_depth = 8, max_size = _M.MAX_TOKEN_SIZE }


local function fail(message, code)
  return nil, message, code
end


-- Quotes a value taken from a token for an error message, cut short so a
-- hostile token cannot fill the log.
local function quote(value)
  local text = tostring(value)
  if #text > 40 then
    text = ssub(text, 1, 40) .. "..."
  end
  return format("%q", text)
end


local function check_secret(secret, where)
  if type(secret) ~= "string" then
    error(where .. ": secret must be a string, got " .. type(secret), 3)
  end
  if #secret < _M.MIN_SECRET_SIZE then
    error(where .. ": secret must be at least " .. _M.MIN_SECRET_SIZE
      .. " bytes, got " .. #secret, 3)
  end
end


-- Returns a list of secrets from a string or a list of strings, so a
-- verifier can accept the old and new secret during a rotation.
local function secret_list(secret)
  if type(secret) == "table" then
    if #secret == 0 then
      error("jwt.decode_verify: secret list is empty", 3)
    end
    for _, s in ipairs(secret) do
      check_secret(s, "jwt.decode_verify")
    end
    return secret
  end
  check_secret(secret, "jwt.decode_verify")
  return { secret }
end


local function is_object(v)
  return type(v) == "table" and not json.is_array(v) and rawget(v, 1) == nil
end


local function is_number(v)
  return type(v) == "number" and v == v and v ~= huge and v ~= -huge
end


-- Signs claims into a compact token. claims.exp (Unix seconds) is
-- required, because every token this platform issues expires. Returns the
-- token, or nil, message, code with the codes of json.encode, or
-- "too_large" when the token would exceed MAX_TOKEN_SIZE.
function _M.encode(claims, secret)
  if type(claims) ~= "table" then
    error("jwt.encode: claims must be a table, got " .. type(claims), 2)
  end
  if not is_number(claims.exp) then
    error("jwt.encode: claims.exp must be a finite number", 2)
  end
  check_secret(secret, "jwt.encode")

  local payload, message, code = json.encode(claims)
  if not payload then
    return fail("jwt encode: " .. message, code)
  end
  local signing_input = HEADER_PART .. "." .. b64url_encode(payload)
  local token = signing_input .. "."
    .. b64url_encode(hmac_sha256(secret, signing_input))

  if #token > _M.MAX_TOKEN_SIZE then
    return fail("jwt encode: token of " .. #token .. " bytes exceeds "
      .. _M.MAX_TOKEN_SIZE, "too_large")
  end
  return token
end


-- Splits a compact token into its three parts and decodes them from
-- base64url, without padding as RFC 7515 requires. Returns the parts and
-- their decoded bytes, or nil, message.
local function split(token)
  if #token > _M.MAX_TOKEN_SIZE then
    return nil, "token of " .. #token .. " bytes exceeds "
      .. _M.MAX_TOKEN_SIZE
  end

  local first = sfind(token, ".", 1, true)
  local second = first and sfind(token, ".", first + 1, true)
  if not second or sfind(token, ".", second + 1, true) then
    return nil, "token must have three parts separated by '.'"
  end

  local parts = {
    ssub(token, 1, first - 1),
    ssub(token, first + 1, second - 1),
    ssub(token, second + 1),
  }
  local names = { "header", "payload", "signature" }
  local decoded = {}

  for i = 1, 3 do
    if i < 3 and parts[i] == "" then
      return nil, names[i] .. " is empty"
    end
    if sfind(parts[i], "[^A-Za-z0-9_-]") then
      return nil, names[i] .. " is not base64url without padding"
    end
    local bytes = b64url_decode(parts[i])
    if not bytes then
      return nil, names[i] .. " is not valid base64url"
    end
    decoded[i] = bytes
  end

  return parts, decoded
end


-- Decodes and checks the header, before any signature work: only
-- {"alg":"HS256"} passes, with an optional typ of JWT and no crit.
-- Other members, such as kid, are ignored.
local function check_header(header_json)
  local header = json.decode(header_json, JSON_LIMITS)
  if not is_object(header) then
    return fail("header is not a JSON object", "malformed_token")
  end

  local alg = header.alg
  if alg == nil then
    return fail("header has no alg; only HS256 is accepted",
      "unsupported_alg")
  end
  if alg ~= "HS256" then
    return fail("unsupported alg " .. quote(alg)
      .. "; only HS256 is accepted", "unsupported_alg")
  end

  -- RFC 7515, section 4.1.11: a recipient must reject a token whose crit
  -- lists an extension it does not understand, and this module
  -- understands none.
  if header.crit ~= nil then
    return fail("header has crit, and no extension is supported",
      "unsupported_header")
  end

  -- RFC 7515, section 4.1.9 compares typ without regard to case.
  local typ = header.typ
  if typ ~= nil and (type(typ) ~= "string" or slower(typ) ~= "jwt") then
    return fail("unsupported typ " .. quote(typ) .. "; expected JWT",
      "unsupported_header")
  end

  return header
end


local function check_signature(signing_input, signature, secrets)
  if #signature ~= 32 then
    return fail("signature must be 32 bytes for HS256, got " .. #signature,
      "bad_signature")
  end
  for _, secret in ipairs(secrets) do
    if constant_time_equal(hmac_sha256(secret, signing_input), signature) then
      return true
    end
  end
  return fail("signature does not match", "bad_signature")
end


local function has_audience(aud, audience)
  if aud == audience then
    return true
  end
  if type(aud) == "table" then
    for _, value in ipairs(aud) do
      if value == audience then
        return true
      end
    end
  end
  return false
end


-- Checks the registered claims that RFC 7519 gives a meaning to, and the
-- caller's required claims.
local function check_claims(claims, opts)
  local now = opts.now or core.time()
  local leeway = opts.leeway or 0

  local exp = claims.exp
  if exp == nil then
    return fail("claim exp is missing", "missing_claim")
  end
  if not is_number(exp) then
    return fail("claim exp is not a number", "invalid_claim")
  end
  -- RFC 7519, section 4.1.4: the current time must be before exp.
  if now - leeway >= exp then
    return fail("token expired at " .. format("%.0f", exp),
      "token_expired")
  end

  local nbf = claims.nbf
  if nbf ~= nil then
    if not is_number(nbf) then
      return fail("claim nbf is not a number", "invalid_claim")
    end
    if now + leeway < nbf then
      return fail("token is not valid before " .. format("%.0f", nbf),
        "token_not_yet_valid")
    end
  end

  -- RFC 7519, section 4.1.3: a token that names audiences is rejected by
  -- a recipient that is not one of them, including one that expects none.
  local aud = claims.aud
  if opts.audience ~= nil then
    if not has_audience(aud, opts.audience) then
      return fail("token is not meant for audience "
        .. quote(opts.audience), "wrong_audience")
    end
  elseif aud ~= nil then
    return fail("token names an audience and none was expected",
      "wrong_audience")
  end

  for _, name in ipairs(opts.required or {}) do
    if claims[name] == nil then
      return fail("claim " .. name .. " is missing", "missing_claim")
    end
  end

  return claims
end


local function check_options(opts)
  if type(opts) ~= "table" then
    error("jwt.decode_verify: opts must be a table, got " .. type(opts), 3)
  end
  if opts.now ~= nil and not is_number(opts.now) then
    error("jwt.decode_verify: opts.now must be a finite number", 3)
  end
  local leeway = opts.leeway
  if leeway ~= nil and (not is_number(leeway) or leeway < 0) then
    error("jwt.decode_verify: opts.leeway must be a number >= 0", 3)
  end
  if opts.audience ~= nil and type(opts.audience) ~= "string" then
    error("jwt.decode_verify: opts.audience must be a string", 3)
  end
  if opts.required ~= nil and type(opts.required) ~= "table" then
    error("jwt.decode_verify: opts.required must be a list of names", 3)
  end
end


-- Verifies token and returns its claims and header, or nil, message, code.
-- secret is a string, or a list of strings during a rotation. opts:
--   now       Unix seconds (default core.time())
--   leeway    seconds of clock skew allowed for exp and nbf (default 0)
--   audience  the aud value this recipient expects
--   required  names of claims that must be present, besides exp
-- Codes, in the order of the checks: malformed_token, unsupported_alg,
-- unsupported_header, bad_signature, malformed_token (payload),
-- missing_claim, invalid_claim, token_expired, token_not_yet_valid,
-- wrong_audience. Messages never contain the token or the secret.
function _M.decode_verify(token, secret, opts)
  if type(token) ~= "string" then
    error("jwt.decode_verify: token must be a string, got " .. type(token),
      2)
  end
  local secrets = secret_list(secret)
  opts = opts or {}
  check_options(opts)

  local parts, decoded = split(token)
  if not parts then
    return fail(decoded, "malformed_token")
  end

  local header, message, code = check_header(decoded[1])
  if not header then
    return fail(message, code)
  end

  local ok
  ok, message, code = check_signature(parts[1] .. "." .. parts[2],
    decoded[3], secrets)
  if not ok then
    return fail(message, code)
  end

  local claims = json.decode(decoded[2], JSON_LIMITS)
  if not is_object(claims) then
    return fail("payload is not a JSON object", "malformed_token")
  end

  claims, message, code = check_claims(claims, opts)
  if not claims then
    return fail(message, code)
  end
  return claims, header
end


return _M
