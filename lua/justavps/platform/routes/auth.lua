-- Dashboard sign-in: POST /api/v1/auth/signup, /auth/login and
-- /auth/logout, GET /api/v1/me, and sign-in with GitHub through
-- GET /api/v1/auth/github and /auth/github/callback.
--
-- A session lives in the __justavps_session cookie (HttpOnly,
-- SameSite=Lax, Path=/, no Domain, Secure unless auth.dev is set). The
-- sign-in responses carry csrf_token, which the dashboard sends back as
-- X-CSRF-Token on every cookie-authenticated write (see auth_user).
-- Login and signup attempts are rate-limited per client IP and login
-- attempts per email address by policies.rate_limit.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local password = require("justavps.auth.password")
local session = require("justavps.auth.session")
local api_mod = require("justavps.platform.api")
local accounts = require("justavps.platform.accounts")
local auth_user = require("justavps.platform.auth_user")
local rate_state = require("justavps.platform.rate_state")
local state = require("justavps.platform.state")
local rate_limit = require("policies.rate_limit")

local crypto = core.crypto
local pg_null = core.pg.null

local type = type
local ipairs = ipairs
local tonumber = tonumber
local tostring = tostring
local floor = math.floor
local char = string.char
local format = string.format
local slower = string.lower
local smatch = string.match
local sgsub = string.gsub
local sgmatch = string.gmatch
local sfind = string.find
local ssub = string.sub
local concat = table.concat
local tinsert = table.insert

-- The cookie that binds a GitHub callback to the browser that started
-- the sign-in (the OAuth state parameter), and how long it lives.
local STATE_COOKIE = "__justavps_oauth_state"
local STATE_MAX_AGE = 600

-- Largest JSON body of signup and login.
local MAX_AUTH_BODY = 8 * 1024

-- Largest response body read from GitHub.
local MAX_GITHUB_BODY = 1024 * 1024

local EMAIL_FIELD = { type = "string", required = true, len_min = 3,
  len_max = 254, match = "^[^%s@]+@[^%s@]+$",
  match_text = "an email address (NAME@DOMAIN, without spaces)",
  description = "email address" }

-- Passwords are declared as plain strings: a length bound here would
-- echo the password in the validation message. password.check_policy
-- checks the length without quoting it.
local PASSWORD_FIELD = { type = "string", required = true,
  description = "password, 8 to 1024 bytes" }


local function conf()
  return state.conf.auth
end


local function cookie_options()
  local c = conf()
  return { max_age = floor(c.session_ttl), dev = c.dev }
end


local function json_reply(status, value, headers)
  headers = headers or {}
  headers["Content-Type"] = "application/json"
  headers["Cache-Control"] = "no-store"
  return status, headers, json.encode(value) .. "\n"
end


local function error_reply(status, code, message, headers)
  return json_reply(status, { error = { code = code, message = message } },
    headers)
end


local function database_error(what, err, code)
  if code == "database_unavailable" or code == "timeout" then
    log.err(what .. " failed: database unavailable", { error = err,
      code = code })
    return api_mod.error(503, "database_unavailable",
      "the database is unavailable; retry later")
  end
  log.err(what .. " failed", { error = err, code = code })
  return api_mod.error(500, "internal", "internal server error")
end


-- Returns the client's IP address as the key of the per-IP limit.
-- NOTE: this is the TCP peer. Behind a load balancer every client shares
-- its address until a trusted X-Forwarded-For is read here.
local function client_ip(req)
  local ip = req:peer()
  return ip or "unknown"
end


-- Counts one attempt under each key in order. Returns nil when every key
-- allows it, or the whole seconds to wait after the first key that
-- denies (later keys are then not counted).
local function rate_limited(keys)
  local c = conf().login_rate
  local now = core.now()
  for _, key in ipairs(keys) do
    local ok, new_state, expires = rate_limit.decide(key, now,
      rate_state.get(key, now), c)
    if not ok then
      return new_state
    end
    rate_state.set(key, new_state, expires, now, c.max_entries)
  end
  return nil
end


local function too_many(retry_after, what)
  log.warn("rate-limited " .. what, { retry_after = retry_after })
  return error_reply(429, "rate_limited", "too many " .. what
    .. " attempts; retry after " .. retry_after .. " seconds",
    { ["Retry-After"] = tostring(retry_after) })
end


-- Creates a session for user_id. Returns the credentials and the
-- session row, or nil, what failed, message, code.
local function start_session(user_id)
  local creds, err, code = auth_user.new_session()
  if not creds then
    return nil, "session credentials", err, code
  end
  local row, serr, scode = accounts.create_session(user_id,
    creds.token_hash, creds.csrf_secret_hash, conf().session_ttl)
  if not row then
    return nil, "session insert", serr, scode
  end
  return creds, row
end


local function signed_in_body(profile, creds, row)
  return {
    user = profile.user,
    account = profile.account,
    csrf_token = auth_user.csrf_token(creds.token, row.id),
    expires_at = row.expires_at,
  }
end


local function signup(ctx)
  local body = ctx.body
  local ok, perr, pcode = password.check_policy(body.password)
  if not ok then
    return api_mod.error(400, pcode, "password: " .. perr)
  end

  local retry_after = rate_limited({ "ip:" .. client_ip(ctx.req) })
  if retry_after then
    return too_many(retry_after, "signup")
  end

  local hash, herr, hcode = password.hash(body.password)
  if not hash then
    log.err("password hashing failed", { error = herr, code = hcode })
    return api_mod.error(500, "internal", "internal server error")
  end
  local creds, cerr, ccode = auth_user.new_session()
  if not creds then
    return database_error("session credentials", cerr, ccode)
  end

  local result, err, code = accounts.sign_up({
    email = body.email,
    password_hash = hash,
    account_name = body.name or body.email,
    session = { token_hash = creds.token_hash,
      csrf_secret_hash = creds.csrf_secret_hash, ttl = conf().session_ttl },
  })
  if not result then
    if code == "23505" then
      return api_mod.error(409, "email_taken", "email: an account with "
        .. "this address exists already; sign in instead")
    end
    return database_error("signup", err, code)
  end

  log.info("signed up", { user_id = result.user.id,
    account_id = result.account.id })
  return json_reply(201, signed_in_body(result, creds, result.session), {
    ["Set-Cookie"] = session.session_cookie(creds.token, cookie_options()),
  })
end


local function invalid_credentials()
  return api_mod.error(401, "invalid_credentials",
    "wrong email or password")
end


local function login(ctx)
  local body = ctx.body
  local email = body.email
  local retry_after = rate_limited({ "ip:" .. client_ip(ctx.req),
    "email:" .. slower(email) })
  if retry_after then
    return too_many(retry_after, "login")
  end

  local user, err, code = accounts.find_user_by_email(email)
  if not user then
    if code ~= "not_found" then
      return database_error("login lookup", err, code)
    end
    -- Takes as long as a real check, so the response time does not
    -- reveal which addresses have accounts.
    password.dummy_verify(body.password)
    return invalid_credentials()
  end
  if user.password_hash == pg_null then
    -- A user who signs in only through GitHub.
    password.dummy_verify(body.password)
    return invalid_credentials()
  end

  local ok, verr, vcode = password.verify(body.password, user.password_hash)
  if not ok then
    if vcode and vcode ~= "password_too_long" then
      log.err("stored password hash unusable", { user_id = user.id,
        error = verr, code = vcode })
    end
    return invalid_credentials()
  end

  if password.needs_rehash(user.password_hash) then
    local new_hash, herr, hcode = password.hash(body.password)
    if new_hash then
      local _, uerr, ucode = accounts.set_password_hash(user.id, new_hash)
      herr, hcode = uerr, ucode
    end
    if hcode then
      -- The login goes on with the old hash, which verified.
      log.warn("could not replace an outdated password hash", {
        user_id = user.id, error = herr, code = hcode })
    end
  end

  local creds, row, serr, scode = start_session(user.id)
  if not creds then
    return database_error(row, serr, scode)
  end
  local profile, perr, pcode = accounts.profile(user.id)
  if not profile then
    return database_error("profile lookup", perr, pcode)
  end
  log.info("logged in", { user_id = user.id, session_id = row.id })
  return json_reply(200, signed_in_body(profile, creds, row), {
    ["Set-Cookie"] = session.session_cookie(creds.token, cookie_options()),
  })
end


local function logout(ctx)
  if ctx.auth_method ~= "session" then
    return api_mod.error(400, "not_a_session", "logout ends a dashboard "
      .. "session; revoke an API key with DELETE /api/v1/api-keys/{id}")
  end
  local _, err, code = accounts.delete_session(ctx.session.id)
  if code then
    return database_error("logout", err, code)
  end
  log.info("logged out", { user_id = ctx.user.id,
    session_id = ctx.session.id })
  return 204, {
    ["Set-Cookie"] = session.clear_cookie(session.SESSION_COOKIE,
      { dev = conf().dev }),
    ["Cache-Control"] = "no-store",
  }, ""
end


local function me(ctx)
  local out = { auth_method = ctx.auth_method }
  if ctx.auth_method == "api_key" then
    out.scopes = ctx.scopes
    out.api_key = ctx.api_key
  else
    out.csrf_token = ctx.session.csrf_token
  end

  if not ctx.user.id then
    -- A key whose creator was deleted acts for the account alone.
    out.user = json.null
    out.account = { id = ctx.user.account_id }
    return json_reply(200, out)
  end
  local profile, err, code = auth_user.load_user(ctx)
  if not profile then
    return database_error("profile lookup", err, code)
  end
  out.user = profile.user
  out.account = profile.account
  return json_reply(200, out)
end


-- Query strings and form bodies ----------------------------------------

local function percent_decode(s)
  s = sgsub(s, "+", " ")
  return (sgsub(s, "%%(%x%x)", function(hex)
    return char(tonumber(hex, 16))
  end))
end


local function percent_encode(s)
  return (sgsub(s, "[^%w%-%._~]", function(c)
    return format("%%%02X", c:byte())
  end))
end


-- Parses a query string. A name given more than once keeps its first
-- value.
local function parse_query(query)
  local out = {}
  for pair in sgmatch(query or "", "[^&]+") do
    local name, value = smatch(pair, "^([^=]*)=?(.*)$")
    name = percent_decode(name)
    if out[name] == nil then
      out[name] = percent_decode(value)
    end
  end
  return out
end


-- Encodes pairs { { name, value }, ... } as
-- application/x-www-form-urlencoded.
local function form_encode(pairs_list)
  local parts = {}
  for _, pair in ipairs(pairs_list) do
    parts[#parts + 1] = percent_encode(pair[1]) .. "="
      .. percent_encode(pair[2])
  end
  return concat(parts, "&")
end


-- GitHub ---------------------------------------------------------------

-- Sends one request to GitHub through core.curl, which resolves names and
-- speaks TLS. opts: method, url, headers, body, timeout. Returns status,
-- body text, or nil, message, code.
local function default_http_request(opts)
  local res, err, code = core.curl.request({ method = opts.method,
    url = opts.url, headers = opts.headers, body = opts.body,
    timeout = opts.timeout, max_body = MAX_GITHUB_BODY })
  if not res then
    return nil, err, code
  end
  return res.status, res.body
end


local function github_configured()
  local g = conf().github
  return g.client_id ~= "" and g.client_secret ~= ""
end


-- Joins a base URL and a path that starts with "/".
local function join(base, path)
  return (sgsub(base, "/+$", "")) .. path
end


local function github_start()
  if not github_configured() then
    return api_mod.error(503, "github_not_configured",
      "GitHub sign-in is off: set auth.github.client_id and client_secret")
  end
  local g = conf().github
  local oauth_state, err, code = crypto.random_token(43)
  if not oauth_state then
    return database_error("OAuth state", err, code)
  end
  local params = { { "client_id", g.client_id } }
  if g.redirect_url ~= "" then
    params[#params + 1] = { "redirect_uri", g.redirect_url }
  end
  params[#params + 1] = { "scope", "read:user user:email" }
  params[#params + 1] = { "state", oauth_state }

  return 302, {
    Location = join(g.web_url, "/login/oauth/authorize?")
      .. form_encode(params),
    ["Set-Cookie"] = session.cookie(STATE_COOKIE, oauth_state,
      { max_age = STATE_MAX_AGE, dev = conf().dev }),
    ["Cache-Control"] = "no-store",
  }, ""
end


-- Calls GitHub and decodes its JSON response. Returns the value, or nil,
-- message.
local function github_json(http_request, opts)
  opts.timeout = conf().github.timeout
  local status, text, code = http_request(opts)
  if not status then
    return nil, "GitHub call failed: " .. tostring(text) .. " ("
      .. tostring(code) .. ")"
  end
  if status ~= 200 then
    return nil, "GitHub returned status " .. status
  end
  local value, derr = json.decode(text)
  if value == nil then
    return nil, "GitHub returned invalid JSON: " .. tostring(derr)
  end
  return value
end


-- Exchanges the callback's code for a token and reads the GitHub user
-- and their verified addresses. Returns { id, login, name, emails } with
-- the primary address first, or nil, status, code, message.
local function github_identity(http_request, code)
  local g = conf().github
  local params = { { "client_id", g.client_id },
    { "client_secret", g.client_secret }, { "code", code } }
  if g.redirect_url ~= "" then
    params[#params + 1] = { "redirect_uri", g.redirect_url }
  end
  local token, terr = github_json(http_request, { method = "POST",
    url = join(g.web_url, "/login/oauth/access_token"),
    headers = { Accept = "application/json",
      ["Content-Type"] = "application/x-www-form-urlencoded" },
    body = form_encode(params) })
  if type(token) ~= "table" or type(token.access_token) ~= "string" then
    -- GitHub returns 200 with an "error" member for a bad or used code.
    local reason = type(token) == "table" and tostring(token.error) or terr
    log.warn("GitHub code exchange failed", { reason = reason })
    return nil, 502, "github_failed", "GitHub rejected the sign-in; start "
      .. "again from /api/v1/auth/github"
  end

  local headers = { Accept = "application/vnd.github+json",
    Authorization = "Bearer " .. token.access_token,
    ["User-Agent"] = "JustAVPS", ["X-GitHub-Api-Version"] = "2022-11-28" }
  local user, uerr = github_json(http_request, { method = "GET",
    url = join(g.api_url, "/user"), headers = headers })
  local emails, eerr = github_json(http_request, { method = "GET",
    url = join(g.api_url, "/user/emails"), headers = headers })
  if type(user) ~= "table" or type(user.id) ~= "number"
      or type(emails) ~= "table" then
    log.warn("GitHub user lookup failed", { error = uerr or eerr })
    return nil, 502, "github_failed", "could not read the GitHub user; "
      .. "retry later"
  end

  local verified = {}
  for _, entry in ipairs(emails) do
    if type(entry) == "table" and entry.verified == true
        and type(entry.email) == "string" and #entry.email <= 254
        and sfind(entry.email, "^[^%s@]+@[^%s@]+$") then
      if entry.primary == true then
        tinsert(verified, 1, entry.email)
      else
        verified[#verified + 1] = entry.email
      end
    end
  end
  return { id = user.id, login = user.login, name = user.name,
    emails = verified }
end


local function account_name_of(identity)
  local name = identity.name
  if type(name) ~= "string" or name == "" then
    name = identity.login
  end
  if type(name) ~= "string" or name == "" then
    name = identity.emails[1]
  end
  return ssub(name, 1, 200)
end


local function github_callback(ctx, http_request)
  local dev = conf().dev
  local clear_state = session.clear_cookie(STATE_COOKIE, { dev = dev })
  local fail = function(status, code, message)
    return error_reply(status, code, message, { ["Set-Cookie"] = clear_state })
  end
  if not github_configured() then
    return fail(503, "github_not_configured",
      "GitHub sign-in is off: set auth.github.client_id and client_secret")
  end

  local query = parse_query(ctx.query)
  local expected = session.get_cookie(ctx.req:headers()["cookie"],
    STATE_COOKIE)
  if not expected or type(query.state) ~= "string"
      or not crypto.constant_time_equal(expected, query.state) then
    return fail(400, "invalid_oauth_state", "the sign-in state does not "
      .. "match this browser; start again from /api/v1/auth/github")
  end
  if query.error then
    return fail(400, "github_denied", "GitHub did not grant access: "
      .. ssub(query.error, 1, 100))
  end
  if not query.code or query.code == "" then
    return fail(400, "invalid_request", "code: required query parameter "
      .. "is missing")
  end

  local retry_after = rate_limited({ "ip:" .. client_ip(ctx.req) })
  if retry_after then
    return too_many(retry_after, "sign-in")
  end

  local identity, status, code, message = github_identity(http_request,
    query.code)
  if not identity then
    return fail(status, code, message)
  end

  local user, err, ecode = accounts.find_user_by_github_id(identity.id)
  local creds, session_row, outcome
  if user then
    local what, serr, scode
    creds, what, serr, scode = start_session(user.id)
    if not creds then
      return database_error(what, serr, scode)
    end
    session_row, outcome = what, "existing"
  elseif ecode ~= "not_found" then
    return database_error("GitHub user lookup", err, ecode)
  else
    if #identity.emails == 0 then
      return fail(403, "github_email_unverified", "the GitHub account has "
        .. "no verified email address; verify one on GitHub and retry")
    end
    local cerr, ccode
    creds, cerr, ccode = auth_user.new_session()
    if not creds then
      return database_error("session credentials", cerr, ccode)
    end
    local result, rerr, rcode = accounts.github_sign_in(identity.id,
      identity.emails, account_name_of(identity), {
        token_hash = creds.token_hash,
        csrf_secret_hash = creds.csrf_secret_hash,
        ttl = conf().session_ttl })
    if not result then
      if rcode == "github_conflict" or rcode == "23505" then
        return fail(409, "github_conflict", "the account with this email "
          .. "is linked to another GitHub user")
      end
      return database_error("GitHub sign-in", rerr, rcode)
    end
    user, session_row = result.user, result.session
    outcome = result.created and "created" or "linked"
  end

  log.info("signed in with GitHub", { user_id = user.id,
    session_id = session_row.id, github_id = identity.id,
    outcome = outcome })
  return 302, {
    Location = conf().github.after_login_url,
    ["Set-Cookie"] = { session.session_cookie(creds.token,
      cookie_options()), clear_state },
    ["Cache-Control"] = "no-store",
  }, ""
end


-- Registers the routes. opts.http_request replaces the HTTP client of
-- the GitHub calls: a function(opts) with opts { method, url, headers,
-- body, timeout } returning status, body text or nil, message, code.
return function(api, opts)
  local http_request = opts and opts.http_request or default_http_request

  api:route({
    method = "POST", path = "/api/v1/auth/signup", name = "signup",
    auth = "none", status = 201, max_body = MAX_AUTH_BODY,
    summary = "Create an account and its first user, and sign in",
    body = { fields = {
      { email = EMAIL_FIELD },
      { password = PASSWORD_FIELD },
      { name = { type = "string", len_min = 1, len_max = 200,
        description = "account name; default: the email address" } },
    } },
    handler = signup,
  })

  api:route({
    method = "POST", path = "/api/v1/auth/login", name = "login",
    auth = "none", max_body = MAX_AUTH_BODY,
    summary = "Sign in with email and password; sets the session cookie",
    body = { fields = {
      { email = EMAIL_FIELD },
      { password = PASSWORD_FIELD },
    } },
    handler = login,
  })

  api:route({
    method = "POST", path = "/api/v1/auth/logout", name = "logout",
    auth = "user", status = 204,
    summary = "End the dashboard session and clear its cookie",
    handler = logout,
  })

  api:route({
    method = "GET", path = "/api/v1/me", name = "me", auth = "user",
    scope = "read",
    summary = "The authenticated user, their account and how they signed in",
    handler = me,
  })

  api:route({
    method = "GET", path = "/api/v1/auth/github", name = "github_start",
    auth = "none", status = 302,
    summary = "Redirect to GitHub to sign in",
    handler = github_start,
  })

  api:route({
    method = "GET", path = "/api/v1/auth/github/callback",
    name = "github_callback", auth = "none", status = 302,
    summary = "GitHub's redirect back: sign in, link or create the user",
    handler = function(ctx)
      return github_callback(ctx, http_request)
    end,
  })
end
