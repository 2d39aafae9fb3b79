local router = require("justavps.router")

local function handler() end

local function build(routes)
  local r = router.new()
  for _, spec in ipairs(routes) do
    spec.handler = spec.handler or handler
    r:add(spec)
  end
  return r
end


describe("router", function()
  local r

  before_each(function()
    r = build({
      { method = "GET", path = "/api/v1/machines", name = "list" },
      { method = "POST", path = "/api/v1/machines", name = "create" },
      { method = "GET", path = "/api/v1/machines/{slug}", name = "show",
        auth = "key", scope = "read" },
      { method = "DELETE", path = "/api/v1/machines/{slug}", name = "delete" },
      { method = "GET", path = "/api/v1/machines/new", name = "new" },
      { method = "GET", path = "/api/v1/machines/{slug}/events",
        name = "events" },
      { method = "DELETE", path = "/api/v1/machines/{slug}/proxy-tokens/{id}",
        name = "token" },
      { method = "GET", path = "/_port/{port}/{rest*}", name = "port" },
      { method = "HEAD", path = "/head-only", name = "head" },
      { method = "GET", path = "/", name = "root" },
    })
  end)

  it("matches a static route", function()
    local route, params = r:match("GET", "/api/v1/machines")
    assert.equal("list", route.name)
    assert.same({}, params)
  end)

  it("picks the route by method", function()
    assert.equal("create", r:match("POST", "/api/v1/machines").name)
  end)

  it("binds a path parameter", function()
    local route, params = r:match("GET", "/api/v1/machines/m-42")
    assert.equal("show", route.name)
    assert.same({ slug = "m-42" }, params)
  end)

  it("binds two parameters", function()
    local route, params = r:match("DELETE",
      "/api/v1/machines/m-1/proxy-tokens/t9")
    assert.equal("token", route.name)
    assert.same({ slug = "m-1", id = "t9" }, params)
  end)

  it("prefers static over parameter", function()
    assert.equal("new", r:match("GET", "/api/v1/machines/new").name)
  end)

  it("backtracks from static to parameter", function()
    local route, params = r:match("GET", "/api/v1/machines/new/events")
    assert.equal("events", route.name)
    assert.same({ slug = "new" }, params)
  end)

  it("keeps extra route fields", function()
    local route = r:match("GET", "/api/v1/machines/x")
    assert.equal("key", route.auth)
    assert.equal("read", route.scope)
    assert.equal(handler, route.handler)
  end)

  it("matches the root path", function()
    assert.equal("root", r:match("GET", "/").name)
  end)

  it("splits off the query string", function()
    local route, params, query = r:match("GET", "/api/v1/machines/a?x=1&y")
    assert.equal("show", route.name)
    assert.same({ slug = "a" }, params)
    assert.equal("x=1&y", query)
  end)

  it("returns no query without '?'", function()
    local _, _, query = r:match("GET", "/api/v1/machines")
    assert.is_nil(query)
  end)

  it("matches the remainder with a rest parameter", function()
    local route, params = r:match("GET", "/_port/3000/static/app.js")
    assert.equal("port", route.name)
    assert.same({ port = "3000", rest = "static/app.js" }, params)
  end)

  it("matches an empty remainder", function()
    local _, params = r:match("GET", "/_port/3000")
    assert.same({ port = "3000", rest = "" }, params)
    local _, trailing = r:match("GET", "/_port/3000/")
    assert.same({ port = "3000", rest = "" }, trailing)
  end)

  it("percent-decodes parameters", function()
    local _, params = r:match("GET", "/api/v1/machines/a%20b%c3%a9")
    assert.equal("a b\195\169", params.slug)
  end)

  it("percent-decodes rest segments", function()
    local _, params = r:match("GET", "/_port/80/a%20b/c")
    assert.equal("a b/c", params.rest)
  end)

  it("matches static segments after decoding", function()
    assert.equal("list", r:match("GET", "/api/v1/%6dachines").name)
  end)

  it("lets HEAD match GET", function()
    assert.equal("show", r:match("HEAD", "/api/v1/machines/a").name)
  end)

  it("prefers an explicit HEAD route", function()
    assert.equal("head", r:match("HEAD", "/head-only").name)
  end)

  it("uppercases the method", function()
    assert.equal("list", r:match("get", "/api/v1/machines").name)
  end)

  it("returns not_found for unknown paths", function()
    local route, code = r:match("GET", "/api/v2/machines")
    assert.is_nil(route)
    assert.equal("not_found", code)
  end)

  it("returns not_found for a trailing slash", function()
    local _, code = r:match("GET", "/api/v1/machines/")
    assert.equal("not_found", code)
  end)

  it("returns not_found for a too long path", function()
    local _, code = r:match("GET", "/api/v1/machines/a/b/c")
    assert.equal("not_found", code)
  end)

  it("returns method_not_allowed with allowed methods", function()
    local route, code, allowed = r:match("PUT", "/api/v1/machines/a")
    assert.is_nil(route)
    assert.equal("method_not_allowed", code)
    assert.same({ "DELETE", "GET", "HEAD" }, allowed)
  end)

  it("lists allowed methods of all matching shapes", function()
    local _, code, allowed = r:match("POST", "/api/v1/machines/new")
    assert.equal("method_not_allowed", code)
    assert.same({ "DELETE", "GET", "HEAD" }, allowed)
  end)

  it("rejects an encoded slash in a parameter", function()
    local route, code, message = r:match("GET", "/api/v1/machines/a%2Fb")
    assert.is_nil(route)
    assert.equal("bad_request", code)
    assert.matches("encoded '/'", message)
  end)

  it("rejects a lowercase encoded slash in rest", function()
    local _, code = r:match("GET", "/_port/80/a%2fb")
    assert.equal("bad_request", code)
  end)

  it("rejects an encoded NUL in a parameter", function()
    local _, code = r:match("GET", "/api/v1/machines/a%00")
    assert.equal("bad_request", code)
  end)

  it("rejects dot segments as parameters", function()
    local _, code = r:match("GET", "/api/v1/machines/..")
    assert.equal("bad_request", code)
    local _, encoded = r:match("GET", "/api/v1/machines/%2e%2e")
    assert.equal("bad_request", encoded)
    local _, rest = r:match("GET", "/_port/80/a/../../etc")
    assert.equal("bad_request", rest)
  end)

  it("rejects malformed percent-encoding", function()
    for _, path in ipairs({ "/api/v1/machines/%zz", "/api/v1/machines/a%",
      "/api/v1/machines/a%4" }) do
      local route, code = r:match("GET", path)
      assert.is_nil(route, path)
      assert.equal("bad_request", code, path)
    end
  end)

  it("rejects a path without a leading slash", function()
    local _, code = r:match("GET", "api/v1/machines")
    assert.equal("bad_request", code)
  end)

  it("does not bind an empty segment", function()
    local _, code = r:match("GET", "/api/v1/machines//events")
    assert.equal("not_found", code)
  end)

  it("lists routes in declaration order", function()
    local names = {}
    for i, route in ipairs(r:routes()) do
      names[i] = route.name
    end
    assert.same({ "list", "create", "show", "delete", "new", "events",
      "token", "port", "head", "root" }, names)
  end)

  it("accepts a list of methods", function()
    local m = build({ { method = { "GET", "POST" }, path = "/x", name = "x" } })
    assert.equal("x", m:match("POST", "/x").name)
    assert.equal("x", m:match("GET", "/x").name)
  end)

  it("records parameter names", function()
    local route = r:match("GET", "/_port/1/a")
    assert.same({ "port", "rest", port = true, rest = true },
      route.param_names)
  end)

  describe("add", function()
    local cases = {
      { "a duplicate route", { method = "GET", path = "/api/v1/machines" },
        "duplicates" },
      { "conflicting parameter names",
        { method = "GET", path = "/api/v1/machines/{name}/x" }, "conflicts" },
      { "rest not last", { method = "GET", path = "/a/{r*}/b" },
        "last segment" },
      { "a repeated parameter", { method = "GET", path = "/b/{x}/{x}" },
        "twice" },
      { "a partial parameter", { method = "GET", path = "/c/v{x}" },
        "whole segment" },
      { "a path without slash", { method = "GET", path = "c" }, "path" },
      { "a missing handler", { method = "GET", path = "/d", handler = false },
        "handler" },
      { "a bad method", { method = "G ET", path = "/e" }, "method" },
      { "an empty method list", { method = {}, path = "/f" }, "method" },
    }

    for _, case in ipairs(cases) do
      it("raises on " .. case[1], function()
        local spec = case[2]
        if spec.handler == nil then
          spec.handler = handler
        elseif spec.handler == false then
          spec.handler = nil
        end
        local ok, err = pcall(r.add, r, spec)
        assert.is_false(ok)
        assert.matches(case[3], err)
      end)
    end
  end)

  it("matches many routes through the trie", function()
    local big = router.new()
    for i = 1, 2000 do
      big:add({ method = "GET", path = "/r" .. i .. "/{id}", handler = handler,
        n = i })
    end
    local started = os.clock()
    for i = 1, 20000 do
      local route = big:match("GET", "/r" .. (i % 2000 + 1) .. "/x")
      assert(route.n == i % 2000 + 1)
    end
    -- A linear scan would take seconds here; 20000 trie matches take
    -- milliseconds. The bound is loose so a slow CI machine passes.
    assert.is_true(os.clock() - started < 2)
  end)
end)
