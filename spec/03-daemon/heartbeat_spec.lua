-- The heartbeat loop against a fake platform (core.http.listen) that
-- verifies each call with machine_sig, records the bodies and can fail or
-- offer an update.
local core = require("justavps.core")
local helpers = require("support.helpers")
local json = require("justavps.json")
local machine_sig = require("justavps.machine_sig")
local heartbeat = require("justavps.daemon.heartbeat")
local updater = require("justavps.daemon.updater")

local async = helpers.async

local TOKEN = "heartbeat-spec-token-0123456789"


local function temp_dir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir) == 0)
  return dir
end


-- Starts the fake platform. respond(n, body) returns status and reply
-- text for the n-th accepted heartbeat. Returns the server and the record
-- { bodies, rejected }.
local function fake_platform(respond)
  local record = { bodies = {}, rejected = {}, targets = {} }
  local cache = core.nonce.new({ ttl = 120 })
  local server = assert(core.http.listen({
    host = "127.0.0.1", port = 0, access_log = false,
    handler = function(req)
      local parts = {}
      while true do
        local chunk = req:read()
        if not chunk then
          break
        end
        parts[#parts + 1] = chunk
      end
      local body = table.concat(parts)
      local ok, err, code = machine_sig.verify(TOKEN, req, body, cache)
      if not ok then
        record.rejected[#record.rejected + 1] = code .. ": " .. err
        return 401, {}, "{}"
      end
      record.targets[#record.targets + 1] = req.method .. " " .. req.target
      record.bodies[#record.bodies + 1] = json.decode(body)
      local status, reply = respond(#record.bodies, body)
      return status, { ["Content-Type"] = "application/json" }, reply
    end,
  }))
  return server, record
end


local function conf_for(server, dir)
  return {
    slug = "hb-machine", token = TOKEN,
    platform_url = "http://127.0.0.1:" .. server:port(),
    heartbeat_interval = 1, state_dir = dir,
  }
end


local function wait_until(fn, seconds)
  local deadline = core.now() + seconds
  while not fn() and core.now() < deadline do
    core.sleep(0.05)
  end
  return fn()
end


local STUB = {
  metrics = function() return { load = { load1 = 0.5 } } end,
  ports = function() return json.array({ { port = 3456, address = "127.0.0.1",
    family = "ipv4" } }) end,
}


describe("heartbeat", function()
  before_each(function()
    updater.reset()
  end)

  after_each(function()
    heartbeat.stop()
  end)

  it("sends a signed heartbeat", async(function()
    local dir = temp_dir()
    local server, record = fake_platform(function() return 200, "{}" end)
    local reply = assert(heartbeat.send(conf_for(server, dir), STUB))
    server:close()
    assert.same({}, reply)
    assert.equal(0, #record.rejected)
    assert.equal("POST /api/v1/machines/hb-machine/heartbeat", record.targets[1])
    local body = record.bodies[1]
    assert.equal(core.version, body.version)
    assert.is_string(body.stage)
    assert.equal(0.5, body.metrics.load.load1)
    assert.equal(3456, body.ports[1].port)
    assert.same({}, body.events)
    os.execute("rm -rf " .. dir)
  end, 20))

  it("keeps a path prefix of platform_url", async(function()
    local dir = temp_dir()
    local server, record = fake_platform(function() return 204, "" end)
    local conf = conf_for(server, dir)
    conf.platform_url = conf.platform_url .. "/base/"
    assert(heartbeat.send(conf, STUB))
    server:close()
    assert.equal("POST /base/api/v1/machines/hb-machine/heartbeat", record.targets[1])
    os.execute("rm -rf " .. dir)
  end, 20))

  it("sends real metrics and ports", async(function()
    local dir = temp_dir()
    local server, record = fake_platform(function() return 200, "{}" end)
    local server_port = server:port()
    assert(heartbeat.send(conf_for(server, dir)))
    server:close()
    local body = record.bodies[1]
    assert.is_true(body.metrics.memory.total > 0)
    local found = false
    for _, e in ipairs(body.ports) do
      found = found or e.port == server_port
    end
    assert.is_true(found, "the fake platform's port is not in the heartbeat")
    os.execute("rm -rf " .. dir)
  end, 20))

  it("reports and acknowledges update events", async(function()
    local dir = temp_dir()
    updater.record_event(dir, { type = "failed", version = "9.9.9",
      previous = core.version, reason = "spec" })
    local server, record = fake_platform(function(n)
      return n == 1 and 500 or 200, "{}"
    end)
    local conf = conf_for(server, dir)
    local ok, _, code = heartbeat.send(conf, STUB)
    assert.is_nil(ok)
    assert.equal("http_status", code)
    assert.equal(1, #updater.pending_events(dir))
    assert(heartbeat.send(conf, STUB))
    assert.equal(0, #updater.pending_events(dir))
    server:close()
    assert.equal("failed", record.bodies[1].events[1].type)
    assert.equal("9.9.9", record.bodies[2].events[1].version)
    os.execute("rm -rf " .. dir)
  end, 20))

  it("backs off on failures", function()
    local delays = {}
    for failures = 1, 12 do
      delays[failures] = heartbeat.backoff_delay(failures, 30, 300, 0.999)
    end
    for i = 2, #delays do
      assert.is_true(delays[i] >= delays[i - 1])
    end
    assert.is_true(delays[12] <= 300)
    assert.is_true(delays[12] > 290)
    assert.equal(30, heartbeat.backoff_delay(1, 30, 300, 0))
    assert.equal(150, heartbeat.backoff_delay(10, 30, 300, 0))
  end)

  it("retries with growing delays after 500s", async(function()
    local dir = temp_dir()
    local server, record = fake_platform(function(n)
      if n <= 3 then
        return 500, '{"error":{"code":"internal","message":"spec"}}'
      end
      return 200, "{}"
    end)
    local results = {}
    local stub = { metrics = STUB.metrics, ports = STUB.ports,
      interval = 0.05, max_backoff = 0.4,
      on_result = function(ok, info)
        results[#results + 1] = { ok = ok, failures = info.failures,
          delay = info.delay }
      end }
    heartbeat.start(conf_for(server, dir), stub)
    assert.is_true(wait_until(function() return #results >= 5 end, 20))
    heartbeat.stop()
    server:close()

    assert.is_false(results[1].ok)
    assert.equal(1, results[1].failures)
    assert.equal(3, results[3].failures)
    assert.is_true(results[3].delay <= 0.4)
    assert.is_true(results[3].delay >= 0.2)
    assert.is_true(results[4].ok)
    assert.equal(0.05, results[4].delay)
    assert.is_true(#record.bodies >= 5)
    os.execute("rm -rf " .. dir)
  end, 30))

  it("hands an update offer to the updater", async(function()
    local dir = temp_dir()
    local offer = { version = core.version, url = "http://127.0.0.1:9/x",
      sha256 = ("0"):rep(64) }
    local server = fake_platform(function()
      return 200, json.encode({ update = offer })
    end)
    heartbeat.start(conf_for(server, dir), { metrics = STUB.metrics,
      ports = STUB.ports, interval = 0.05 })
    -- The same version is skipped and recorded once.
    local events
    assert.is_true(wait_until(function()
      events = updater.pending_events(dir)
      return #events > 0
    end, 20))
    heartbeat.stop()
    server:close()
    assert.equal("skipped", events[1].type)
    assert.equal(core.version, events[1].version)
    os.execute("rm -rf " .. dir)
  end, 30))

  it("rejects an invalid platform_url", async(function()
    local ok, _, code = heartbeat.send({ slug = "x-1", token = TOKEN,
      platform_url = "ftp://127.0.0.1/", state_dir = "/nonexistent" }, STUB)
    assert.is_nil(ok)
    assert.equal("invalid_url", code)
  end, 20))
end)


describe("heartbeat cloud-init stage", function()

  local function tree(files)
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/cloud") == 0)
    for path, content in pairs(files) do
      local full = dir .. "/" .. path
      assert(os.execute("mkdir -p " .. full:match("^(.*)/")) == 0)
      local f = assert(io.open(full, "w"))
      f:write(content)
      f:close()
    end
    return dir
  end

  it("reports absent cloud-init as ready", function()
    local dir = tree({})
    local stage, report = heartbeat.stage({ cloud_dir = dir .. "/cloud" })
    assert.equal("services_ready", stage)
    assert.equal("absent", report.status)
    os.execute("rm -rf " .. dir)
  end)

  it("reports a running cloud-init", function()
    local dir = tree({ ["cloud/instance/user-data.txt"] = "x" })
    local stage, report = heartbeat.stage({ cloud_dir = dir .. "/cloud" })
    assert.equal("cloud_init_running", stage)
    assert.equal("running", report.status)
    os.execute("rm -rf " .. dir)
  end)

  it("reports a finished cloud-init", function()
    local dir = tree({
      ["cloud/instance/boot-finished"] = "1",
      ["cloud/data/result.json"] = '{"v1":{"datasource":"x","errors":[]}}',
    })
    local stage, report = heartbeat.stage({ cloud_dir = dir .. "/cloud" })
    assert.equal("services_ready", stage)
    assert.equal("done", report.status)
    os.execute("rm -rf " .. dir)
  end)

  it("reports a failed cloud-init with its log", function()
    local log_lines = {}
    for i = 1, 50 do
      log_lines[#log_lines + 1] = "line " .. i
    end
    local dir = tree({
      ["cloud/instance/boot-finished"] = "1",
      ["cloud/data/result.json"] =
        '{"v1":{"errors":["runcmd failed: exit 1"]}}',
      ["cloud-init-output.log"] = table.concat(log_lines, "\n") .. "\n",
    })
    local stage, report = heartbeat.stage({ cloud_dir = dir .. "/cloud",
      cloud_log = dir .. "/cloud-init-output.log" })
    assert.equal("failed", stage)
    assert.equal("error", report.status)
    assert.same({ "runcmd failed: exit 1" }, report.errors)
    assert.equal(30, #report.log_tail)
    assert.equal("line 50", report.log_tail[30])
    os.execute("rm -rf " .. dir)
  end)
end)
