-- justavps.auth.session: session tokens, Set-Cookie values, CSRF tokens
-- and Cookie header parsing.
local core = require("justavps.core")
local session = require("justavps.auth.session")

local crypto = core.crypto


describe("session.new", function()
  it("makes a 43-character token and its hash", function()
    local s = assert(session.new())
    assert.equal(43, #s.token)
    assert.matches("^[A-Za-z0-9_-]+$", s.token)
    assert.equal(32, #crypto.base64url_decode(s.token))
    assert.equal(crypto.hex_encode(crypto.sha256(s.token)), s.hash)
    assert.equal(s.hash, session.hash(s.token))
  end)

  it("makes a different token each time", function()
    assert.not_equal(session.new().token, session.new().token)
  end)

  it("rejects text that is not a session token", function()
    for _, value in ipairs({ "", "abc", ("a"):rep(44), ("a"):rep(42) .. "=",
        false }) do
      local hash, message, code = session.hash(value)
      assert.is_nil(hash)
      assert.equal("invalid_session", code)
      assert.equal("session token is malformed", message)
    end
  end)
end)


describe("session cookies", function()
  it("builds the session cookie", function()
    assert.equal("__justavps_session=abc; Path=/; Max-Age=604800; HttpOnly; "
      .. "Secure; SameSite=Lax", session.session_cookie("abc"))
    assert.equal("__justavps_session=abc; Path=/; Max-Age=3600; HttpOnly; "
      .. "Secure; SameSite=Lax",
      session.session_cookie("abc", { max_age = 3600 }))
  end)

  it("leaves out Secure in dev", function()
    assert.equal("__justavps_session=abc; Path=/; Max-Age=604800; HttpOnly; "
      .. "SameSite=Lax", session.session_cookie("abc", { dev = true }))
  end)

  it("builds the proxy cookie", function()
    local token = "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"
    assert.equal("__justavps_proxy=" .. token .. "; Path=/; Max-Age=900; "
      .. "HttpOnly; Secure; SameSite=Lax", session.proxy_cookie(token))
    assert.equal("__justavps_proxy=" .. token .. "; Path=/; Max-Age=60; "
      .. "HttpOnly; SameSite=Lax",
      session.proxy_cookie(token, { max_age = 60, dev = true }))
  end)

  it("builds a clearing cookie", function()
    assert.equal("__justavps_session=; Path=/; Max-Age=0; HttpOnly; Secure; "
      .. "SameSite=Lax", session.clear_cookie(session.SESSION_COOKIE))
    assert.equal("__justavps_proxy=; Path=/; Max-Age=0; HttpOnly; "
      .. "SameSite=Lax",
      session.clear_cookie(session.PROXY_COOKIE, { dev = true }))
  end)

  it("builds any cookie with the same flags", function()
    assert.equal("x=1; Path=/; Max-Age=5; HttpOnly; Secure; SameSite=Lax",
      session.cookie("x", "1", { max_age = 5 }))
  end)

  it("never sets Domain", function()
    local values = {
      session.session_cookie("abc"),
      session.proxy_cookie("abc", { dev = true }),
      session.clear_cookie("x"),
      session.cookie("x", "1", { max_age = 1, domain = "example.com" }),
    }
    for _, value in ipairs(values) do
      assert.is_nil(value:lower():find("domain", 1, true), value)
    end
  end)

  it("raises on values a cookie cannot hold", function()
    for _, value in ipairs({ "a b", "a;b", "a,b", 'a"b', "a\\b", "a\nb",
        "é", "a\127" }) do
      assert.has_error(function()
        session.session_cookie(value)
      end, "session.session_cookie: token must be a non-empty cookie value")
    end
    assert.has_error(function()
      session.session_cookie("")
    end)
    assert.has_error(function()
      session.cookie("a=b", "1", { max_age = 1 })
    end, "session.cookie: cookie name must be an HTTP token")
    assert.has_error(function()
      session.cookie("a", "1", { max_age = -1 })
    end, "session.cookie: opts.max_age must be a whole number of seconds >= 0")
    assert.has_error(function()
      session.cookie("a", "1")
    end)
  end)
end)


describe("session CSRF tokens", function()
  local secret = "csrf-secret-of-this-session"

  it("derives the token by HMAC-SHA256", function()
    -- python3: base64url without padding of
    -- hmac.new(b"csrf-secret-of-this-session", b"session-id-1",
    --          "sha256").digest()
    assert.equal("3OJTYhm24lfeP_kqg3qGbtZWvUnkZ4MEd3yTzLwo-6s",
      session.csrf_token(secret, "session-id-1"))
  end)

  it("verifies the token of the session", function()
    local token = session.csrf_token(secret, "session-id-1")
    assert.is_true(session.verify_csrf(secret, "session-id-1", token))
  end)

  it("rejects other tokens", function()
    local token = session.csrf_token(secret, "session-id-1")
    assert.is_false(session.verify_csrf(secret, "session-id-2", token))
    assert.is_false(session.verify_csrf("another secret", "session-id-1",
      token))
    assert.is_false(session.verify_csrf(secret, "session-id-1",
      token:sub(1, -2)))
    assert.is_false(session.verify_csrf(secret, "session-id-1", ""))
    assert.is_false(session.verify_csrf(secret, "session-id-1", nil))
    assert.is_false(session.verify_csrf(secret, "session-id-1", 42))
  end)

  it("makes a new secret per session", function()
    local a, b = session.csrf_secret(), session.csrf_secret()
    assert.equal(43, #a)
    assert.not_equal(a, b)
  end)

  it("raises without a secret or session id", function()
    assert.has_error(function()
      session.csrf_token("", "id")
    end, "session.csrf_token: secret must be a non-empty string")
    assert.has_error(function()
      session.verify_csrf(secret, nil, "x")
    end, "session.verify_csrf: session_id must be a non-empty string")
  end)
end)


describe("session.parse_cookies", function()
  it("parses several cookies", function()
    local cookies, counts = session.parse_cookies("a=1; b=2;c=3")
    assert.same({ a = "1", b = "2", c = "3" }, cookies)
    assert.same({ a = 1, b = 1, c = 1 }, counts)
  end)

  it("trims whitespace and removes quotes", function()
    local cookies = session.parse_cookies(' a = 1 ;\tb="two" ; c="" ; d=" ')
    assert.same({ a = "1", b = "two", c = "", d = '"' }, cookies)
  end)

  it("keeps the first of duplicate names", function()
    local cookies, counts = session.parse_cookies("a=1; b=2; a=3; a=4")
    assert.equal("1", cookies.a)
    assert.equal(3, counts.a)
  end)

  it("keeps = inside values", function()
    local cookies = session.parse_cookies("a=b=c; d==")
    assert.same({ a = "b=c", d = "=" }, cookies)
  end)

  it("skips malformed pairs", function()
    local cookies = session.parse_cookies("novalue; =x; a b=1; ok=1;; ;")
    assert.same({ ok = "1" }, cookies)
  end)

  it("reads several header lines", function()
    local cookies, counts = session.parse_cookies({ "a=1; b=2", "a=9; c=3" })
    assert.same({ a = "1", b = "2", c = "3" }, cookies)
    assert.equal(2, counts.a)
  end)

  it("returns empty maps for no header", function()
    local cookies, counts = session.parse_cookies(nil)
    assert.same({}, cookies)
    assert.same({}, counts)
    assert.same({}, (session.parse_cookies("")))
  end)

  it("raises on a header of another type", function()
    assert.has_error(function()
      session.parse_cookies(42)
    end, "session.parse_cookies: header must be a string, a list of strings "
      .. "or nil, got number")
  end)
end)


describe("session.get_cookie", function()
  it("returns one cookie", function()
    assert.equal("tok", session.get_cookie("x=1; __justavps_session=tok",
      session.SESSION_COOKIE))
  end)

  it("reports a missing or empty cookie", function()
    for _, header in ipairs({ "x=1", "__justavps_session=", "" }) do
      local value, message, code = session.get_cookie(header,
        session.SESSION_COOKIE)
      assert.is_nil(value)
      assert.equal("missing_cookie", code)
      assert.equal("cookie __justavps_session is missing", message)
    end
  end)

  it("rejects a duplicated credential cookie", function()
    local value, message, code = session.get_cookie(
      "__justavps_session=tossed; __justavps_session=mine",
      session.SESSION_COOKIE)
    assert.is_nil(value)
    assert.equal("duplicate_cookie", code)
    assert.equal("cookie __justavps_session appears 2 times", message)
  end)
end)
