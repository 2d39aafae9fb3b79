-- The platform API process against a fresh database: the OpenAPI document,
-- unknown routes and methods, and machine-signed heartbeats signed here
-- independently from the wire contract.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")

local async = helpers.async

local platform = require("support.platform")

local TOKEN = "machine-token-0123456789abcdef0123456789"

-- Signs a machine call by hand from the wire contract.
local sign = platform.sign_machine


describe("platform API", function()
  local database, p

  setup(function()
    helpers.run(function()
      database = platform.database()
      local acct = database:sql("INSERT INTO accounts (name) VALUES ($1) "
        .. "RETURNING id", { "spec" })
      database:sql("INSERT INTO machines (slug, account_id, name, "
        .. "provider, region, server_type, stage, token) VALUES ($1, $2, "
        .. "$3, $4, $5, $6, $7, $8)", { "hb-1", acct[1].id, "hb",
        "local", "local", "local", "server_created", TOKEN })
      p = platform.start(database)
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      if p then
        p:stop()
      end
      if database then
        database:drop()
      end
    end, 60)
  end)

  local function request(method, path, headers, body)
    local status, text = p:raw(method, path, headers, body)
    return status, text ~= "" and json.decode(text) or nil
  end

  local function heartbeat(slug, body_table, headers_fn)
    local path = "/api/v1/machines/" .. slug .. "/heartbeat"
    local body = json.encode(body_table)
    local headers = headers_fn and headers_fn(path, body)
      or sign(TOKEN, "POST", path, body)
    return request("POST", path, headers, body)
  end

  it("serves its OpenAPI document", async(function()
    local status, doc = request("GET", "/api/v1/openapi.json")
    assert.equal(200, status)
    assert.equal("3.1.0", doc.openapi)
    assert.is_table(doc.paths["/api/v1/machines/{slug}/heartbeat"].post)
    assert.is_table(doc.paths["/api/v1/health"].get)
  end))

  it("reports health with the database", async(function()
    local status, body = request("GET", "/api/v1/health")
    assert.equal(200, status)
    assert.equal("ok", body.status)
  end))

  it("answers unknown routes with 404", async(function()
    local status, body = request("GET", "/api/v1/nope")
    assert.equal(404, status)
    assert.equal("not_found", body.error.code)
  end))

  it("answers a wrong method with 405", async(function()
    local status, body = request("DELETE", "/api/v1/health")
    assert.equal(405, status)
    assert.equal("method_not_allowed", body.error.code)
  end))

  it("records a signed heartbeat", async(function()
    local status = heartbeat("hb-1", { version = "9.9.9",
      stage = "services_ready",
      ports = { { port = 3000, address = "0.0.0.0" } },
      metrics = { cpu = { usage_percent = 12.5 }, memory = { total = 1000,
        available = 400 } } })
    assert.equal(200, status)

    local db = database:connect()
    local m = assert(db:query("SELECT stage::text AS stage, version, "
      .. "ports::text AS ports, last_seen_at IS NOT NULL AS seen "
      .. "FROM machines WHERE slug = $1", { "hb-1" }))[1]
    assert.equal("services_ready", m.stage)
    assert.equal("9.9.9", m.version)
    assert.truthy(m.ports:find("3000", 1, true))
    assert.is_true(m.seen)
    local ev = assert(db:query("SELECT e.stage::text AS stage FROM "
      .. "machine_events e JOIN machines m ON m.id = e.machine_id "
      .. "WHERE m.slug = $1 ORDER BY e.id", { "hb-1" }))
    assert.equal(2, #ev)
    assert.equal("cloud_init_done", ev[1].stage)
    assert.equal("services_ready", ev[2].stage)
    local metrics = assert(db:query("SELECT cpu_percent, mem_used_bytes "
      .. "FROM machine_metrics"))
    assert.equal(1, #metrics)
    assert.equal(12.5, metrics[1].cpu_percent)
    assert.equal(600, metrics[1].mem_used_bytes)
    db:close()
  end))

  it("rejects a replayed heartbeat", async(function()
    local path = "/api/v1/machines/hb-1/heartbeat"
    local body = json.encode({ version = "9.9.9" })
    local headers = sign(TOKEN, "POST", path, body)
    assert.equal(200, (request("POST", path, headers, body)))
    local status, reply = request("POST", path, headers, body)
    assert.equal(401, status)
    assert.equal("replayed_nonce", reply.error.code)
  end))

  local rejected = {
    { "a wrong token", function(path, body)
      return sign("another-token-0123456789abcdef0123", "POST", path, body)
    end, "bad_signature" },
    { "a stale timestamp", function(path, body)
      return sign(TOKEN, "POST", path, body, os.time() - 120)
    end, "stale_timestamp" },
    { "a tampered body", function(path, body)
      return sign(TOKEN, "POST", path, body .. " ")
    end, "bad_signature" },
    { "another target", function(_, body)
      return sign(TOKEN, "POST", "/api/v1/machines/other/heartbeat", body)
    end, "bad_signature" },
    { "no signature", function()
      return { ["Content-Type"] = "application/json" }
    end, "missing_signature" },
  }

  for _, case in ipairs(rejected) do
    it("rejects " .. case[1], async(function()
      local status, body = heartbeat("hb-1", { version = "1" }, case[2])
      assert.equal(401, status)
      assert.equal(case[3], body.error.code)
    end))
  end

  it("records a cloud-init failure with its log", async(function()
    local db = database:connect()
    local acct = assert(db:query("SELECT id FROM accounts LIMIT 1"))[1]
    assert(db:query("INSERT INTO machines (slug, account_id, name, "
      .. "provider, region, server_type, stage, token) VALUES ($1, $2, "
      .. "$3, $4, $5, $6, $7, $8)", { "hb-2", acct.id, "hb", "local",
      "local", "local", "cloud_init_running", TOKEN }))
    local status = heartbeat("hb-2", { version = "1", stage = "failed",
      cloud_init = { status = "error", errors = { "runcmd failed" },
        log_tail = { "E: package not found" } } })
    assert.equal(200, status)
    local rows = assert(db:query("SELECT m.stage::text AS stage, "
      .. "e.detail::text AS detail FROM machines m JOIN machine_events e "
      .. "ON e.machine_id = m.id WHERE m.slug = $1", { "hb-2" }))
    assert.equal(1, #rows)
    assert.equal("failed", rows[1].stage)
    local detail = json.decode(rows[1].detail)
    assert.same({ "runcmd failed" }, detail.errors)
    assert.same({ "E: package not found" }, detail.log_tail)
    db:close()
  end))

  it("records update outcomes as events", async(function()
    local status = heartbeat("hb-1", { version = "9.9.10", events = {
      { type = "applied", version = "9.9.10" },
      { type = "not-an-outcome" },
    } })
    assert.equal(200, status)
    local db = database:connect()
    local rows = assert(db:query("SELECT e.detail::text AS detail FROM "
      .. "machine_events e JOIN machines m ON m.id = e.machine_id "
      .. "WHERE m.slug = $1 AND e.detail->>'kind' = 'update'", { "hb-1" }))
    assert.equal(1, #rows)
    local detail = json.decode(rows[1].detail)
    assert.equal("applied", detail.outcome)
    assert.equal("9.9.10", detail.version)
    db:close()
  end))

  it("stores NULL for metrics outside their columns' range",
    async(function()
      local db = database:connect()
      local before = tonumber(assert(db:query(
        "SELECT count(*) AS n FROM machine_metrics"))[1].n)
      local status = heartbeat("hb-1", { version = "9.9.10",
        metrics = { cpu = { usage_percent = 1e308 },
          load = { ["1"] = -1, ["5"] = 0.5, ["15"] = 0.25 },
          memory = { total = 2000, available = 3000 },
          disk = { used_bytes = -5, total_bytes = 1e30 } } })
      assert.equal(200, status)
      local rows = assert(db:query("SELECT cpu_percent, load_1, load_5, "
        .. "load_15, mem_used_bytes, mem_total_bytes, disk_used_bytes, "
        .. "disk_total_bytes FROM machine_metrics ORDER BY id DESC LIMIT 1"))
      local count = tonumber(assert(db:query(
        "SELECT count(*) AS n FROM machine_metrics"))[1].n)
      db:close()
      assert.equal(before + 1, count)
      -- core.pg returns SQL NULL as pg.null.
      local row = rows[1]
      local null = core.pg.null
      assert.equal(null, row.cpu_percent)
      assert.equal(null, row.load_1)
      assert.equal(0.5, row.load_5)
      assert.equal(0.25, row.load_15)
      assert.equal(null, row.mem_used_bytes)
      assert.equal(2000, tonumber(row.mem_total_bytes))
      assert.equal(null, row.disk_used_bytes)
      assert.equal(null, row.disk_total_bytes)
    end))

  it("replaces bytes PostgreSQL refuses in reported text", async(function()
    local status = heartbeat("hb-1", { version = "9.9.10",
      ports = { { port = 4000, address = "0.0.0.0",
        process = "bad\0name\255" } } })
    assert.equal(200, status)
    local db = database:connect()
    local ports = assert(db:query("SELECT ports::text AS ports FROM "
      .. "machines WHERE slug = $1", { "hb-1" }))[1].ports
    db:close()
    local decoded = json.decode(ports)
    assert.equal(4000, decoded[1].port)
    assert.equal("bad?name?", decoded[1].process)
  end))

  it("records a cloud-init log that is not UTF-8", async(function()
    local db = database:connect()
    local acct = assert(db:query("SELECT id FROM accounts LIMIT 1"))[1]
    assert(db:query("INSERT INTO machines (slug, account_id, name, "
      .. "provider, region, server_type, stage, token) VALUES ($1, $2, "
      .. "$3, $4, $5, $6, $7, $8)", { "hb-3", acct.id, "hb", "local",
      "local", "local", "cloud_init_running", TOKEN }))
    local status = heartbeat("hb-3", { version = "1", stage = "failed",
      cloud_init = { status = "error", errors = { "bad \255 byte" },
        log_tail = { "nul \0 here" } } })
    assert.equal(200, status)
    local rows = assert(db:query("SELECT e.detail::text AS detail FROM "
      .. "machine_events e JOIN machines m ON m.id = e.machine_id "
      .. "WHERE m.slug = $1", { "hb-3" }))
    db:close()
    assert.equal(1, #rows)
    local detail = json.decode(rows[1].detail)
    assert.same({ "bad ? byte" }, detail.errors)
    assert.same({ "nul ? here" }, detail.log_tail)
  end))

  it("rejects a body or ports that are not the right shape", async(function()
    local path = "/api/v1/machines/hb-1/heartbeat"
    for _, body in ipairs({ "[]", '[{"version":"1"}]',
        '{"ports":{"a":1}}', '{"ports":"22"}' }) do
      local status, reply = request("POST", path, sign(TOKEN, "POST", path,
        body), body)
      assert.equal(400, status, body)
      assert.truthy(reply.error.code == "invalid_json"
        or reply.error.code == "invalid_request", body)
    end
    -- No ports, empty ports and null ports are all a machine without any.
    for _, body in ipairs({ "{}", '{"ports":[]}', '{"ports":{}}',
        '{"ports":null}' }) do
      assert.equal(200, (request("POST", path, sign(TOKEN, "POST", path,
        body), body)), body)
    end
  end))

  for _, case in ipairs({
    { "a version longer than 64 bytes", ("9"):rep(65) },
    { "a version that is not UTF-8", "1.0\255" },
    { "a version with a NUL byte", "1.0\0" },
  }) do
    it("rejects " .. case[1] .. " with 400", async(function()
      local db = database:connect()
      local before = assert(db:query("SELECT version, (SELECT count(*) "
        .. "FROM machine_metrics) AS metrics FROM machines WHERE slug = $1",
        { "hb-1" }))[1]
      local status, body = heartbeat("hb-1", { version = case[2] })
      local after = assert(db:query("SELECT version, (SELECT count(*) "
        .. "FROM machine_metrics) AS metrics FROM machines WHERE slug = $1",
        { "hb-1" }))[1]
      db:close()
      assert.equal(400, status)
      assert.equal("invalid_request", body.error.code)
      assert.truthy(body.error.message:find("version", 1, true))
      assert.same(before, after)
    end))
  end

  it("rejects an unknown machine", async(function()
    local status, body = heartbeat("no-such-machine", { version = "1" })
    assert.equal(401, status)
    assert.equal("unknown_machine", body.error.code)
  end))
end)
