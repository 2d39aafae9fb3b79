-- Tokens that let a browser through the edge to a machine. Both kinds are
-- HS256 JWTs, signed with a secret that the platform and the edge share:
--
--   owner token  scope "machine": the __justavps_proxy cookie of the
--                machine's owner; opens every port of one machine
--   share token  scope "port": a shareable link to one port of one
--                machine; carries a token id (jti) that the platform
--                stores, so the link can be revoked
--
-- Neither kind opens /_pty or /_toolbox. Apps under /_port/PORT/ share
-- the machine's origin, so their JavaScript could ride the cookie. Those
-- paths need an API key with the exec scope or a machine ticket
-- (justavps.auth.ticket) instead.
--
--   local token = proxy_token.issue_owner({ user_id = 42, slug = s }, key)
--   local claims, message, code = proxy_token.verify(token, key,
--     { slug = s })
--   if claims and proxy_token.allows(claims, path) then ... end
local core = require("justavps.core")
local jwt = require("justavps.auth.jwt")

local random_token = core.crypto.random_token

local type = type
local error = error
local tonumber = tonumber
local tostring = tostring
local floor = math.floor
local sfind = string.find
local ssub = string.sub
local slower = string.lower
local sgsub = string.gsub
local schar = string.char

local _M = {}

-- The aud claim of both kinds, so that a JWT minted for another purpose
-- with the same secret is not taken for a proxy token.
_M.AUDIENCE = "justavps:proxy"

_M.OWNER_SCOPE = "machine"
_M.SHARE_SCOPE = "port"

-- Lifetimes in seconds. An owner token is refreshed by the dashboard, so
-- it stays short. A share link lives longer because a person forwards it,
-- and revocation covers the time in between.
_M.OWNER_TTL = 15 * 60
_M.OWNER_MAX_TTL = 24 * 3600
_M.SHARE_TTL = 3600
_M.SHARE_MAX_TTL = 7 * 86400

-- Characters of a share token's id: 132 random bits.
_M.ID_LENGTH = 22

-- Paths that no proxy token opens, compared with the first path segment.
local RESERVED = { _pty = true, _toolbox = true }


local function fail(message, code)
  return nil, message, code
end


local function is_slug(slug)
  return type(slug) == "string" and #slug >= 3 and #slug <= 40
    and not sfind(slug, "[^a-z0-9-]")
end


local function is_port(port)
  return type(port) == "number" and port >= 1 and port <= 65535
    and port % 1 == 0
end


local function lifetime(opts, default, max, where)
  local ttl = opts.ttl or default
  if type(ttl) ~= "number" or ttl <= 0 or ttl > max then
    error(where .. ": ttl must be a number above 0 and at most " .. max, 3)
  end
  return ttl
end


local function check_common(opts, where)
  if type(opts) ~= "table" then
    error(where .. ": opts must be a table, got " .. type(opts), 3)
  end
  if not is_slug(opts.slug) then
    error(where .. ": slug must match [a-z0-9-]{3,40}", 3)
  end
end


-- Issues the owner token for opts.slug. opts: user_id (string or number,
-- becomes sub), slug, ttl (default OWNER_TTL), now (default core.time()).
-- Returns token, claims, or nil, message, code from jwt.encode.
function _M.issue_owner(opts, secret)
  check_common(opts, "proxy_token.issue_owner")
  local user_id = opts.user_id
  if type(user_id) ~= "string" and type(user_id) ~= "number" then
    error("proxy_token.issue_owner: user_id must be a string or a number",
      2)
  end
  local ttl = lifetime(opts, _M.OWNER_TTL, _M.OWNER_MAX_TTL,
    "proxy_token.issue_owner")
  local now = floor(opts.now or core.time())

  local claims = {
    aud = _M.AUDIENCE,
    sub = tostring(user_id),
    slug = opts.slug,
    scope = _M.OWNER_SCOPE,
    iat = now,
    exp = now + ttl,
  }
  local token, message, code = jwt.encode(claims, secret)
  if not token then
    return fail(message, code)
  end
  return token, claims
end


-- Issues a share token for one port of opts.slug. opts: slug, port, ttl
-- (default SHARE_TTL), now, id (default a new random id). Store claims.jti
-- to list and revoke the link. Returns token, claims, or nil, message,
-- code.
function _M.issue_share(opts, secret)
  check_common(opts, "proxy_token.issue_share")
  if not is_port(opts.port) then
    error("proxy_token.issue_share: port must be an integer from 1 to 65535",
      2)
  end
  local ttl = lifetime(opts, _M.SHARE_TTL, _M.SHARE_MAX_TTL,
    "proxy_token.issue_share")
  local now = floor(opts.now or core.time())

  local id = opts.id
  if id == nil then
    local message, code
    id, message, code = random_token(_M.ID_LENGTH)
    if not id then
      return fail(message, code)
    end
  elseif type(id) ~= "string" or id == "" or #id > 64 then
    error("proxy_token.issue_share: id must be a string of 1 to 64 bytes",
      2)
  end

  local claims = {
    aud = _M.AUDIENCE,
    jti = id,
    slug = opts.slug,
    port = opts.port,
    scope = _M.SHARE_SCOPE,
    iat = now,
    exp = now + ttl,
  }
  local token, message, code = jwt.encode(claims, secret)
  if not token then
    return fail(message, code)
  end
  return token, claims
end


-- Checks the claims that each kind needs after the signature verified.
local function check_kind(claims, opts)
  local scope = claims.scope
  if opts.scope ~= nil and scope ~= opts.scope then
    return fail("token scope is not " .. opts.scope, "wrong_scope")
  end

  if scope == _M.OWNER_SCOPE then
    if type(claims.sub) ~= "string" or claims.sub == "" then
      return fail("owner token has no sub", "invalid_claim")
    end
    return claims
  end

  if scope == _M.SHARE_SCOPE then
    if not is_port(claims.port) then
      return fail("share token port is not an integer from 1 to 65535",
        "invalid_claim")
    end
    if type(claims.jti) ~= "string" or claims.jti == "" then
      return fail("share token has no jti", "invalid_claim")
    end
    return claims
  end

  return fail("token scope is neither machine nor port", "wrong_scope")
end


-- Verifies a proxy token of either kind for the machine opts.slug and
-- returns its claims, or nil, message, code. opts:
--   slug        the machine the request is for (required)
--   scope       OWNER_SCOPE or SHARE_SCOPE to accept only that kind
--   now, leeway as in jwt.decode_verify
--   is_revoked  function(jti, claims) for share tokens; returns true when
--               the link was revoked, or nil, message on a failed lookup
-- Codes: those of jwt.decode_verify, wrong_slug, wrong_scope,
-- invalid_claim, token_revoked, revocation_check_failed. A failed
-- revocation lookup rejects the token.
function _M.verify(token, secret, opts)
  if type(opts) ~= "table" or type(opts.slug) ~= "string" then
    error("proxy_token.verify: opts.slug must be a string", 2)
  end

  local claims, message, code = jwt.decode_verify(token, secret, {
    audience = _M.AUDIENCE,
    now = opts.now,
    leeway = opts.leeway,
    required = { "slug", "scope" },
  })
  if not claims then
    return fail(message, code)
  end

  if claims.slug ~= opts.slug then
    return fail("token was issued for another machine", "wrong_slug")
  end

  claims, message, code = check_kind(claims, opts)
  if not claims then
    return fail(message, code)
  end

  if claims.scope == _M.SHARE_SCOPE and opts.is_revoked then
    local revoked, reason = opts.is_revoked(claims.jti, claims)
    if revoked == nil then
      return fail("revocation check failed: " .. tostring(reason),
        "revocation_check_failed")
    end
    if revoked then
      return fail("share link was revoked", "token_revoked")
    end
  end
  return claims
end


local function hex_char(hex)
  return schar(tonumber(hex, 16))
end


-- Splits a request path the way the daemon's routing policy does: the
-- query is dropped, empty segments are skipped, and a path with a dot
-- segment or an encoded slash, backslash or NUL is rejected. Returns the
-- raw segments, or nil.
local function segments(path)
  local query = sfind(path, "?", 1, true)
  if query then
    path = ssub(path, 1, query - 1)
  end
  if ssub(path, 1, 1) ~= "/" then
    return nil
  end

  local out = {}
  for segment in (path .. "/"):gmatch("([^/]*)/") do
    if segment ~= "" then
      local lower = slower(segment)
      if sfind(lower, "%2f", 1, true) or sfind(lower, "%5c", 1, true)
          or sfind(segment, "\\", 1, true) or sfind(lower, "%00", 1, true) then
        return nil
      end
      local decoded = sgsub(lower, "%%2e", ".")
      if decoded == "." or decoded == ".." then
        return nil
      end
      out[#out + 1] = segment
    end
  end
  return out
end


-- True when a raw first segment names /_pty or /_toolbox, also when
-- percent-encoded or in another case, so that a proxy in front of the
-- daemon that decodes or folds case cannot be used to reach them.
local function is_reserved(segment)
  local decoded = slower(sgsub(segment, "%%(%x%x)", hex_char))
  return RESERVED[decoded] == true
end


-- Decides whether verified claims open a request. path is the request
-- target as the daemon receives it. host_port is the PORT of a
-- PORT-slug.domain host, whose requests the edge rewrites to
-- /_port/PORT/path, or nil for the slug.domain host. Returns true, or
-- false, code:
--   reserved_path  /_pty or /_toolbox, which no proxy token opens
--   wrong_port     a share token used for another port
--   outside_port   a share token used for a path outside /_port/PORT/
--   bad_path       a path the daemon would reject
--   wrong_scope    claims of neither kind
-- A share token opens only /_port/PORT/... and the PORT-slug host. The
-- /PORT/ shortcut and the default port are refused, because what they
-- reach depends on the daemon's routing config.
function _M.allows(claims, path, host_port)
  if type(claims) ~= "table" then
    error("proxy_token.allows: claims must be a table", 2)
  end
  if type(path) ~= "string" then
    error("proxy_token.allows: path must be a string", 2)
  end
  if host_port ~= nil and not is_port(host_port) then
    error("proxy_token.allows: host_port must be an integer port or nil", 2)
  end

  local scope = claims.scope
  if scope ~= _M.OWNER_SCOPE and scope ~= _M.SHARE_SCOPE then
    return false, "wrong_scope"
  end

  local segs = segments(path)
  if not segs then
    return false, "bad_path"
  end

  -- On a port host the whole path belongs to the app on that port.
  if host_port then
    if scope == _M.SHARE_SCOPE and host_port ~= claims.port then
      return false, "wrong_port"
    end
    return true
  end

  if segs[1] and is_reserved(segs[1]) then
    return false, "reserved_path"
  end
  if scope == _M.OWNER_SCOPE then
    return true
  end

  if segs[1] ~= "_port" or not segs[2] or not sfind(segs[2], "^%d+$") then
    return false, "outside_port"
  end
  if tonumber(segs[2]) ~= claims.port then
    return false, "wrong_port"
  end
  return true
end


return _M
