-- Dashboard sign-in against a real platform process and a fresh database.
-- It covers signup, login, logout and /me with cookies, CSRF on cookie
-- writes, input validation with the database left unchanged, and login
-- rate limits. Sign-in with GitHub runs against a stand-in GitHub that
-- this spec serves. The rate-limit policy is checked alone first.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")
local rate_limit = require("policies.rate_limit")

local async = helpers.async
local crypto = core.crypto

local platform = require("support.platform")

local PASSWORD = platform.PASSWORD
local EMAIL_LIMIT = 5


describe("rate_limit policy", function()
  local conf = { ip = { limit = 3, window = 60 }, email = { limit = 1,
    window = 10 } }

  it("allows limit attempts then denies", function()
    local state
    for i = 1, 3 do
      local ok, new_state = rate_limit.decide("ip:a", 100, state, conf)
      assert.is_true(ok, "attempt " .. i)
      state = new_state
    end
    local ok, retry_after = rate_limit.decide("ip:a", 100, state, conf)
    assert.is_false(ok)
    assert.equal(20, retry_after)
  end)

  it("regains one attempt per interval", function()
    local state
    for _ = 1, 3 do
      local _, new_state = rate_limit.decide("ip:a", 100, state, conf)
      state = new_state
    end
    assert.is_false((rate_limit.decide("ip:a", 119, state, conf)))
    local ok, new_state = rate_limit.decide("ip:a", 120, state, conf)
    assert.is_true(ok)
    assert.is_false((rate_limit.decide("ip:a", 120, new_state, conf)))
  end)

  it("uses the limit of the key's kind", function()
    local ok, state = rate_limit.decide("email:x@y", 0, nil, conf)
    assert.is_true(ok)
    local denied, retry_after = rate_limit.decide("email:x@y", 0, state, conf)
    assert.is_false(denied)
    assert.equal(10, retry_after)
  end)

  it("allows an inexact interval limit times", function()
    local odd = { ip = { limit = 7, window = 100 } }
    local state
    for i = 1, 7 do
      local ok, new_state = rate_limit.decide("ip:b", 5, state, odd)
      assert.is_true(ok, "attempt " .. i)
      state = new_state
    end
    assert.is_false((rate_limit.decide("ip:b", 5, state, odd)))
  end)

  it("raises on a key without a limit", function()
    assert.has_error(function()
      rate_limit.decide("user:1", 0, nil, conf)
    end)
    assert.has_error(function()
      rate_limit.decide("no-kind", 0, nil, conf)
    end)
  end)
end)


local function hex_sha256(s)
  return crypto.hex_encode(crypto.sha256(s))
end


-- Parses one Set-Cookie value into name, value and a table of attributes
-- with lower-case names (flags map to true).
local function parse_set_cookie(header)
  local parts = {}
  for part in header:gmatch("[^;]+") do
    parts[#parts + 1] = part:match("^%s*(.-)%s*$")
  end
  local name, value = parts[1]:match("^([^=]+)=(.*)$")
  local attrs = {}
  for i = 2, #parts do
    local k, v = parts[i]:match("^([^=]+)=(.*)$")
    if k then
      attrs[k:lower()] = v
    else
      attrs[parts[i]:lower()] = true
    end
  end
  return name, value, attrs
end


-- Returns the Set-Cookie value for name among the response headers.
local function set_cookie_of(headers, name)
  local values = headers["set-cookie"]
  if type(values) == "string" then
    values = { values }
  end
  for _, v in ipairs(values or {}) do
    local n = parse_set_cookie(v)
    if n == name then
      return v
    end
  end
  return nil
end


-- The stand-in GitHub: the token endpoint and /user, /user/emails, with
-- one identity per authorization code.
local GITHUB_IDENTITIES = {
  new = { user = { id = 1001, login = "octo-new", name = "Octo New" },
    emails = { { email = "secondary@example.com", primary = false,
      verified = true }, { email = "gh-new@example.com", primary = true,
      verified = true } } },
  link = { user = { id = 1002, login = "octo-link" },
    emails = { { email = "LINK@example.com", primary = true,
      verified = true } } },
  unverified = { user = { id = 1003, login = "octo-unverified" },
    emails = { { email = "unverified@example.com", primary = true,
      verified = false } } },
}

local function parse_form(body)
  local out = {}
  for pair in body:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=(.*)$")
    out[k] = v:gsub("+", " "):gsub("%%(%x%x)", function(h)
      return string.char(tonumber(h, 16))
    end)
  end
  return out
end


local function start_fake_github(client_id, client_secret)
  local seen = { exchanges = 0 }
  local function reply(status, value)
    return status, { ["Content-Type"] = "application/json" },
      json.encode(value)
  end
  local server = assert(core.http.listen({ host = "127.0.0.1", port = 0,
    access_log = false,
    handler = function(req)
      if req.method == "POST" and req.path == "/login/oauth/access_token" then
        local parts = {}
        while true do
          local chunk = req:read()
          if not chunk then
            break
          end
          parts[#parts + 1] = chunk
        end
        local form = parse_form(table.concat(parts))
        seen.exchanges = seen.exchanges + 1
        if form.client_id ~= client_id or form.client_secret ~= client_secret then
          return reply(200, { error = "incorrect_client_credentials" })
        end
        if not GITHUB_IDENTITIES[form.code] then
          return reply(200, { error = "bad_verification_code" })
        end
        return reply(200, { access_token = "gho_" .. form.code,
          token_type = "bearer", scope = "read:user,user:email" })
      end

      local code = (req:header("authorization") or ""):match("^Bearer gho_(%w+)$")
      local identity = GITHUB_IDENTITIES[code]
      if not identity then
        return reply(401, { message = "Bad credentials" })
      end
      if req.method == "GET" and req.path == "/user" then
        return reply(200, identity.user)
      end
      if req.method == "GET" and req.path == "/user/emails" then
        return reply(200, identity.emails)
      end
      return reply(404, { message = "Not Found" })
    end,
  }))
  return server, seen
end


describe("platform auth routes", function()
  local db, github, github_seen, base_env
  local processes = {}
  local port

  local function sql(query, params)
    return db:sql(query, params)
  end

  local function counts()
    return sql("SELECT (SELECT count(*) FROM accounts) AS accounts, "
      .. "(SELECT count(*) FROM users) AS users, "
      .. "(SELECT count(*) FROM sessions) AS sessions, "
      .. "(SELECT count(*) FROM api_keys) AS api_keys")[1]
  end

  -- Starts a platform process with the spec's settings and extra ones;
  -- returns its port.
  local function start_platform(extra)
    local env = {}
    for k, v in pairs(base_env) do
      env[k] = v
    end
    for k, v in pairs(extra or {}) do
      env[k] = v
    end
    local p = platform.start(db, { env = env })
    processes[#processes + 1] = p
    return p.port
  end

  setup(function()
    helpers.run(function()
      db = platform.database()
      github, github_seen = start_fake_github("spec-client", "spec-secret")
      local github_url = "http://127.0.0.1:" .. github:port()
      base_env = {
        JUSTAVPS_PLATFORM_AUTH_LOGIN_RATE_EMAIL_LIMIT = tostring(EMAIL_LIMIT),
        JUSTAVPS_PLATFORM_AUTH_LOGIN_RATE_EMAIL_WINDOW = "3600",
        JUSTAVPS_PLATFORM_AUTH_LOGIN_RATE_IP_LIMIT = "100000",
        JUSTAVPS_PLATFORM_AUTH_GITHUB_CLIENT_ID = "spec-client",
        JUSTAVPS_PLATFORM_AUTH_GITHUB_CLIENT_SECRET = "spec-secret",
        JUSTAVPS_PLATFORM_AUTH_GITHUB_WEB_URL = github_url,
        JUSTAVPS_PLATFORM_AUTH_GITHUB_API_URL = github_url .. "/",
        JUSTAVPS_PLATFORM_AUTH_GITHUB_AFTER_LOGIN_URL = "/dashboard",
      }
      port = start_platform()
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      for _, p in ipairs(processes) do
        p:stop()
      end
      if github then
        github:close()
      end
      if db then
        db:drop()
      end
    end, 60)
  end)

  -- Sends a request; returns status, decoded body (or the raw text when
  -- it is not JSON) and the response headers.
  local function request(method, path, headers, body, to_port)
    return platform.request_port(to_port or port, method, path, headers,
      body)
  end

  local function post_json(path, value, headers, to_port)
    headers = headers or {}
    headers["Content-Type"] = "application/json"
    return request("POST", path, headers, json.encode(value), to_port)
  end

  -- Signs up and returns the session token, the body and the headers.
  local function signup(email, password, to_port)
    local status, body, headers = post_json("/api/v1/auth/signup",
      { email = email, password = password or PASSWORD }, nil, to_port)
    assert.equal(201, status)
    local _, token = parse_set_cookie(set_cookie_of(headers,
      "__justavps_session"))
    return token, body, headers
  end

  local function cookie(token)
    return "__justavps_session=" .. token
  end

  it("signs up with a session cookie", async(function()
    local before = counts()
    local status, body, headers = post_json("/api/v1/auth/signup",
      { email = "Ada@Example.com", password = PASSWORD, name = "Ada's team" })
    assert.equal(201, status)
    assert.equal("Ada@Example.com", body.user.email)
    assert.equal("Ada's team", body.account.name)
    assert.equal(body.account.id, body.user.account_id)
    assert.is_string(body.csrf_token)
    assert.equal("no-store", headers["cache-control"])

    local name, token, attrs = parse_set_cookie(set_cookie_of(headers,
      "__justavps_session"))
    assert.equal("__justavps_session", name)
    assert.equal(43, #token)
    assert.is_true(attrs.httponly)
    assert.equal("Lax", attrs.samesite)
    assert.equal("/", attrs.path)
    assert.is_true(attrs.secure)
    assert.is_nil(attrs.domain)
    assert.equal("604800", attrs["max-age"])

    local after = counts()
    assert.equal(before.accounts + 1, after.accounts)
    assert.equal(before.users + 1, after.users)
    assert.equal(before.sessions + 1, after.sessions)
    local row = sql("SELECT token_hash FROM sessions s JOIN users u ON "
      .. "u.id = s.user_id WHERE u.email = $1", { "Ada@Example.com" })[1]
    assert.equal(hex_sha256(token), row.token_hash)
    local user = sql("SELECT password_hash FROM users WHERE email = $1",
      { "Ada@Example.com" })[1]
    assert.truthy(user.password_hash:find("^scrypt%$"))
  end))

  it("rejects a taken email in any case", async(function()
    signup("taken@example.com")
    local before = counts()
    local status, body = post_json("/api/v1/auth/signup",
      { email = "TAKEN@example.COM", password = PASSWORD })
    assert.equal(409, status)
    assert.equal("email_taken", body.error.code)
    assert.same(before, counts())
  end))

  local bad_signups = {
    { "a short password", json.encode({ email = "s@example.com",
      password = "short" }), 400, "password_too_short", "password" },
    { "a password too long", json.encode({ email = "l@example.com",
      password = ("x"):rep(1025) }), 400, "password_too_long", "password" },
    { "invalid JSON", "{\"email\": ", 400, "invalid_json" },
    { "a JSON array", "[]", 400, "invalid_request" },
    { "a missing email", json.encode({ password = PASSWORD }), 400,
      "invalid_request", "email" },
    { "a malformed email", json.encode({ email = "no-at-sign",
      password = PASSWORD }), 400, "invalid_request", "an email address" },
    { "a password of the wrong type", json.encode({ email = "t@example.com",
      password = 12345678 }), 400, "invalid_request", "password" },
    { "an unknown field", json.encode({ email = "u@example.com",
      password = PASSWORD, admin = true }), 400, "invalid_request", "admin" },
    { "an empty name", json.encode({ email = "n@example.com",
      password = PASSWORD, name = "" }), 400, "invalid_request", "name" },
    { "an oversized body", json.encode({ email = "o@example.com",
      password = PASSWORD, name = ("n"):rep(9000) }), 413, "too_large" },
  }

  for _, case in ipairs(bad_signups) do
    it("rejects a signup with " .. case[1], async(function()
      local before = counts()
      local status, body = request("POST", "/api/v1/auth/signup",
        { ["Content-Type"] = "application/json" }, case[2])
      assert.equal(case[3], status)
      assert.equal(case[4], body.error.code)
      if case[5] then
        assert.truthy(body.error.message:find(case[5], 1, true),
          "message does not name " .. case[5] .. ": " .. body.error.message)
      end
      assert.not_truthy(body.error.message:find(PASSWORD, 1, true))
      -- Messages describe a format in words, not as a Lua pattern.
      assert.not_truthy(body.error.message:find("%s", 1, true),
        body.error.message)
      assert.same(before, counts())
    end))
  end

  it("serves /me for a session", async(function()
    local token, created = signup("me@example.com")
    local status, body = request("GET", "/api/v1/me",
      { Cookie = "theme=dark; " .. cookie(token) })
    assert.equal(200, status)
    assert.equal("session", body.auth_method)
    assert.equal("me@example.com", body.user.email)
    assert.equal(created.account.id, body.account.id)
    assert.equal(created.csrf_token, body.csrf_token)
    assert.is_nil(body.scopes)
  end))

  local unauthenticated = {
    { "no credentials", {} },
    { "an unknown session", { Cookie = cookie(("A"):rep(43)) } },
    { "a malformed session", { Cookie = cookie("short") } },
    { "a malformed key", { Authorization = "Bearer sk_live_short" } },
    { "an unknown key", { Authorization = "Bearer sk_live_" .. ("a"):rep(43) } },
    { "a Basic scheme", { Authorization = "Basic dXNlcjpwYXNz" } },
  }

  for _, case in ipairs(unauthenticated) do
    it("rejects /me with " .. case[1], async(function()
      local status, body = request("GET", "/api/v1/me", case[2])
      assert.equal(401, status)
      assert.equal("unauthorized", body.error.code)
    end))
  end

  it("rejects a duplicated session cookie", async(function()
    local token = signup("dup@example.com")
    local status, body = request("GET", "/api/v1/me",
      { Cookie = cookie(token) .. "; " .. cookie(token) })
    assert.equal(401, status)
    assert.equal("unauthorized", body.error.code)
  end))

  it("logs in with a new session", async(function()
    local first = signup("login@example.com")
    local before = counts()
    local status, body, headers = post_json("/api/v1/auth/login",
      { email = "LOGIN@example.com", password = PASSWORD })
    assert.equal(200, status)
    assert.equal("login@example.com", body.user.email)
    assert.is_string(body.account.id)
    local _, token, attrs = parse_set_cookie(set_cookie_of(headers,
      "__justavps_session"))
    assert.are_not.equal(first, token)
    assert.is_true(attrs.httponly)
    assert.equal(before.sessions + 1, counts().sessions)

    local me_status, me = request("GET", "/api/v1/me", { Cookie = cookie(token) })
    assert.equal(200, me_status)
    assert.equal(body.csrf_token, me.csrf_token)
  end))

  local bad_logins = {
    { "a wrong password", { email = "victim@example.com",
      password = "wrong password" } },
    { "an unknown email", { email = "nobody@example.com",
      password = PASSWORD } },
    { "a password too long", { email = "victim@example.com",
      password = ("p"):rep(2000) } },
  }

  for _, case in ipairs(bad_logins) do
    it("rejects a login with " .. case[1], async(function()
      if counts().users == 0 or #sql("SELECT 1 FROM users WHERE email = $1",
          { "victim@example.com" }) == 0 then
        signup("victim@example.com")
      end
      local before = counts()
      local status, body, headers = post_json("/api/v1/auth/login", case[2])
      assert.equal(401, status)
      assert.equal("invalid_credentials", body.error.code)
      assert.is_nil(headers["set-cookie"])
      assert.same(before, counts())
    end))
  end

  it("rejects a cookie write without the CSRF token", async(function()
    local token, created = signup("csrf@example.com")
    local before = counts()
    local cases = {
      { Cookie = cookie(token) },
      { Cookie = cookie(token), ["X-CSRF-Token"] = "wrong" },
      { Cookie = cookie(token), ["X-CSRF-Token"] = created.csrf_token .. "x" },
    }
    for i, headers in ipairs(cases) do
      local status, body = request("POST", "/api/v1/auth/logout", headers)
      assert.equal(403, status, "case " .. i)
      assert.equal("csrf_failed", body.error.code, "case " .. i)
      local kstatus, kbody = post_json("/api/v1/api-keys",
        { name = "k", scopes = { "read" } }, headers)
      assert.equal(403, kstatus, "case " .. i)
      assert.equal("csrf_failed", kbody.error.code, "case " .. i)
    end
    assert.same(before, counts())

    -- Another session's token does not fit this session.
    local _, other = signup("csrf-other@example.com")
    local status, body = request("POST", "/api/v1/auth/logout",
      { Cookie = cookie(token), ["X-CSRF-Token"] = other.csrf_token })
    assert.equal(403, status)
    assert.equal("csrf_failed", body.error.code)
  end))

  it("logs out and clears the cookie", async(function()
    local token, created = signup("logout@example.com")
    local before = counts()
    local status, body, headers = request("POST", "/api/v1/auth/logout",
      { Cookie = cookie(token), ["X-CSRF-Token"] = created.csrf_token })
    assert.equal(204, status)
    assert.equal("", body)
    local name, value, attrs = parse_set_cookie(set_cookie_of(headers,
      "__justavps_session"))
    assert.equal("__justavps_session", name)
    assert.equal("", value)
    assert.equal("0", attrs["max-age"])
    assert.equal("/", attrs.path)
    assert.equal(before.sessions - 1, counts().sessions)
    assert.equal(0, #sql("SELECT 1 FROM sessions WHERE token_hash = $1",
      { hex_sha256(token) }))

    local me_status = request("GET", "/api/v1/me", { Cookie = cookie(token) })
    assert.equal(401, me_status)
  end))

  it("rejects an expired session", async(function()
    local token = signup("expired@example.com")
    sql("UPDATE sessions SET created_at = now() - interval '2 days', "
      .. "expires_at = now() - interval '1 day' WHERE token_hash = $1",
      { hex_sha256(token) })
    local status, body = request("GET", "/api/v1/me", { Cookie = cookie(token) })
    assert.equal(401, status)
    assert.equal("unauthorized", body.error.code)
  end))

  it("bumps last_seen_at of an idle session", async(function()
    local token = signup("seen@example.com")
    sql("UPDATE sessions SET last_seen_at = now() - interval '10 minutes' "
      .. "WHERE token_hash = $1", { hex_sha256(token) })
    assert.equal(200, (request("GET", "/api/v1/me", { Cookie = cookie(token) })))
    local row = sql("SELECT last_seen_at > now() - interval '1 minute' AS "
      .. "fresh FROM sessions WHERE token_hash = $1", { hex_sha256(token) })[1]
    assert.is_true(row.fresh)
  end))

  it("rate-limits logins per email", async(function()
    signup("limited@example.com")
    for i = 1, EMAIL_LIMIT do
      local status = post_json("/api/v1/auth/login",
        { email = "limited@example.com", password = "wrong password" })
      assert.equal(401, status, "attempt " .. i)
    end
    local before = counts()
    local status, body, headers = post_json("/api/v1/auth/login",
      { email = "Limited@Example.com", password = PASSWORD })
    assert.equal(429, status)
    assert.equal("rate_limited", body.error.code)
    local retry_after = tonumber(headers["retry-after"])
    assert.is_number(retry_after)
    assert.is_true(retry_after >= 1)
    assert.same(before, counts())

    -- Another address from the same client is not affected.
    assert.equal(200, (post_json("/api/v1/auth/login",
      { email = "victim@example.com", password = PASSWORD })))
  end))

  it("rate-limits attempts per client IP", async(function()
    local dev_port = start_platform({
      JUSTAVPS_PLATFORM_AUTH_LOGIN_RATE_IP_LIMIT = "3",
      JUSTAVPS_PLATFORM_AUTH_DEV = "true",
    })
    local _, _, headers = signup("dev@example.com", nil, dev_port)
    local _, _, attrs = parse_set_cookie(set_cookie_of(headers,
      "__justavps_session"))
    assert.is_nil(attrs.secure)
    assert.is_true(attrs.httponly)

    for _, email in ipairs({ "a@example.com", "b@example.com" }) do
      local status = post_json("/api/v1/auth/login",
        { email = email, password = PASSWORD }, nil, dev_port)
      assert.equal(401, status)
    end
    local status, body, rheaders = post_json("/api/v1/auth/login",
      { email = "dev@example.com", password = PASSWORD }, nil, dev_port)
    assert.equal(429, status)
    assert.equal("rate_limited", body.error.code)
    assert.is_string(rheaders["retry-after"])
  end))

  describe("with GitHub", function()
    -- Starts the flow; returns the state and its cookie header.
    local function start()
      local status, _, headers = request("GET", "/api/v1/auth/github")
      assert.equal(302, status)
      local location = headers["location"]
      assert.equal("http://127.0.0.1:" .. github:port()
        .. "/login/oauth/authorize?", location:match("^[^?]+%?"))
      assert.equal("spec-client", location:match("[?&]client_id=([^&]+)"))
      assert.equal("read%3Auser%20user%3Aemail", location:match("[?&]scope=([^&]+)"))
      local state = location:match("[?&]state=([^&]+)")
      local name, value, attrs = parse_set_cookie(set_cookie_of(headers,
        "__justavps_oauth_state"))
      assert.equal("__justavps_oauth_state", name)
      assert.equal(state, value)
      assert.is_true(attrs.httponly)
      assert.equal("Lax", attrs.samesite)
      return state, name .. "=" .. value
    end

    local function callback(code, state, cookie_header)
      return request("GET", "/api/v1/auth/github/callback?code=" .. code
        .. "&state=" .. state, { Cookie = cookie_header })
    end

    it("creates a user from a new GitHub account", async(function()
      local before = counts()
      local state, state_cookie = start()
      local status, _, headers = callback("new", state, state_cookie)
      assert.equal(302, status)
      assert.equal("/dashboard", headers["location"])
      local _, token = parse_set_cookie(set_cookie_of(headers,
        "__justavps_session"))
      local _, cleared = parse_set_cookie(set_cookie_of(headers,
        "__justavps_oauth_state"))
      assert.equal("", cleared)

      local after = counts()
      assert.equal(before.accounts + 1, after.accounts)
      assert.equal(before.users + 1, after.users)
      local user = sql("SELECT email, github_id, email_verified, "
        .. "password_hash IS NULL AS no_password FROM users "
        .. "WHERE github_id = 1001")[1]
      assert.equal("gh-new@example.com", user.email)
      assert.is_true(user.email_verified)
      assert.is_true(user.no_password)

      local me_status, me = request("GET", "/api/v1/me", { Cookie = cookie(token) })
      assert.equal(200, me_status)
      assert.equal("gh-new@example.com", me.user.email)
      assert.equal("Octo New", me.account.name)

      -- Signing in again finds the same user.
      local state2, cookie2 = start()
      assert.equal(302, (callback("new", state2, cookie2)))
      assert.equal(after.users, counts().users)
    end))

    it("links an existing user by verified email", async(function()
      local old_token = signup("link@example.com")
      local before = counts()
      local state, state_cookie = start()
      local status, _, headers = callback("link", state, state_cookie)
      assert.equal(302, status)
      assert.is_string(set_cookie_of(headers, "__justavps_session"))
      local after = counts()
      assert.equal(before.users, after.users)
      assert.equal(before.accounts, after.accounts)
      local user = sql("SELECT github_id, email_verified, password_hash IS "
        .. "NULL AS no_password FROM users WHERE email = $1",
        { "link@example.com" })[1]
      assert.equal(1002, user.github_id)
      assert.is_true(user.email_verified)
      -- The address was never verified here, so the password and the
      -- sessions of the user who signed up with it are removed.
      assert.is_true(user.no_password)
      assert.equal(401, (request("GET", "/api/v1/me", { Cookie = cookie(old_token) })))
      assert.equal(401, (post_json("/api/v1/auth/login",
        { email = "link@example.com", password = PASSWORD })))
    end))

    it("rejects a state that does not match", async(function()
      local before_exchanges = github_seen.exchanges
      local before = counts()
      local state, state_cookie = start()
      local cases = {
        { state .. "x", state_cookie },
        { state, "__justavps_oauth_state=other" },
        { state, "" },
      }
      for i, case in ipairs(cases) do
        local status, body = callback("new", case[1], case[2])
        assert.equal(400, status, "case " .. i)
        assert.equal("invalid_oauth_state", body.error.code, "case " .. i)
      end
      assert.equal(before_exchanges, github_seen.exchanges)
      assert.same(before, counts())
    end))

    it("rejects an account without a verified email", async(function()
      local before = counts()
      local state, state_cookie = start()
      local status, body = callback("unverified", state, state_cookie)
      assert.equal(403, status)
      assert.equal("github_email_unverified", body.error.code)
      assert.same(before, counts())
    end))

    it("rejects a code GitHub does not accept", async(function()
      local before = counts()
      local state, state_cookie = start()
      local status, body = callback("expired", state, state_cookie)
      assert.equal(502, status)
      assert.equal("github_failed", body.error.code)
      assert.same(before, counts())
    end))
  end)
end)
