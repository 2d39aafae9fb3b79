-- GET /api/v1/regions and /server-types of a real platform process whose
-- catalog provider is the Hetzner driver, pointed at tools/fake_hetzner.lua
-- on loopback. The lists match the API's, a second call within cache_ttl
-- does not reach the provider, and a failing provider gives 502
-- provider_unavailable.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")
local platform = require("support.platform")
local fake_hetzner = require("tools.fake_hetzner")

local async = helpers.async

local TOKEN = "catalog-spec-token"


local function request(port, method, path, headers, body)
  local res = assert(core.http.request({ method = method,
    host = "127.0.0.1", port = port, path = path, headers = headers,
    body = body, timeout = 20 }))
  local text = res:read_body()
  res:close()
  return res.status, json.decode(text), res
end


-- Returns how many requests the fake saw for "METHOD path".
local function count(fake, line)
  local n = 0
  for _, seen in ipairs(fake.requests) do
    if seen == line then
      n = n + 1
    end
  end
  return n
end


describe("platform catalog", function()
  local db, fake
  local processes = {}

  -- Starts a platform with the catalog settings in extra; returns its port.
  local function start_platform(extra)
    local env = { JUSTAVPS_PLATFORM_PROVISION_ENABLED = "false" }
    for k, v in pairs(extra) do
      env[k] = v
    end
    local p = platform.start(db, { env = env })
    processes[#processes + 1] = p
    return p.port
  end

  -- Signs a new user up on port; returns the session Cookie header.
  local function session(port)
    local email = "catalog-" .. math.random(1, 1e9) .. "@example.test"
    local status, _, res = request(port, "POST", "/api/v1/auth/signup",
      { ["Content-Type"] = "application/json" },
      json.encode({ email = email, password = platform.PASSWORD }))
    assert.equal(201, status)
    return { Cookie = res:header("Set-Cookie"):match("^([^;]+)") }
  end

  setup(function()
    helpers.run(function()
      db = platform.database()
      fake = assert(fake_hetzner.start({ token = TOKEN }))
    end, 60)
  end)

  teardown(function()
    helpers.run(function()
      for _, p in ipairs(processes) do
        p:stop()
      end
      if fake then
        fake:close()
      end
      if db then
        db:drop()
      end
    end, 30)
  end)

  local function hetzner_env(token, ttl)
    return {
      JUSTAVPS_PLATFORM_CATALOG_PROVIDER = "hetzner",
      JUSTAVPS_PLATFORM_CATALOG_PROVIDER_CONFIG = json.encode({
        base_url = fake:url(), token = token, max_attempts = "1",
        timeout = "5" }),
      JUSTAVPS_PLATFORM_CATALOG_CACHE_TTL = tostring(ttl),
    }
  end

  it("lists the provider's regions and types", async(function()
    local port = start_platform(hetzner_env(TOKEN, 300))
    local headers = session(port)

    -- The fake's own reply, read directly with the token.
    local _, locations = request(fake:port(), "GET", "/v1/locations",
      { Authorization = "Bearer " .. TOKEN })
    local expected = {}
    for _, l in ipairs(locations.locations) do
      expected[#expected + 1] = l.name
    end
    assert.is_true(#expected > 0)

    local status, body = request(port, "GET", "/api/v1/regions", headers)
    assert.equal(200, status, json.encode(body))
    local ids = {}
    for _, r in ipairs(body.regions) do
      ids[#ids + 1] = r.id
    end
    assert.same(expected, ids)

    local types_status, types = request(port, "GET", "/api/v1/server-types",
      headers)
    assert.equal(200, types_status)
    assert.is_true(#types.server_types > 0)
    assert.equal("string", type(types.server_types[1].id))
  end, 60))

  it("reuses a list within cache_ttl", async(function()
    local port = start_platform(hetzner_env(TOKEN, 300))
    local headers = session(port)
    local before = count(fake, "GET /v1/locations")
    assert.equal(200, (request(port, "GET", "/api/v1/regions", headers)))
    local after_first = count(fake, "GET /v1/locations")
    assert.is_true(after_first > before)
    assert.equal(200, (request(port, "GET", "/api/v1/regions", headers)))
    assert.equal(after_first, count(fake, "GET /v1/locations"))
  end, 60))

  it("answers 502 when the provider fails", async(function()
    local port = start_platform(hetzner_env("wrong-token", 0))
    local headers = session(port)
    local status, body = request(port, "GET", "/api/v1/regions", headers)
    assert.equal(502, status)
    assert.equal("provider_unavailable", body.error.code)
    -- The reply names neither the token nor the provider's raw error.
    local text = json.encode(body)
    assert.falsy(text:find("wrong-token", 1, true))
  end, 60))

  it("requires a signed-in user", async(function()
    local port = start_platform(hetzner_env(TOKEN, 300))
    local status, body = request(port, "GET", "/api/v1/regions")
    assert.equal(401, status)
    assert.equal("table", type(body.error))
  end, 60))
end)
