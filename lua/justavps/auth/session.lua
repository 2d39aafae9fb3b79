-- Dashboard sessions, the Set-Cookie values of the session and proxy
-- cookies, CSRF tokens, and Cookie header parsing.
--
--   local s = session.new()          -- s.token to the cookie, s.hash to the DB
--   headers["set-cookie"] = session.session_cookie(s.token)
--   local token, message, code = session.get_cookie(headers.cookie,
--     session.SESSION_COOKIE)
--
-- Every cookie is host-only (no Domain attribute), Path=/, HttpOnly,
-- SameSite=Lax, and Secure unless opts.dev is set for plain-HTTP loopback.
local core = require("justavps.core")

local crypto = core.crypto
local sha256 = crypto.sha256
local hmac_sha256 = crypto.hmac_sha256
local hex_encode = crypto.hex_encode
local random_bytes = crypto.random_bytes
local b64url_encode = crypto.base64url_encode
local constant_time_equal = crypto.constant_time_equal

local type = type
local error = error
local ipairs = ipairs
local tostring = tostring
local concat = table.concat
local sfind = string.find
local ssub = string.sub
local smatch = string.match
local sgmatch = string.gmatch

local _M = {}

_M.SESSION_COOKIE = "__justavps_session"
_M.PROXY_COOKIE = "__justavps_proxy"

-- Default Max-Age in seconds: 7 days for a dashboard session, and 15
-- minutes for the proxy cookie, the default lifetime of the proxy JWT
-- it carries.
_M.SESSION_MAX_AGE = 7 * 86400
_M.PROXY_MAX_AGE = 15 * 60

-- Random bytes in a session token and a CSRF secret.
_M.TOKEN_BYTES = 32

-- A session token is TOKEN_BYTES in base64url without padding.
local TOKEN_PATTERN = "^" .. ("[A-Za-z0-9_-]"):rep(43) .. "$"


local function fail(message, code)
  return nil, message, code
end


-- Returns TOKEN_BYTES random bytes in base64url, or nil, message, code.
local function random_text()
  local bytes, message, code = random_bytes(_M.TOKEN_BYTES)
  if not bytes then
    return fail(message, code)
  end
  return b64url_encode(bytes)
end


-- Returns the lowercase hex SHA-256 of a session token, the form the
-- database keeps, or nil, message, "invalid_session" when the text is not
-- a session token. Check the format before any lookup.
function _M.hash(token)
  if type(token) ~= "string" or not sfind(token, TOKEN_PATTERN) then
    return fail("session token is malformed", "invalid_session")
  end
  return hex_encode(sha256(token))
end


-- Creates a session token. Returns { token, hash }, or nil, message, code
-- when the random generator fails. The cookie carries token and the
-- database stores only hash, so a leaked table opens no session.
function _M.new()
  local token, message, code = random_text()
  if not token then
    return fail(message, code)
  end
  return { token = token, hash = hex_encode(sha256(token)) }
end


-- True when name is an RFC 7230 token, as RFC 6265 requires of a cookie
-- name.
local function is_cookie_name(name)
  return type(name) == "string" and name ~= ""
    and not sfind(name, "[^!#$%%&'*+%-.^_`|~0-9A-Za-z]")
end


-- True when value holds only cookie-octets (RFC 6265, section 4.1.1):
-- printable ASCII other than space, double quote, comma, semicolon and
-- backslash.
local function is_cookie_value(value)
  return type(value) == "string" and not sfind(value, "[^\33-\126]")
    and not sfind(value, '[",;\\]')
end


local function max_age_of(opts, default, where)
  local max_age = opts and opts.max_age or default
  if type(max_age) ~= "number" or max_age < 0 or max_age % 1 ~= 0 then
    error(where .. ": opts.max_age must be a whole number of seconds >= 0",
      3)
  end
  return max_age
end


local function build(name, value, max_age, opts)
  local parts = {
    name .. "=" .. value,
    "Path=/",
    "Max-Age=" .. tostring(max_age),
    "HttpOnly",
  }
  if not (opts and opts.dev) then
    parts[#parts + 1] = "Secure"
  end
  parts[#parts + 1] = "SameSite=Lax"
  return concat(parts, "; ")
end


-- Returns a Set-Cookie value for any cookie of this platform. opts:
-- max_age in seconds (required here), dev to leave out Secure. Raises on
-- a name that is not a token or a value with characters a cookie cannot
-- hold.
function _M.cookie(name, value, opts)
  if not is_cookie_name(name) then
    error("session.cookie: cookie name must be an HTTP token", 2)
  end
  if not is_cookie_value(value) then
    error("session.cookie: cookie value holds a character outside "
      .. "RFC 6265 cookie-octets", 2)
  end
  local max_age = max_age_of(opts, nil, "session.cookie")
  return build(name, value, max_age, opts)
end


-- Returns the Set-Cookie value of the dashboard session cookie. opts:
-- max_age (default SESSION_MAX_AGE), dev.
function _M.session_cookie(token, opts)
  if not is_cookie_value(token) or token == "" then
    error("session.session_cookie: token must be a non-empty cookie value",
      2)
  end
  local max_age = max_age_of(opts, _M.SESSION_MAX_AGE,
    "session.session_cookie")
  return build(_M.SESSION_COOKIE, token, max_age, opts)
end


-- Returns the Set-Cookie value of the proxy cookie, which carries the
-- owner's proxy JWT. opts: max_age (default PROXY_MAX_AGE), dev.
function _M.proxy_cookie(jwt, opts)
  if not is_cookie_value(jwt) or jwt == "" then
    error("session.proxy_cookie: jwt must be a non-empty cookie value", 2)
  end
  local max_age = max_age_of(opts, _M.PROXY_MAX_AGE, "session.proxy_cookie")
  return build(_M.PROXY_COOKIE, jwt, max_age, opts)
end


-- Returns a Set-Cookie value that deletes the cookie name: an empty value
-- and Max-Age=0, with the same Path and flags as when it was set (a
-- browser deletes only a cookie that matches name, domain and path).
function _M.clear_cookie(name, opts)
  if not is_cookie_name(name) then
    error("session.clear_cookie: cookie name must be an HTTP token", 2)
  end
  return build(name, "", 0, opts)
end


-- Returns a new per-session CSRF secret (TOKEN_BYTES in base64url) to
-- store with the session, or nil, message, code.
function _M.csrf_secret()
  return random_text()
end


local function check_csrf_arguments(secret, session_id, where)
  if type(secret) ~= "string" or secret == "" then
    error(where .. ": secret must be a non-empty string", 3)
  end
  if type(session_id) ~= "string" or session_id == "" then
    error(where .. ": session_id must be a non-empty string", 3)
  end
end


-- Returns the CSRF token of a session: base64url of
-- HMAC-SHA256(secret, session_id). session_id is any stable identifier of
-- the session, such as its stored hash.
function _M.csrf_token(secret, session_id)
  check_csrf_arguments(secret, session_id, "session.csrf_token")
  return b64url_encode(hmac_sha256(secret, session_id))
end


-- Returns true when presented is the CSRF token of this session. The
-- comparison takes the same time wherever the tokens differ. A missing or
-- non-string token returns false.
function _M.verify_csrf(secret, session_id, presented)
  check_csrf_arguments(secret, session_id, "session.verify_csrf")
  if type(presented) ~= "string" then
    return false
  end
  return constant_time_equal(_M.csrf_token(secret, session_id), presented)
end


local function parse_into(header, cookies, counts)
  for pair in sgmatch(header, "[^;]+") do
    local name, value = smatch(pair, "^[ \t]*([^=]-)[ \t]*=[ \t]*(.-)[ \t]*$")
    if name and is_cookie_name(name) then
      if #value >= 2 and ssub(value, 1, 1) == '"'
          and ssub(value, -1) == '"' then
        value = ssub(value, 2, -2)
      end
      local seen = counts[name]
      if not seen then
        cookies[name] = value
      end
      counts[name] = (seen or 0) + 1
    end
  end
end


-- Parses Cookie header values into a map of name to value. header may be
-- nil, one string, or a list of strings (one per Cookie header line).
-- Pairs without "=" or with a name that is not a token are skipped, and
-- one pair of surrounding double quotes is removed from a value. Values
-- are not percent-decoded. When a name appears more than once, the first
-- value wins: browsers send cookies with longer paths first. The second
-- result maps each name to how many times it appeared.
function _M.parse_cookies(header)
  local cookies, counts = {}, {}
  if header == nil then
    return cookies, counts
  end
  if type(header) == "string" then
    parse_into(header, cookies, counts)
  elseif type(header) == "table" then
    for _, line in ipairs(header) do
      if type(line) ~= "string" then
        error("session.parse_cookies: header lines must be strings", 2)
      end
      parse_into(line, cookies, counts)
    end
  else
    error("session.parse_cookies: header must be a string, a list of "
      .. "strings or nil, got " .. type(header), 2)
  end
  return cookies, counts
end


-- Returns the value of one cookie, or nil, message, code:
--   missing_cookie    the cookie is absent or empty
--   duplicate_cookie  it appears more than once
-- Use this for credentials. Another host under the same parent domain
-- can set a cookie of the same name with a Domain attribute, and a
-- duplicate is more likely such a cookie than the one this platform set.
function _M.get_cookie(header, name)
  local cookies, counts = _M.parse_cookies(header)
  local value = cookies[name]
  if value == nil or value == "" then
    return fail("cookie " .. tostring(name) .. " is missing",
      "missing_cookie")
  end
  if counts[name] > 1 then
    return fail("cookie " .. tostring(name) .. " appears "
      .. counts[name] .. " times", "duplicate_cookie")
  end
  return value
end


return _M
