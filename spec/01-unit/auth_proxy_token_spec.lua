-- justavps.auth.proxy_token: owner and share tokens, and the path rule
-- that keeps both away from /_pty and /_toolbox.
local jwt = require("justavps.auth.jwt")
local proxy_token = require("justavps.auth.proxy_token")

local SECRET = ("p"):rep(32)
local NOW = 1700000000
local SLUG = "pale-fox"


local function owner(opts)
  opts = opts or {}
  opts.user_id = opts.user_id or 42
  opts.slug = opts.slug or SLUG
  opts.now = opts.now or NOW
  return assert(proxy_token.issue_owner(opts, SECRET))
end


local function share(opts)
  opts = opts or {}
  opts.slug = opts.slug or SLUG
  opts.port = opts.port or 3000
  opts.now = opts.now or NOW
  return assert(proxy_token.issue_share(opts, SECRET))
end


local function verify(token, opts)
  opts = opts or {}
  opts.slug = opts.slug or SLUG
  opts.now = opts.now or NOW
  return proxy_token.verify(token, SECRET, opts)
end


describe("proxy_token owner tokens", function()
  it("carries sub, slug, scope and a 15-minute exp", function()
    local token, claims = owner()
    assert.same({ aud = "justavps:proxy", sub = "42", slug = SLUG,
      scope = "machine", iat = NOW, exp = NOW + 900 }, claims)
    assert.same(claims, verify(token))
  end)

  it("expires", function()
    local token = owner()
    local result, _, code = verify(token, { now = NOW + 900 })
    assert.is_nil(result)
    assert.equal("token_expired", code)
  end)

  it("is bound to its machine", function()
    local token = owner()
    local result, message, code = verify(token, { slug = "other-box" })
    assert.is_nil(result)
    assert.equal("wrong_slug", code)
    assert.equal("token was issued for another machine", message)
  end)

  it("rejects another secret", function()
    local token = owner()
    local _, _, code = proxy_token.verify(token, ("q"):rep(32),
      { slug = SLUG, now = NOW })
    assert.equal("bad_signature", code)
  end)

  it("caps the ttl", function()
    local _, claims = owner({ ttl = 60 })
    assert.equal(NOW + 60, claims.exp)
    assert.has_error(function()
      owner({ ttl = 86401 })
    end, "proxy_token.issue_owner: ttl must be a number above 0 and at "
      .. "most 86400")
  end)
end)


describe("proxy_token share tokens", function()
  it("carries jti, slug, port and a 1-hour exp", function()
    local token, claims = share()
    assert.equal(22, #claims.jti)
    assert.matches("^[A-Za-z0-9_-]+$", claims.jti)
    assert.equal(3000, claims.port)
    assert.equal("port", claims.scope)
    assert.equal(NOW + 3600, claims.exp)
    assert.same(claims, verify(token))
  end)

  it("keeps a given id", function()
    local _, claims = share({ id = "link-1" })
    assert.equal("link-1", claims.jti)
  end)

  it("asks the revocation hook", function()
    local token, claims = share()
    local asked
    local result = verify(token, { is_revoked = function(jti)
      asked = jti
      return false
    end })
    assert.is_table(result)
    assert.equal(claims.jti, asked)

    local _, message, code = verify(token, { is_revoked = function()
      return true
    end })
    assert.equal("token_revoked", code)
    assert.equal("share link was revoked", message)
  end)

  it("fails closed when the revocation lookup fails", function()
    local token = share()
    local result, message, code = verify(token, { is_revoked = function()
      return nil, "database unavailable"
    end })
    assert.is_nil(result)
    assert.equal("revocation_check_failed", code)
    assert.equal("revocation check failed: database unavailable", message)
  end)

  it("does not ask the hook for owner tokens", function()
    local token = owner()
    assert.is_table(verify(token, { is_revoked = function()
      error("hook called for an owner token")
    end }))
  end)

  it("restricts the kind on request", function()
    local _, _, code = verify(share(), { scope = "machine" })
    assert.equal("wrong_scope", code)
    _, _, code = verify(owner(), { scope = "port" })
    assert.equal("wrong_scope", code)
    assert.is_table(verify(share(), { scope = "port" }))
  end)

  it("raises on a bad port", function()
    for _, port in ipairs({ 0, 65536, 80.5, "80" }) do
      assert.has_error(function()
        share({ port = port })
      end, "proxy_token.issue_share: port must be an integer from 1 to "
        .. "65535")
    end
  end)
end)


describe("proxy_token.verify", function()
  it("rejects a JWT without the proxy audience", function()
    local token = assert(jwt.encode({ exp = NOW + 60, slug = SLUG,
      scope = "machine", sub = "42" }, SECRET))
    local _, _, code = verify(token)
    assert.equal("wrong_audience", code)
  end)

  it("rejects an unknown scope", function()
    local token = assert(jwt.encode({ aud = "justavps:proxy",
      exp = NOW + 60, slug = SLUG, scope = "admin", sub = "42" }, SECRET))
    local _, _, code = verify(token)
    assert.equal("wrong_scope", code)
  end)

  it("rejects a share token without a valid port or jti", function()
    local base = { aud = "justavps:proxy", exp = NOW + 60, slug = SLUG,
      scope = "port", jti = "abc", port = 3000 }
    for field, value in pairs({ port = "3000", jti = "" }) do
      local claims = {}
      for k, v in pairs(base) do
        claims[k] = v
      end
      claims[field] = value
      local _, _, code = verify(assert(jwt.encode(claims, SECRET)))
      assert.equal("invalid_claim", code, field)
    end
  end)

  it("requires slug and scope", function()
    local token = assert(jwt.encode({ aud = "justavps:proxy",
      exp = NOW + 60, sub = "42" }, SECRET))
    local _, _, code = verify(token)
    assert.equal("missing_claim", code)
  end)
end)


describe("proxy_token.allows", function()
  local owner_claims = select(2, owner())
  local share_claims = select(2, share({ port = 3000 }))

  it("opens every app path with the owner cookie", function()
    for _, path in ipairs({ "/", "/index.html", "/_port/3000/",
        "/_port/8080/api?q=1", "/3000/", "/_ports", "/x/_pty" }) do
      assert.is_true(proxy_token.allows(owner_claims, path), path)
    end
  end)

  it("never opens /_pty or /_toolbox", function()
    local paths = { "/_pty", "/_pty/", "/_pty?cols=80", "//_pty",
      "/_toolbox", "/_toolbox/files/etc/passwd", "/_PTY", "/_Toolbox/x",
      "/%5Fpty", "/%5ftoolbox/files", "/_pt%79" }
    for _, path in ipairs(paths) do
      for _, claims in ipairs({ owner_claims, share_claims }) do
        local ok, code = proxy_token.allows(claims, path)
        assert.is_false(ok, claims.scope .. " " .. path)
        assert.equal("reserved_path", code, claims.scope .. " " .. path)
      end
    end
  end)

  it("opens only its own port with a share token", function()
    local cases = {
      { "/_port/3000", true },
      { "/_port/3000/", true },
      { "/_port/3000/app/page?x=1", true },
      { "//_port//3000//app", true },
      { "/_port/03000/", true },
      { "/_port/3001/", false, "wrong_port" },
      { "/_port/80/", false, "wrong_port" },
      { "/3000/", false, "outside_port" },
      { "/", false, "outside_port" },
      { "/index.html", false, "outside_port" },
      { "/_port/", false, "outside_port" },
      { "/_port/abc/", false, "outside_port" },
      { "/%5Fport/3000/", false, "outside_port" },
      { "/_PORT/3000/", false, "outside_port" },
    }
    for _, case in ipairs(cases) do
      local ok, code = proxy_token.allows(share_claims, case[1])
      assert.equal(case[2], ok, case[1])
      assert.equal(case[3], code, case[1])
    end
  end)

  it("rejects paths that could climb out of a port", function()
    local paths = { "/_port/3000/../../_pty", "/_port/3000/%2e%2e/_pty",
      "/_port/3000/a%2Fb", "/_port/3000/a%5cb", "/_port/3000/a\\b",
      "/_port/3000/%00", "/./_pty", "*", "http://host/_port/3000/", "" }
    for _, path in ipairs(paths) do
      for _, claims in ipairs({ owner_claims, share_claims }) do
        local ok, code = proxy_token.allows(claims, path)
        assert.is_false(ok, path)
        assert.equal("bad_path", code, path)
      end
    end
  end)

  it("checks the port of a PORT-slug host", function()
    assert.is_true(proxy_token.allows(share_claims, "/", 3000))
    assert.is_true(proxy_token.allows(share_claims, "/app/x?y=1", 3000))
    local ok, code = proxy_token.allows(share_claims, "/", 3001)
    assert.is_false(ok)
    assert.equal("wrong_port", code)
    assert.is_true(proxy_token.allows(owner_claims, "/", 8080))
  end)

  it("passes app paths through on a PORT-slug host", function()
    -- The edge rewrites the host form to /_port/PORT/path, so /_pty here
    -- is a path of the app, not the daemon's terminal.
    assert.is_true(proxy_token.allows(share_claims, "/_pty", 3000))
  end)

  it("denies claims of neither kind", function()
    local ok, code = proxy_token.allows({ scope = "admin" }, "/")
    assert.is_false(ok)
    assert.equal("wrong_scope", code)
    ok, code = proxy_token.allows({}, "/")
    assert.is_false(ok)
    assert.equal("wrong_scope", code)
  end)
end)
