-- The internal API through a real `justavps daemon` process, and the
-- metrics parsers behind it. Signatures are assembled here from the wire
-- contract rather than with machine_sig.
local core = require("justavps.core")
local helpers = require("support.helpers")
local json = require("justavps.json")
local metrics = require("justavps.daemon.metrics")

local async = helpers.async
local crypto = core.crypto

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

local TOKEN = "internal-spec-token-" .. crypto.random_token(24)


local function sh(cmd)
  assert(os.execute(cmd) == 0, "command failed: " .. cmd)
end


local function sign(method, target, body, fields)
  fields = fields or {}
  local ts = fields.timestamp or tostring(math.floor(core.time()))
  local nonce = fields.nonce or crypto.random_token(24)
  local s = table.concat({ "JUSTAVPS-MACHINE-V1", method, target, ts, nonce,
    crypto.hex_encode(crypto.sha256(body or "")) }, "\n")
  return {
    ["X-JustAVPS-Machine-Timestamp"] = ts,
    ["X-JustAVPS-Machine-Nonce"] = nonce,
    ["X-JustAVPS-Machine-Signature"] = "v1="
      .. crypto.hex_encode(crypto.hmac_sha256(fields.token or TOKEN, s)),
  }
end


-- Starts the daemon with a config in a temp dir. Returns the process, the
-- internal port, the collected stderr lines and the dir.
local function start_daemon()
  local dir = os.tmpname()
  os.remove(dir)
  sh("mkdir -p " .. dir .. "/state " .. dir .. "/home")
  local f = assert(io.open(dir .. "/config.json", "w"))
  f:write(json.encode({
    slug = "spec-machine", token = TOKEN,
    platform_url = "http://127.0.0.1:9",
    public = { host = "127.0.0.1", port = 0 },
    internal = { host = "127.0.0.1", port = 0 },
    state_dir = dir .. "/state", toolbox_root = dir .. "/home",
  }))
  f:close()

  local p = assert(core.proc.spawn({
    file = BIN, args = { "daemon", "--config", dir .. "/config.json" },
    env = { PATH = os.getenv("PATH"), HOME = dir .. "/home" },
    stdin = "null", stdout = "null", stderr = "pipe",
  }))

  local lines, port = {}, nil
  local got_port = core.waiter()
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      lines[#lines + 1] = line
      local n = line:match("msg=listening .*listener=internal .*port=(%d+)")
      if n and not port then
        port = tonumber(n)
        got_port:wake()
      end
    end
  end)
  if not port then
    got_port:wait(15)
  end
  assert(port, "daemon did not report its internal port; log:\n"
    .. table.concat(lines, "\n"))
  return p, port, lines, dir
end


local function call(port, method, target, headers, body)
  local res, err = core.http.request({ host = "127.0.0.1", port = port,
    method = method, path = target, headers = headers, body = body,
    timeout = 15 })
  assert(res, err)
  local text = assert(res:read_body())
  res:close()
  local decoded = json.decode(text)
  return res.status, decoded, text, res
end


local function get(port, target)
  return call(port, "GET", target, sign("GET", target, ""))
end


describe("internal API", function()
  local p, port, lines, dir

  setup(function()
    helpers.run(function()
      p, port, lines, dir = start_daemon()
    end, 20)
  end)

  teardown(function()
    if p then
      helpers.run(function()
        p:kill("SIGTERM")
        p:wait(15)
      end, 20)
    end
    if dir then
      os.execute("rm -rf " .. dir)
    end
  end)

  it("serves /v1/health", async(function()
    local status, body = get(port, "/v1/health")
    assert.equal(200, status)
    assert.same({ status = "ok" }, body)
  end, 20))

  it("serves /v1/version", async(function()
    local status, body = get(port, "/v1/version")
    assert.equal(200, status)
    assert.equal(core.version, body.version)
  end, 20))

  it("serves /v1/uptime", async(function()
    local status, body = get(port, "/v1/uptime")
    assert.equal(200, status)
    assert.is_number(body.system_s)
    assert.is_number(body.daemon_s)
    assert.is_true(body.daemon_s >= 0)
    assert.is_true(body.daemon_s <= body.system_s)
  end, 20))

  it("serves /v1/services", async(function()
    local status, body = get(port, "/v1/services")
    assert.equal(200, status)
    if metrics.systemd_running() then
      assert.is_true(body.available)
      assert.is_table(body.units)
    else
      assert.is_false(body.available)
      assert.is_string(body.reason)
    end
  end, 20))

  it("serves /v1/system", async(function()
    local status, body, text = get(port, "/v1/system")
    assert.equal(200, status, text)
    assert.is_number(body.cpu.usage_percent, text)
    assert.is_number(body.cpu.cores)
    assert.is_number(body.load.load1)
    assert.is_true(body.memory.total > 0)
    assert.is_true(body.memory.available > 0)
    assert.is_true(body.disk.total_bytes > 0, text)
    assert.equal("/", body.disk.path)
    assert.is_table(body.network.interfaces)
  end, 20))

  it("serves /v1/ports", async(function()
    local listener = assert(core.tcp.listen({ host = "127.0.0.1", port = 0,
      on_accept = function(sock) sock:close() end }))
    local status, body = get(port, "/v1/ports")
    local open_port = listener:port()
    listener:close()
    assert.equal(200, status)
    local found_daemon, found_spec = false, false
    for _, e in ipairs(body.ports) do
      if e.port == port then
        found_daemon = true
        assert.equal(p:pid(), e.pid)
      end
      if e.port == open_port then
        found_spec = true
      end
    end
    assert.is_true(found_daemon, "internal port not listed")
    assert.is_true(found_spec, "the spec's listener not listed")
    assert.is_number(body.updated_at)
  end, 20))

  it("answers 404 and 405", async(function()
    local status, body = get(port, "/v1/nothing")
    assert.equal(404, status)
    assert.equal("not_found", body.error.code)

    local target = "/v1/health"
    local s2, b2, _, res = call(port, "POST", target, sign("POST", target, "{}"), "{}")
    assert.equal(405, s2)
    assert.equal("method_not_allowed", b2.error.code)
    assert.truthy(res:header("allow"):find("GET", 1, true))
  end, 20))

  it("rejects a call without signature", async(function()
    local status, body = call(port, "GET", "/v1/health", {})
    assert.equal(401, status)
    assert.equal("missing_signature", body.error.code)
  end, 20))

  it("rejects a bad signature", async(function()
    local headers = sign("GET", "/v1/health", "", { token = TOKEN .. "x" })
    local status, body = call(port, "GET", "/v1/health", headers)
    assert.equal(401, status)
    assert.equal("bad_signature", body.error.code)
  end, 20))

  it("rejects a signature for another path", async(function()
    local headers = sign("GET", "/v1/version", "")
    local status, body = call(port, "GET", "/v1/health", headers)
    assert.equal(401, status)
    assert.equal("bad_signature", body.error.code)
  end, 20))

  it("rejects a stale timestamp", async(function()
    local ts = tostring(math.floor(core.time()) - 120)
    local headers = sign("GET", "/v1/health", "", { timestamp = ts })
    local status, body = call(port, "GET", "/v1/health", headers)
    assert.equal(401, status)
    assert.equal("stale_timestamp", body.error.code)
  end, 20))

  it("rejects a signature header sent twice", async(function()
    -- Each field is sent twice with the same valid value: the count, not
    -- the values, makes the call malformed.
    for _, name in ipairs({ "X-JustAVPS-Machine-Timestamp",
        "X-JustAVPS-Machine-Nonce", "X-JustAVPS-Machine-Signature" }) do
      local headers = sign("GET", "/v1/health", "")
      headers[name] = { headers[name], headers[name] }
      local status, body = call(port, "GET", "/v1/health", headers)
      assert.equal(401, status, name)
      assert.equal("missing_signature", body.error.code, name)
    end
  end, 20))

  it("rejects a replayed call", async(function()
    local headers = sign("GET", "/v1/health", "")
    assert.equal(200, (call(port, "GET", "/v1/health", headers)))
    local status, body = call(port, "GET", "/v1/health", headers)
    assert.equal(401, status)
    assert.equal("replayed_nonce", body.error.code)
  end, 20))

  it("rejects a bad nonce", async(function()
    local headers = sign("GET", "/v1/health", "", { nonce = "short" })
    local status, body = call(port, "GET", "/v1/health", headers)
    assert.equal(401, status)
    assert.equal("bad_nonce", body.error.code)
  end, 20))

  it("checks the body hash", async(function()
    local target = "/v1/health"
    local headers = sign("POST", target, "signed body")
    local status, body = call(port, "POST", target, headers, "other body")
    assert.equal(401, status)
    assert.equal("bad_signature", body.error.code)
  end, 20))

  it("logs rejected calls", async(function()
    local found = false
    local deadline = core.now() + 10
    while not found and core.now() < deadline do
      for _, line in ipairs(lines) do
        if line:find("rejected an internal API call", 1, true) then
          found = true
        end
      end
      core.sleep(0.05)
    end
    assert.is_true(found, "no rejection in the log:\n" .. table.concat(lines, "\n"))
    for _, line in ipairs(lines) do
      assert.falsy(line:find(TOKEN, 1, true), line)
    end
  end, 20))
end)


describe("metrics parsers", function()
  it("parse /proc/uptime", function()
    local up, idle = metrics.parse_uptime("4177.52 6849.32\n")
    assert.equal(4177.52, up)
    assert.equal(6849.32, idle)
    assert.is_nil(metrics.parse_uptime("garbage"))
  end)

  it("parse the start time of /proc/self/stat", function()
    local stat = "417 (a (b) c) S 1 417 417 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 "
      .. "12345 1000 200 18446744073709551615\n"
    assert.equal(12345, metrics.parse_process_start(stat))
  end)

  it("parse /proc/stat and compute usage", function()
    local a = metrics.parse_cpu("cpu  100 0 100 700 100 0 0 0 0 0\n"
      .. "cpu0 50 0 50 350 50 0 0 0 0 0\ncpu1 50 0 50 350 50 0 0 0 0 0\nintr 1\n")
    assert.same({ total = 1000, idle = 800, cores = 2 }, a)
    local b = metrics.parse_cpu("cpu  200 0 200 1300 300 0 0 0 0 0\n")
    assert.equal(20, metrics.cpu_usage(a, b))
    assert.is_nil(metrics.cpu_usage(a, a))
  end)

  it("parse /proc/loadavg", function()
    assert.same({ load1 = 1.43, load5 = 1.39, load15 = 0.86, running = 2,
      total = 159 }, metrics.parse_loadavg("1.43 1.39 0.86 2/159 6538\n"))
  end)

  it("parse /proc/meminfo", function()
    local m = metrics.parse_meminfo("MemTotal:       1000 kB\nMemFree:         200 kB\n"
      .. "MemAvailable:    600 kB\nBuffers:          10 kB\nCached:          300 kB\n"
      .. "SwapTotal:       500 kB\nSwapFree:        400 kB\n")
    assert.equal(1024000, m.total)
    assert.equal(614400, m.available)
    assert.equal(409600, m.used)
    assert.equal(409600, m.swap_free)
  end)

  it("estimate available memory on old kernels", function()
    local m = metrics.parse_meminfo("MemTotal: 1000 kB\nMemFree: 200 kB\n"
      .. "Buffers: 10 kB\nCached: 300 kB\n")
    assert.equal(510 * 1024, m.available)
  end)

  it("parse /proc/net/dev", function()
    local list = metrics.parse_net_dev(
      "Inter-|   Receive                            |  Transmit\n"
      .. " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n"
      .. "    lo: 29237 1894 0 114 0 0 0 0 29238 1895 1 2 0 0 0 0\n"
      .. "  eth0: 45888861    1142    0    0    0     0          0         0    "
      .. "51552     610    0    0    0     0       0          0\n")
    assert.equal(2, #list)
    assert.same({ name = "lo", rx_bytes = 29237, rx_packets = 1894, rx_errors = 0,
      rx_dropped = 114, tx_bytes = 29238, tx_packets = 1895, tx_errors = 1,
      tx_dropped = 2 }, list[1])
    assert.equal("eth0", list[2].name)
    assert.equal(51552, list[2].tx_bytes)
  end)

  it("parse df -P -B1 output", function()
    local d = metrics.parse_df("Filesystem         1-blocks        Used   Available "
      .. "Capacity Mounted on\n/dev/vda       270553174016 18217406464 84527874048"
      .. "      18% /mnt/with space\n")
    assert.same({ filesystem = "/dev/vda", total_bytes = 270553174016,
      used_bytes = 18217406464, available_bytes = 84527874048,
      mount = "/mnt/with space" }, d)
    assert.is_nil(metrics.parse_df("only a header\n"))
  end)

  it("parse systemctl show output", function()
    local p = metrics.parse_systemctl_show("Id=ssh.service\nActiveState=active\n"
      .. "SubState=running\nActiveEnterTimestamp=Fri 2026-12-04 16:00:00 UTC\n")
    assert.equal("active", p.ActiveState)
    assert.equal("running", p.SubState)
    assert.equal("Fri 2026-12-04 16:00:00 UTC", p.ActiveEnterTimestamp)
  end)

  it("read this machine's /proc", async(function()
    local up = assert(metrics.uptime())
    assert.is_true(up.system_s > 0)
    assert.is_true(up.daemon_s >= 0)
    local system = metrics.system()
    assert.is_number(system.cpu.usage_percent)
    assert.is_true(system.cpu.cores >= 1)
    assert.is_number(system.load.load1)
    assert.is_true(system.memory.total > 0)
    assert.is_true(system.disk.total_bytes > 0)
    assert.is_true(#system.network.interfaces >= 1)
  end, 20))

  it("query units through systemctl", async(function()
    local dir = os.tmpname()
    os.remove(dir)
    sh("mkdir -p " .. dir .. "/run")
    local fake = dir .. "/systemctl"
    local f = assert(io.open(fake, "w"))
    f:write("#!/bin/sh\n[ \"$2\" = bad.service ] && { echo 'no such unit' >&2; exit 1; }\n"
      .. "printf 'Id=%s\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\n"
      .. "MainPID=42\\n' \"$2\"\n")
    f:close()
    sh("chmod 755 " .. fake)
    local result = metrics.services({ "a.service", "bad.service" },
      { systemctl = fake, systemd_dir = dir .. "/run" })
    local none = metrics.services({ "a.service" }, { systemd_dir = dir .. "/absent" })
    os.execute("rm -rf " .. dir)

    assert.is_true(result.available)
    assert.equal("a.service", result.units[1].unit)
    assert.equal("active", result.units[1].active_state)
    assert.equal("running", result.units[1].sub_state)
    assert.equal(42, result.units[1].main_pid)
    assert.truthy(result.units[2].error:find("no such unit", 1, true))
    assert.is_false(none.available)
  end, 20))
end)
