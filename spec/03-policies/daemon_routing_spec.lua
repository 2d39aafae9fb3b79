-- The daemon's routing policy as a pure function: every decision form,
-- each traversal spelling, the settings an operator may change, and rules.
local routing = require("policies.daemon_routing")
local config = require("justavps.config")

local schema = config.schema({ fields = routing.schema })


-- Returns validated settings with defaults, plus overrides.
local function settings(overrides)
  local conf = assert(config.validate(schema, overrides or {}))
  return conf
end


describe("daemon routing policy", function()
  local defaults = settings()

  local cases = {
    { "/_port/3000/a/b", "proxy", 3000, "/a/b", "/_port/3000" },
    { "/_port/3000/a/", "proxy", 3000, "/a/", "/_port/3000" },
    { "/_port/3000", "proxy", 3000, "/", "/_port/3000" },
    { "/3000/x", "proxy", 3000, "/x", "/3000" },
    { "//_port//3000//x", "proxy", 3000, "/x", "/_port/3000" },
    { "/", "proxy", 3456, "/", nil },
    { "/index.html", "proxy", 3456, "/index.html", nil },
    { "/_pty", "pty" },
    { "/_toolbox/files/a", "toolbox", nil, "/files/a" },
  }

  for _, case in ipairs(cases) do
    it("routes " .. case[1], function()
      local d = routing.decide(case[1], defaults)
      assert.equal(case[2], d.action)
      assert.equal(case[3], d.port)
      assert.equal(case[4], d.path)
      assert.equal(case[5], d.prefix)
    end)
  end

  local rejected = {
    { "/_port/99999/x", 400, "invalid_port" },
    { "/_port/0/x", 400, "invalid_port" },
    { "/_port/abc", 400, "invalid_port" },
    { "/_port/3000/../3001", 400, "bad_path" },
    { "/_port/3000/./x", 400, "bad_path" },
    { "/_port/3000/%2e%2e/x", 400, "bad_path" },
    { "/_port/3000/%2E./x", 400, "bad_path" },
    { "/_port/3000/.%2e/x", 400, "bad_path" },
    { "/_port/3000/a%2fb", 400, "bad_path" },
    { "/_port/3000/a%2Fb", 400, "bad_path" },
    { "/_port/3000/a%5cb", 400, "bad_path" },
    { "/_port/3000/a\\b", 400, "bad_path" },
    { "/_port/3000/a%00b", 400, "bad_path" },
    { "/_pty/../_port/1", 400, "bad_path" },
    { "/_pty/x", 404, "not_found" },
    { "relative", 400, "bad_path" },
  }

  for _, case in ipairs(rejected) do
    it("rejects " .. case[1], function()
      local d = routing.decide(case[1], defaults)
      assert.equal("reject", d.action)
      assert.equal(case[2], d.status)
      assert.equal(case[3], d.code)
    end)
  end

  it("turns the numeric shortcut off", function()
    local d = routing.decide("/3000/x",
      settings({ numeric_shortcut = false }))
    assert.equal(3456, d.port)
    assert.equal("/3000/x", d.path)
  end)

  it("changes the default port", function()
    local d = routing.decide("/x", settings({ default_port = 8080 }))
    assert.equal(8080, d.port)
  end)

  it("denies a listed port in every form", function()
    local conf = settings({ denied_ports = { 22, 3456 } })
    for _, path in ipairs({ "/_port/22/", "/22/x", "/anything" }) do
      local d = routing.decide(path, conf)
      assert.equal("reject", d.action, path)
      assert.equal(403, d.status, path)
      assert.equal("port_denied", d.code, path)
    end
  end)

  it("applies operator rules first", function()
    local conf = settings({ rules = {
      { prefix = "/api", port = 8000 },
      { prefix = "/static/v1", port = 8001, strip = false },
    } })
    local d = routing.decide("/api/users/", conf)
    assert.equal(8000, d.port)
    assert.equal("/users/", d.path)
    assert.equal("/api", d.prefix)

    d = routing.decide("/static/v1/a.css", conf)
    assert.equal(8001, d.port)
    assert.equal("/static/v1/a.css", d.path)
    assert.is_nil(d.prefix)

    -- Prefixes match whole segments only.
    d = routing.decide("/apix", conf)
    assert.equal(3456, d.port)
  end)

  it("keeps rules subject to denied ports", function()
    local conf = settings({ denied_ports = { 22 },
      rules = { { prefix = "/ssh", port = 22 } } })
    local d = routing.decide("/ssh/x", conf)
    assert.equal("port_denied", d.code)
  end)

  it("rejects a rule prefix with an escape", function()
    local conf, err = config.validate(schema,
      { rules = { { prefix = "/a%2fb", port = 1 } } })
    assert.is_nil(conf)
    assert.truthy(tostring(err):find("rules", 1, true))
  end)
end)
