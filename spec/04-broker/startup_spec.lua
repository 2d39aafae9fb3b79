-- The broker's start and defaults: TLS with a development CA, the default
-- target policy (loopback denied), what a rejection logs, and configs it
-- refuses without ever printing the secret.
local core = require("justavps.core")
local helpers = require("support.helpers")
local json = require("justavps.json")
local bp = require("04-broker.broker_process")

local async = helpers.async


describe("broker over TLS", function()
  local broker, app, dir, client_tls

  setup(function()
    helpers.run(function()
      dir = bp.temp_dir()
      local tls = core.tls
      assert(tls.generate({ cert_out = dir .. "/ca.pem",
        key_out = dir .. "/ca.key", ca = true, cn = "spec CA" }))
      assert(tls.generate({ cert_out = dir .. "/broker.pem",
        key_out = dir .. "/broker.key", names = { "broker.test" },
        issuer_cert = dir .. "/ca.pem", issuer_key = dir .. "/ca.key" }))
      client_tls = assert(tls.client_context({ ca = dir .. "/ca.pem" }))

      app = bp.backend()
      broker = bp.start({
        broker_id = bp.BROKER_ID,
        secret = bp.SECRET,
        listen = { host = "127.0.0.1", port = 0 },
        tls = { cert = dir .. "/broker.pem", key = dir .. "/broker.key" },
        target = { allow_networks = { "127.0.0.1/32" } },
      })
      assert(broker.port, "broker did not start; log:\n"
        .. table.concat(broker.lines, "\n"))
    end)
  end)

  teardown(function()
    helpers.run(function()
      assert.equal(0, bp.stop(broker))
      app:close()
      os.execute("rm -rf " .. dir)
    end)
  end)

  it("proxies a signed request", async(function()
    local res, _, seen = bp.send(broker.port, bp.fields(app:port()),
      { tls = client_tls, server_name = "broker.test" })
    assert.equal(200, res.status)
    assert.equal("198.51.100.7", seen.headers["x-real-ip"])
    assert.is_nil(seen.headers["x-justavps-nonce"])
  end))

  it("does not answer plain HTTP", async(function()
    local res = core.http.request{ host = "127.0.0.1", port = broker.port,
      path = "/", timeout = 5 }
    if res then
      res:close()
    end
    assert.is_nil(res)
  end))

  it("does not warn about plain HTTP", function()
    assert.equal("", bp.log_matching(broker, "insecure_plain_http"))
  end)
end)


describe("broker default policy", function()
  local broker, app

  setup(function()
    helpers.run(function()
      app = bp.backend()
      broker = bp.start({
        broker_id = bp.BROKER_ID,
        secret = bp.SECRET,
        insecure_plain_http = true,
        listen = { host = "127.0.0.1", port = 0 },
      })
      assert(broker.port, "broker did not start; log:\n"
        .. table.concat(broker.lines, "\n"))
    end)
  end)

  teardown(function()
    helpers.run(function()
      assert.equal(0, bp.stop(broker))
      app:close()
    end)
  end)

  for _, ip in ipairs({ "127.0.0.1", "::1", "169.254.169.254" }) do
    it("denies " .. ip, async(function()
      local f = bp.fields(app:port(), { ip = ip })
      local res, _, body = bp.send(broker.port, f)
      assert.equal(403, res.status)
      assert.equal("target_denied", body.error.code)
    end))
  end

  it("logs a rejection without the signature", async(function()
    local s = bp.signed(bp.fields(app:port(), { slug = "spec-logged",
      client = "198.51.100.9" }))
    s.slug = "spec-tampered"
    local res = bp.send(broker.port, s)
    assert.equal(401, res.status)
    core.sleep(0.2)

    local line = bp.log_matching(broker, "slug=spec-tampered")
    assert.truthy(line:find("code=bad_signature", 1, true), line)
    assert.truthy(line:find("client_ip=198.51.100.9", 1, true), line)
    assert.truthy(line:find("level=warn", 1, true), line)
    local text = table.concat(broker.lines, "\n")
    assert.is_nil(text:find(s.sig:sub(4), 1, true))
    assert.is_nil(text:find(bp.SECRET, 1, true))
  end))

  it("logs the reason a target was denied", async(function()
    local f = bp.fields(app:port(), { ip = "10.1.2.3", slug = "spec-denied" })
    local res = bp.send(broker.port, f)
    assert.equal(403, res.status)
    core.sleep(0.2)
    local line = bp.log_matching(broker, "slug=spec-denied")
    assert.truthy(line:find("10.0.0.0/8", 1, true), line)
  end))
end)


describe("broker config", function()
  -- Runs the broker with conf until it exits; returns the status and
  -- its log.
  local function run_broker(conf)
    local dir = bp.temp_dir()
    local path = dir .. "/broker.json"
    local f = assert(io.open(path, "w"))
    f:write(type(conf) == "string" and conf or assert(json.encode(conf)))
    f:close()
    local p = assert(core.proc.spawn{ file = bp.BIN,
      args = { "broker", "--config", path },
      env = { PATH = os.getenv("PATH") },
      stdin = "null", stdout = "null", stderr = "pipe" })
    local lines = {}
    while true do
      local line = p.stderr:readuntil("\n")
      if not line then
        break
      end
      lines[#lines + 1] = line
    end
    local status = p:wait(10)
    os.execute("rm -rf " .. dir)
    return status, table.concat(lines, "\n")
  end

  it("rejects a short secret without printing it", async(function()
    local status, log = run_broker({ broker_id = "b1",
      secret = "short-secret-value", insecure_plain_http = true })
    assert.equal(1, status)
    assert.truthy(log:find("secret", 1, true))
    assert.is_nil(log:find("short-secret-value", 1, true))
  end))

  it("rejects a secret of the wrong type", async(function()
    local status, log = run_broker(
      '{"broker_id":"b1","secret":987654321,"insecure_plain_http":true}')
    assert.equal(1, status)
    assert.truthy(log:find("secret", 1, true))
    assert.is_nil(log:find("987654321", 1, true))
  end))

  it("requires TLS unless plain HTTP is asked for", async(function()
    local status, log = run_broker({ broker_id = "b1", secret = bp.SECRET })
    assert.equal(1, status)
    assert.truthy(log:find("tls.cert", 1, true))
  end))

  it("rejects a nonce TTL shorter than the skew window", async(function()
    local status, log = run_broker({ broker_id = "b1", secret = bp.SECRET,
      insecure_plain_http = true, clock_skew = 60, nonce = { ttl = 100 } })
    assert.equal(1, status)
    assert.truthy(log:find("nonce.ttl", 1, true))
  end))

  it("rejects an invalid network", async(function()
    local status, log = run_broker({ broker_id = "b1", secret = bp.SECRET,
      insecure_plain_http = true,
      target = { allow_networks = { "127.0.0.0/33" } } })
    assert.equal(1, status)
    assert.truthy(log:find("allow_networks", 1, true))
  end))

  it("requires a broker id", async(function()
    local status, log = run_broker({ secret = bp.SECRET,
      insecure_plain_http = true })
    assert.equal(1, status)
    assert.truthy(log:find("broker_id", 1, true))
  end))
end)
