-- The edge access policy on its own: path classes and scopes, each
-- credential, the Origin check and when a ticket is spent.
local policy = require("policies.edge_access")

local OWNER = { scope = "machine", sub = "u1", slug = "pale-fox" }
local SHARE = { scope = "port", port = 3000, jti = "j", slug = "pale-fox" }

local function input(overrides)
  local t = { target = "/", method = "GET", host_kind = "machine",
    host = "pale-fox.example.test", scheme = "https" }
  for k, v in pairs(overrides) do
    t[k] = v
  end
  return t
end

describe("edge access policy", function()
  describe("classify", function()
    local cases = {
      { "/_pty", "GET", "machine", "terminal", "exec" },
      { "/_PTY?session=1", "GET", "machine", "terminal", "exec" },
      { "/%5Fpty", "GET", "machine", "terminal", "exec" },
      { "/_toolbox/exec", "POST", "machine", "toolbox", "exec" },
      { "/_toolbox/processes/1", "DELETE", "machine", "toolbox", "exec" },
      { "/_toolbox/files/a", "GET", "machine", "toolbox", "read" },
      { "/_toolbox/files/a", "PUT", "machine", "toolbox", "write" },
      { "/_toolbox/files/a", "DELETE", "machine", "toolbox", "delete" },
      { "/_toolbox/list/", "GET", "machine", "toolbox", "read" },
      { "/_toolbox/search?name=x", "GET", "machine", "toolbox", "read" },
      { "/_toolbox/mkdir/a", "POST", "machine", "toolbox", "write" },
      { "/_toolbox/move", "POST", "machine", "toolbox", "write" },
      { "/_toolbox/unknown", "GET", "machine", "toolbox", "exec" },
      { "/_toolbox", "GET", "machine", "toolbox", "exec" },
      { "/", "GET", "machine", "app", "proxy" },
      { "/_port/3000/_pty", "GET", "machine", "app", "proxy" },
      { "/_port/3000/_pty", "GET", "port", "app", "proxy" },
    }
    for _, c in ipairs(cases) do
      it(c[2] .. " " .. c[1] .. " on a " .. c[3] .. " host", function()
        local class = policy.classify(c[1], c[2], c[3])
        assert.equal(c[4], class.kind)
        assert.equal(c[5], class.scope)
      end)
    end

    for _, target in ipairs({ "/a/../b", "/a%2fb", "*", "/a/%2e%2e/b" }) do
      it("marks " .. target .. " bad", function()
        assert.equal("bad", policy.classify(target, "GET", "machine").kind)
      end)
    end
  end)

  describe("decide", function()
    it("allows an owner cookie on app paths", function()
      local d = policy.decide(input({ cookie = OWNER }))
      assert.is_true(d.allow)
      assert.equal("cookie", d.via)
    end)

    it("denies an owner cookie on /_pty", function()
      local d = policy.decide(input({ target = "/_pty", cookie = OWNER }))
      assert.is_false(d.allow)
      assert.equal(403, d.status)
      assert.equal("ticket_required", d.code)
    end)

    it("allows a share token on its port only", function()
      local ok = policy.decide(input({ target = "/_port/3000/x",
        share = SHARE }))
      assert.is_true(ok.allow)
      local other = policy.decide(input({ target = "/_port/3001/x",
        share = SHARE }))
      assert.equal("wrong_port", other.code)
      local host = policy.decide(input({ host_kind = "port", port = 3001,
        target = "/_port/3001/", share = SHARE }))
      assert.equal("wrong_port", host.code)
      local root = policy.decide(input({ share = SHARE }))
      assert.equal("outside_port", root.code)
    end)

    it("never opens /_toolbox with a share token", function()
      local d = policy.decide(input({ target = "/_toolbox/list/",
        share = SHARE }))
      assert.equal(403, d.status)
      assert.equal("ticket_required", d.code)
    end)

    it("checks API key scopes", function()
      local key = { scopes = { "read" } }
      assert.is_true(policy.decide(input({ target = "/_toolbox/list/",
        api_key = key })).allow)
      local d = policy.decide(input({ target = "/_toolbox/exec",
        method = "POST", api_key = key }))
      assert.equal("insufficient_scope", d.code)
      assert.equal("insufficient_scope", policy.decide(input({ api_key = key })).code)
      assert.is_true(policy.decide(input({
        api_key = { scopes = { "proxy" } } })).allow)
    end)

    it("rejects an invalid API key even with a cookie", function()
      local d = policy.decide(input({ cookie = OWNER,
        api_key_error = "invalid_api_key" }))
      assert.equal(401, d.status)
      assert.is_false(d.login)
    end)

    it("allows a ticket on /_pty", function()
      local d = policy.decide(input({ target = "/_pty", ticket = true }))
      assert.is_true(d.allow)
      assert.equal("ticket", d.via)
    end)

    it("marks a request without credentials for login", function()
      local d = policy.decide(input({}))
      assert.equal(401, d.status)
      assert.equal("unauthorized", d.code)
      assert.is_true(d.login)
    end)

    it("rejects a WebSocket from a foreign origin", function()
      local d = policy.decide(input({ is_websocket = true, cookie = OWNER,
        origin = "https://evil.example.org" }))
      assert.equal(403, d.status)
      assert.equal("forbidden_origin", d.code)
    end)

    it("accepts a WebSocket from its own origin", function()
      local d = policy.decide(input({ is_websocket = true, cookie = OWNER,
        origin = "https://pale-fox.example.test:443" }))
      assert.is_true(d.allow)
    end)
  end)

  describe("same_origin", function()
    local cases = {
      { "https://pale-fox.example.test", "pale-fox.example.test", true },
      { "https://PALE-FOX.example.test", "pale-fox.example.test:443", true },
      { "http://pale-fox.example.test", "pale-fox.example.test", false },
      { "https://pale-fox.example.test:8443", "pale-fox.example.test", false },
      { "https://3000-pale-fox.example.test", "pale-fox.example.test", false },
      { "null", "pale-fox.example.test", false },
      { "https://pale-fox.example.test/x", "pale-fox.example.test", false },
    }
    for _, c in ipairs(cases) do
      it(c[1] .. " for " .. c[2], function()
        assert.equal(c[3], policy.same_origin(c[1], c[2], "https"))
      end)
    end
  end)

  describe("needs_ticket", function()
    it("is true for /_pty without a key", function()
      assert.is_true(policy.needs_ticket(input({ target = "/_pty" })))
    end)

    it("is false for app paths", function()
      assert.is_false(policy.needs_ticket(input({})))
    end)

    it("is false when a key suffices", function()
      assert.is_false(policy.needs_ticket(input({ target = "/_pty",
        api_key = { scopes = { "exec" } } })))
    end)

    it("is false for a foreign origin", function()
      assert.is_false(policy.needs_ticket(input({ target = "/_pty",
        is_websocket = true, origin = "https://evil.example.org" })))
    end)
  end)
end)
