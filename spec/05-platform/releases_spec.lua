-- Daemon releases against a real platform process and a fresh database:
-- publish and list, the operator and scope checks, input validation, and
-- the update offer of heartbeats signed here from the wire contract.
local json = require("justavps.json")
local helpers = require("support.helpers")

local async = helpers.async

local platform = require("support.platform")

local TOKEN = "machine-token-0123456789abcdef0123456789"
local SHA = ("ab"):rep(32)


local sign = platform.sign_machine


describe("platform releases", function()
  local db, p
  local operator, stranger
  local operator_key, operator_read_key, stranger_key

  local function sql(query, params)
    return db:sql(query, params)
  end

  local function request(method, path, headers, body)
    local status, decoded = p:request(method, path, headers, body)
    return status, decoded
  end

  local function create_key(email, scopes)
    return p:create_key(p:login(email), "releases", scopes).key
  end

  local as_key = platform.as_key

  local function publish(key, release)
    return request("POST", "/api/v1/releases", as_key(key), json.encode(release))
  end

  local function heartbeat(slug, version)
    local path = "/api/v1/machines/" .. slug .. "/heartbeat"
    local body = json.encode({ version = version })
    return request("POST", path, sign(TOKEN, "POST", path, body), body)
  end

  setup(function()
    helpers.run(function()
      db = platform.database()
      local acct = sql("INSERT INTO accounts (name) VALUES ($1) RETURNING id",
        { "fleet" })[1].id
      for _, slug in ipairs({ "rel-1", "rel-2" }) do
        sql("INSERT INTO machines (slug, account_id, name, provider, region, "
          .. "server_type, stage, token) VALUES ($1, $2, $3, 'local', 'local', "
          .. "'local', 'services_ready', $4)", { slug, acct, slug, TOKEN })
      end

      p = platform.start(db, { env = {
        JUSTAVPS_PLATFORM_RELEASES_OPERATORS = "Ops@Example.com" } })
      operator = p:signup("ops@example.com").body
      stranger = p:signup("stranger@example.com").body
      operator_key = create_key("ops@example.com", { "read", "write" })
      operator_read_key = create_key("ops@example.com", { "read" })
      stranger_key = create_key("stranger@example.com", { "read", "write" })
      assert.is_table(operator.account)
      assert.is_table(stranger.account)
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      if p then
        p:stop()
      end
      if db then
        db:drop()
      end
    end, 60)
  end)

  it("publishes and lists releases", async(function()
    local status, body = publish(operator_key, { version = "1.0.0",
      url = "https://downloads.example.com/justavps-1.0.0",
      sha256 = SHA:upper(), rollout = { slugs = { "nobody-1" } } })
    assert.equal(201, status, json.encode(body))
    assert.equal("1.0.0", body.version)
    assert.equal(SHA, body.sha256)
    assert.same({ slugs = { "nobody-1" } }, body.rollout)

    local row = sql("SELECT sha256, created_by IS NOT NULL AS has_creator "
      .. "FROM releases WHERE version = '1.0.0'")[1]
    assert.equal(SHA, row.sha256)
    assert.is_true(row.has_creator)

    local lstatus, list = request("GET", "/api/v1/releases", as_key(stranger_key))
    assert.equal(200, lstatus)
    assert.equal(1, #list.releases)
    assert.equal("1.0.0", list.releases[1].version)
  end))

  it("rejects a non-operator with 403", async(function()
    local status, body = publish(stranger_key, { version = "1.0.1",
      url = "https://downloads.example.com/x", sha256 = SHA,
      rollout = { all = true } })
    assert.equal(403, status)
    assert.equal("forbidden", body.error.code)
    assert.equal(0, #sql("SELECT 1 FROM releases WHERE version = '1.0.1'"))
  end))

  it("rejects a key without write scope", async(function()
    local status, body = publish(operator_read_key, { version = "1.0.1",
      url = "https://downloads.example.com/x", sha256 = SHA,
      rollout = { all = true } })
    assert.equal(403, status)
    assert.equal("insufficient_scope", body.error.code)
  end))

  local invalid = {
    { "bad sha256", { sha256 = "abc" }, "sha256" },
    { "uppercase non-hex sha256", { sha256 = ("zz"):rep(32) }, "sha256" },
    { "bad version", { version = "v1" }, "version" },
    { "bad url", { url = "ftp://x/y" }, "url" },
    { "two rollout forms", { rollout = { all = true, percent = 3 } }, "rollout" },
    { "percent above 100", { rollout = { percent = 101 } }, "percent" },
    { "unknown rollout key", { rollout = { everyone = true } }, "everyone" },
    { "missing sha256", { sha256 = json.null }, "sha256" },
  }
  for _, case in ipairs(invalid) do
    it("rejects " .. case[1] .. " with 400", async(function()
      local release = { version = "1.0.2",
        url = "https://downloads.example.com/x", sha256 = SHA,
        rollout = { all = true } }
      for k, v in pairs(case[2]) do
        release[k] = v ~= json.null and v or nil
      end
      local status, body = publish(operator_key, release)
      assert.equal(400, status, json.encode(body))
      assert.equal("invalid_request", body.error.code)
      assert.truthy(body.error.message:find(case[3], 1, true), body.error.message)
      assert.equal(0, #sql("SELECT 1 FROM releases WHERE version = '1.0.2'"))
    end))
  end

  it("rejects a taken version with 409", async(function()
    local status, body = publish(operator_key, { version = "1.0.0",
      url = "https://downloads.example.com/x", sha256 = SHA,
      rollout = { all = true } })
    assert.equal(409, status)
    assert.equal("conflict", body.error.code)
  end))

  it("offers nothing outside a 0% rollout", async(function()
    local status = publish(operator_key, { version = "1.5.0",
      url = "https://downloads.example.com/justavps-1.5.0", sha256 = SHA,
      rollout = { percent = 0 } })
    assert.equal(201, status)
    local hstatus, reply = heartbeat("rel-1", "1.0.0")
    assert.equal(200, hstatus)
    assert.is_nil(reply and reply.update)
  end))

  it("offers a release to another version", async(function()
    local status = publish(operator_key, { version = "2.0.0",
      url = "http://10.0.0.1/justavps-2.0.0", sha256 = SHA,
      rollout = { all = true } })
    assert.equal(201, status)
    local hstatus, reply = heartbeat("rel-1", "1.0.0")
    assert.equal(200, hstatus)
    assert.same({ version = "2.0.0", url = "http://10.0.0.1/justavps-2.0.0",
      sha256 = SHA }, reply.update)
  end))

  it("offers nothing to the same version", async(function()
    local status, reply = heartbeat("rel-2", "2.0.0")
    assert.equal(200, status)
    assert.is_nil(reply and reply.update)
  end))

  it("offers a slugs rollout to its machines only", async(function()
    local status = publish(operator_key, { version = "2.1.0",
      url = "https://downloads.example.com/justavps-2.1.0", sha256 = SHA,
      rollout = { slugs = { "rel-2" } } })
    assert.equal(201, status)
    local _, reply2 = heartbeat("rel-2", "2.0.0")
    assert.equal("2.1.0", reply2.update.version)
    local _, reply1 = heartbeat("rel-1", "1.0.0")
    assert.equal("2.0.0", reply1.update.version)
  end))
end)
