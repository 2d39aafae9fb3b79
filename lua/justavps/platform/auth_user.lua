-- The "user" auth kind: a request acts for a user of an account, through
-- an API key (`Authorization: Bearer sk_live_…`) or the dashboard session
-- cookie (`__justavps_session`). On success it sets
--   ctx.user         { id, account_id, email }; id and email are nil for
--                    a key whose creator was deleted
--   ctx.auth_method  "api_key" or "session"
--   ctx.scopes       the key's scopes, or nil for a session, which has
--                    every scope
--   ctx.api_key      { id, prefix } for a key
--   ctx.session      { id, csrf_token } for a session
-- and enforces route.scope on keys. When an Authorization header is
-- present the cookie is ignored, so a bad key never falls back to a
-- session.
--
-- Failures: 401 unauthorized for missing, malformed, unknown, revoked or
-- expired credentials, all with the same code so the response does
-- not reveal which; 403 insufficient_scope; 403 csrf_failed for a cookie
-- request with a method other than GET, HEAD or OPTIONS whose
-- X-CSRF-Token header is not the session's CSRF token; 503 when the
-- database is unavailable.
local core = require("justavps.core")
local apikey = require("justavps.auth.apikey")
local session = require("justavps.auth.session")
local accounts = require("justavps.platform.accounts")
local log = require("justavps.log")

local crypto = core.crypto
local hmac_sha256 = crypto.hmac_sha256
local sha256 = crypto.sha256
local hex_encode = crypto.hex_encode
local b64url_encode = crypto.base64url_encode
local constant_time_equal = crypto.constant_time_equal

local setmetatable = setmetatable
local ssub = string.sub

local _M = {}

_M.CSRF_HEADER = "X-CSRF-Token"

-- Characters of a key stored in api_keys.prefix and shown in listings:
-- sk_live_ and 8 random characters (48 bits). The column is UNIQUE and
-- is the lookup index, so it is longer than apikey.DISPLAY_LENGTH, whose
-- 24 random bits would collide after a few thousand keys.
_M.KEY_PREFIX_LENGTH = #apikey.KEY_PREFIX + 8

local SAFE_METHODS = { GET = true, HEAD = true, OPTIONS = true }

-- Domain separation for the CSRF secret derived from a session token.
local CSRF_LABEL = "justavps csrf secret v1"


-- Returns the CSRF secret of a session, derived from its token. The
-- sessions table keeps only the secret's SHA-256 (csrf_secret_hash), so
-- the secret is recomputed from the cookie on each request, and a leaked
-- table yields neither the token nor the secret.
function _M.csrf_secret(token)
  return b64url_encode(hmac_sha256(token, CSRF_LABEL))
end


-- Returns the CSRF token the dashboard sends in X-CSRF-Token.
function _M.csrf_token(token, session_id)
  return session.csrf_token(_M.csrf_secret(token), session_id)
end


-- Creates the credentials of a new session: { token, token_hash,
-- csrf_secret_hash }, or nil, message, code when the random generator
-- fails. The cookie carries token and the database stores the hashes.
function _M.new_session()
  local new, err, code = session.new()
  if not new then
    return nil, err, code
  end
  return {
    token = new.token,
    token_hash = new.hash,
    csrf_secret_hash = hex_encode(sha256(_M.csrf_secret(new.token))),
  }
end


local function unauthorized()
  return false, 401, "unauthorized",
    "invalid or expired credentials; sign in again or check the API key"
end


local function missing()
  return false, 401, "unauthorized", "authentication required: send "
    .. "Authorization: Bearer sk_live_… or sign in to get a session cookie"
end


local function database_failure(what, err, code)
  if code == "database_unavailable" or code == "timeout" then
    log.err(what .. " failed: database unavailable", { error = err,
      code = code })
    return false, 503, "database_unavailable",
      "the database is unavailable; retry later"
  end
  log.err(what .. " failed", { error = err, code = code })
  return false, 500, "internal", "internal server error"
end


local function nil_if_null(v)
  if v == nil or v == core.pg.null then
    return nil
  end
  return v
end


local function by_api_key(ctx, route, authorization)
  local prefix, key, code = apikey.parse(authorization)
  if not prefix then
    if code == "missing_authorization" then
      return missing()
    end
    return unauthorized()
  end
  prefix = ssub(key, 1, _M.KEY_PREFIX_LENGTH)

  local row, err, ecode = accounts.find_api_key(prefix)
  if not row then
    if ecode == "not_found" then
      -- The same work as a found key, so timing does not reveal which
      -- prefixes exist.
      apikey.verify(key, ("0"):rep(64))
      return unauthorized()
    end
    return database_failure("API key lookup", err, ecode)
  end
  if not apikey.verify(key, row.hash) then
    return unauthorized()
  end
  if row.revoked then
    log.warn("rejected a revoked API key", { key_id = row.id,
      prefix = prefix })
    return unauthorized()
  end

  -- accounts.find_api_key marks a key stale when last_used_at is over a
  -- minute old, so a busy key costs one write a minute.
  if row.stale then
    local _, terr, tcode = accounts.touch_api_key(row.id)
    if tcode then
      -- The request goes on: last_used_at is informational.
      log.warn("could not update an API key's last_used_at", {
        key_id = row.id, error = terr, code = tcode })
    end
  end

  ctx.user = { id = nil_if_null(row.user_id), account_id = row.account_id,
    email = nil_if_null(row.email) }
  ctx.auth_method = "api_key"
  ctx.scopes = row.scopes
  ctx.api_key = { id = row.id, prefix = prefix }

  if route.scope and not apikey.has_scope(row.scopes, route.scope) then
    return false, 403, "insufficient_scope", "this API key lacks the \""
      .. route.scope .. "\" scope that " .. (route.name or route.path)
      .. " requires"
  end
  return true
end


local function by_session(ctx, cookie_header)
  local token, _, ccode = session.get_cookie(cookie_header,
    session.SESSION_COOKIE)
  if not token then
    if ccode == "missing_cookie" then
      return missing()
    end
    return unauthorized()
  end
  local token_hash = session.hash(token)
  if not token_hash then
    return unauthorized()
  end

  local row, err, code = accounts.find_session(token_hash)
  if not row then
    if code == "not_found" then
      return unauthorized()
    end
    return database_failure("session lookup", err, code)
  end

  local secret = _M.csrf_secret(token)
  local csrf_token = session.csrf_token(secret, row.id)
  if not SAFE_METHODS[ctx.req.method] then
    local presented = ctx.req:header(_M.CSRF_HEADER)
    local secret_ok = constant_time_equal(hex_encode(sha256(secret)),
      row.csrf_secret_hash)
    if not (secret_ok and session.verify_csrf(secret, row.id, presented))
    then
      return false, 403, "csrf_failed", "missing or wrong "
        .. _M.CSRF_HEADER .. " header; send the csrf_token from sign-in "
        .. "or GET /api/v1/me"
    end
  end

  if row.stale then
    local _, terr, tcode = accounts.touch_session(row.id)
    if tcode then
      log.warn("could not update a session's last_seen_at", {
        session_id = row.id, error = terr, code = tcode })
    end
  end

  ctx.user = { id = row.user_id, account_id = row.account_id,
    email = row.email }
  ctx.auth_method = "session"
  ctx.scopes = nil
  ctx.session = { id = row.id, csrf_token = csrf_token }
  return true
end


-- Authenticates ctx.req for route. Returns true, or false, status, code,
-- message.
function _M.authenticate(ctx, route)
  local req = ctx.req
  local count, authorization = req:header_count("authorization")
  if count > 1 then
    -- Which one counts would depend on the reader, as with a repeated
    -- session cookie.
    return false, 401, "unauthorized", "the request has " .. count
      .. " Authorization headers; send one"
  end
  if authorization ~= nil then
    return by_api_key(ctx, route, authorization)
  end
  local cookie_header = req:headers()["cookie"]
  if cookie_header == nil then
    return missing()
  end
  return by_session(ctx, cookie_header)
end


-- Returns true when the authenticated request may use scope: always for a
-- session, and for a key that has it.
function _M.has_scope(ctx, scope)
  if ctx.auth_method == "session" then
    return true
  end
  return apikey.has_scope(ctx.scopes, scope)
end


-- Loads the authenticated user and their account. Returns { user,
-- account }, or nil, message, code (not_found for a key whose creator
-- was deleted).
function _M.load_user(ctx)
  local user = ctx.user
  if not user or not user.id then
    return nil, "the credentials belong to no user", "not_found"
  end
  return accounts.profile(user.id)
end


-- The module is the auth kind itself: api.lua calls auth(ctx, route).
return setmetatable(_M, {
  __call = function(_, ctx, route)
    return _M.authenticate(ctx, route)
  end,
})
