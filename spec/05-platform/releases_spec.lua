-- Daemon releases against a real platform process and a fresh database:
-- publish and list, the operator and scope checks, input validation, and
-- the update offer of heartbeats signed here from the wire contract.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")

local async = helpers.async
local crypto = core.crypto

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

local PASSWORD = "correct horse battery"
local TOKEN = "machine-token-0123456789abcdef0123456789"
local SHA = ("ab"):rep(32)


local spec_pg = require("support.pg")
local pg_settings = spec_pg.settings


-- Signs a machine call from the wire contract: v1= + hex
-- HMAC-SHA256(token, "JUSTAVPS-MACHINE-V1\nMETHOD\ntarget\nts\nnonce\n"
-- .. hex(sha256(body))).
local function sign(token, method, target, body)
  local ts = os.time()
  local nonce = crypto.random_token(24)
  local s = table.concat({ "JUSTAVPS-MACHINE-V1", method, target,
    tostring(ts), nonce, crypto.hex_encode(crypto.sha256(body)) }, "\n")
  return {
    ["X-JustAVPS-Machine-Timestamp"] = tostring(ts),
    ["X-JustAVPS-Machine-Nonce"] = nonce,
    ["X-JustAVPS-Machine-Signature"] = "v1="
      .. crypto.hex_encode(crypto.hmac_sha256(token, s)),
    ["Content-Type"] = "application/json",
  }
end


describe("platform releases", function()
  local settings = pg_settings()
  local dbname, p, port
  local operator, stranger
  local operator_key, operator_read_key, stranger_key

  local function connect(name)
    return assert(core.pg.connect({ host = settings.PGHOST,
      port = settings.PGPORT, user = settings.PGUSER,
      dbname = name or settings.PGDATABASE }, { timeout = 30 }))
  end

  local function sql(query, params)
    local c = connect(dbname)
    local rows = assert(c:query(query, params))
    c:close()
    return rows
  end

  local function request(method, path, headers, body)
    local res = assert(core.http.request{ method = method, host = "127.0.0.1",
      port = port, path = path, headers = headers, body = body, timeout = 20 })
    local text = res:read_body()
    res:close()
    local decoded = text ~= "" and json.decode(text) or nil
    return res.status, decoded or text
  end

  local function signup(email)
    local status, body, _ = request("POST", "/api/v1/auth/signup",
      { ["Content-Type"] = "application/json" },
      json.encode({ email = email, password = PASSWORD }))
    assert.equal(201, status)
    return body
  end

  local function login(email)
    local res = assert(core.http.request{ method = "POST", host = "127.0.0.1",
      port = port, path = "/api/v1/auth/login",
      headers = { ["Content-Type"] = "application/json" },
      body = json.encode({ email = email, password = PASSWORD }), timeout = 20 })
    local headers = res:headers()
    local body = json.decode(res:read_body())
    res:close()
    local token = headers["set-cookie"]:match("^__justavps_session=([^;]+)")
    return { cookie = "__justavps_session=" .. token, csrf = body.csrf_token }
  end

  local function create_key(email, scopes)
    local s = login(email)
    local status, body = request("POST", "/api/v1/api-keys",
      { Cookie = s.cookie, ["X-CSRF-Token"] = s.csrf,
        ["Content-Type"] = "application/json" },
      json.encode({ name = "releases", scopes = scopes }))
    assert.equal(201, status, json.encode(body))
    return body.key
  end

  local function as_key(key)
    return { Authorization = "Bearer " .. key,
      ["Content-Type"] = "application/json" }
  end

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
      dbname = string.format("justavps_spec_%d_%06d", os.time(),
        math.random(0, 999999))
      local c = connect()
      assert(c:query('CREATE DATABASE "' .. dbname .. '"'))
      c:close()

      local env = helpers.child_env({ PGHOST = settings.PGHOST,
        PGPORT = settings.PGPORT, PGUSER = settings.PGUSER,
        PGDATABASE = dbname })
      local m = assert(core.proc.spawn{ file = BIN, args = { "migrate" },
        env = env, stdout = "null", stderr = "null" })
      assert.equal(0, m:wait(60))

      local acct = sql("INSERT INTO accounts (name) VALUES ($1) RETURNING id",
        { "fleet" })[1].id
      for _, slug in ipairs({ "rel-1", "rel-2" }) do
        sql("INSERT INTO machines (slug, account_id, name, provider, region, "
          .. "server_type, stage, token) VALUES ($1, $2, $3, 'local', 'local', "
          .. "'local', 'services_ready', $4)", { slug, acct, slug, TOKEN })
      end

      env.JUSTAVPS_PLATFORM_LISTEN_PORT = "0"
      env.JUSTAVPS_PLATFORM_RELEASES_OPERATORS = "Ops@Example.com"
      p = assert(core.proc.spawn{ file = BIN,
        args = { "platform", "--access-log=false" }, env = env,
        stdout = "null", stderr = "pipe" })
      local ready = core.waiter()
      core.spawn(function()
        while true do
          local line = p.stderr:readuntil("\n", 1024 * 1024)
          if not line then
            break
          end
          local n = line:match("msg=listening .*port=(%d+)")
          if n and not port then
            port = tonumber(n)
            ready:wake()
          end
        end
      end)
      if not port then
        ready:wait(20)
      end
      assert(port, "platform did not start")

      operator = signup("ops@example.com")
      stranger = signup("stranger@example.com")
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
        p:kill("SIGTERM")
        p:wait(10)
      end
      local c = connect()
      c:query('DROP DATABASE IF EXISTS "' .. dbname .. '" WITH (FORCE)')
      c:close()
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
