-- The daemon's systemd unit, checked with the real `systemd-analyze verify`
-- (Debian package systemd). The binary exists only on machines, so the
-- check runs against a throw-away root: the host's unit directory copied
-- in, the unit under etc/systemd/system and a stub at the ExecStart path.
-- systemd-analyze exits 0 for warnings such as unknown keys, so any output
-- at all fails the check.
local core = require("justavps.core")
local helpers = require("support.helpers")
local systemd = require("justavps.provision.systemd")

local async = helpers.async


-- Runs a program to completion. Returns its status and its output, with
-- stderr merged into stdout.
local function run(file, args)
  local p = assert(core.proc.spawn({ file = file, args = args,
    stdout = "pipe", stderr = "stdout" }))
  local parts = {}
  while true do
    local chunk = p.stdout:read()
    if not chunk then
      break
    end
    parts[#parts + 1] = chunk
  end
  p.stdout:close()
  local status = p:wait(120)
  return status, table.concat(parts)
end


local function write_file(path, data, mode)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  if mode then
    assert(run("chmod", { mode, path }) == 0)
  end
end


-- Builds a root with the host's units and a stub daemon binary. Returns
-- its path.
local function stage_root()
  local status, out = run("mktemp", { "-d", "-t", "justavps-unit-spec.XXXXXX" })
  assert(status == 0, out)
  local root = out:gsub("\n$", "")
  for _, dir in ipairs({ "/etc/systemd/system", "/lib/systemd",
      "/usr/local/bin" }) do
    assert(run("mkdir", { "-p", root .. dir }) == 0)
  end
  local cstatus, cout = run("cp", { "-a", "/lib/systemd/system",
    root .. "/lib/systemd/" })
  assert(cstatus == 0, cout)
  write_file(root .. systemd.BINARY_PATH, "#!/bin/sh\nexit 0\n", "0755")
  return root
end


local function remove_root(root)
  assert(root:match("/justavps%-unit%-spec%.[^/]+$"),
    "refusing to remove " .. root)
  run("rm", { "-rf", root })
end


-- Runs systemd-analyze verify on text as justavps-daemon.service inside a
-- staged root. Returns the exit status and the output.
local function verify(text, root)
  write_file(root .. "/etc/systemd/system/" .. systemd.NAME, text)
  return run("systemd-analyze", { "verify", "--man=no", "--root=" .. root,
    systemd.NAME })
end


local function setting(text, key)
  return text:match("\n" .. key .. "=([^\n]*)\n")
end


describe("systemd.unit", function()
  local root

  setup(async(function()
    root = stage_root()
  end, 60))

  teardown(async(function()
    remove_root(root)
  end, 60))

  it("passes systemd-analyze verify with no output", async(function()
    local status, out = verify(assert(systemd.unit()), root)
    assert.equal(0, status, "systemd-analyze output:\n" .. out)
    assert.equal("", out, "systemd-analyze output:\n" .. out)
  end, 60))

  it("verify gate reports an unknown key", async(function()
    -- Exit status 0 with a warning: the gate must still see it.
    local text = assert(systemd.unit()):gsub("\n%[Service%]\n",
      "\n[Service]\nRestartt=always\n")
    local status, out = verify(text, root)
    assert.equal(0, status)
    assert.truthy(out:find("Unknown key", 1, true), out)
  end, 60))

  it("verify gate reports a missing binary", async(function()
    local text = assert(systemd.unit({
      binary_path = "/usr/local/bin/no-such-daemon" }))
    local status, out = verify(text, root)
    assert.equal(1, status, out)
    assert.truthy(out:find("no-such-daemon", 1, true), out)
  end, 60))

  it("starts the daemon with the config path", function()
    local text = assert(systemd.unit())
    assert.equal("/usr/local/bin/justavps-daemon daemon --config "
      .. "/etc/justavps/config.json --drain-timeout 10",
      setting(text, "ExecStart"))
    assert.equal("exec", setting(text, "Type"))
    assert.equal("network-online.target", setting(text, "After"))
    assert.equal("network-online.target", setting(text, "Wants"))
    assert.equal("multi-user.target", setting(text, "WantedBy"))
  end)

  it("restarts on failure below the start limit", function()
    local text = assert(systemd.unit())
    assert.equal("on-failure", setting(text, "Restart"))
    local restart_sec = tonumber(setting(text, "RestartSec"))
    local interval = tonumber(setting(text, "StartLimitIntervalSec"))
    local burst = tonumber(setting(text, "StartLimitBurst"))
    assert.is_number(restart_sec)
    assert.is_number(interval)
    assert.is_number(burst)
    -- Restart= alone must never reach the limit, or a crash loop would
    -- leave the unit failed and refuse the update watchdog's restart.
    assert.is_true(burst > interval / restart_sec + 1)
  end)

  it("waits longer than the drain timeout to stop", function()
    for _, drain in ipairs({ 0, 10, 45, 3600 }) do
      local text = assert(systemd.unit({ drain_timeout = drain }))
      local suffix = " --drain-timeout " .. drain
      assert.equal(suffix, setting(text, "ExecStart"):sub(-#suffix))
      assert.is_true(tonumber(setting(text, "TimeoutStopSec")) > drain)
    end
  end)

  it("sets limits and kill behaviour", function()
    local text = assert(systemd.unit())
    assert.equal("65536", setting(text, "LimitNOFILE"))
    assert.equal("process", setting(text, "KillMode"))
    assert.equal("continue", setting(text, "OOMPolicy"))
  end)

  it("leaves out sandboxing that would break the terminal", function()
    local text = assert(systemd.unit())
    for _, key in ipairs({ "ProtectSystem", "ProtectHome", "PrivateTmp",
        "NoNewPrivileges", "User", "DynamicUser", "UMask" }) do
      assert.is_nil(setting(text, key), key)
    end
  end)

  it("accepts other paths", function()
    local text = assert(systemd.unit({ binary_path = "/opt/jv/bin/daemon",
      config_path = "/etc/jv/daemon.json" }))
    assert.equal("/opt/jv/bin/daemon daemon --config /etc/jv/daemon.json "
      .. "--drain-timeout 10", setting(text, "ExecStart"))
  end)

  local cases = {
    { "relative binary path", { binary_path = "bin/daemon" }, "binary_path" },
    { "binary path with a space", { binary_path = "/usr/bin/a b" },
      "binary_path" },
    { "binary path with a specifier", { binary_path = "/usr/bin/%n" },
      "binary_path" },
    { "binary path with a newline", { binary_path = "/usr/bin/a\nUser=x" },
      "binary_path" },
    { "config path with ..", { config_path = "/etc/../tmp/c.json" },
      "config_path" },
    { "config path with a quote", { config_path = "/etc/c'.json" },
      "config_path" },
    { "negative drain timeout", { drain_timeout = -1 }, "drain_timeout" },
    { "fractional drain timeout", { drain_timeout = 1.5 }, "drain_timeout" },
    { "drain timeout as a string", { drain_timeout = "10" }, "drain_timeout" },
    { "unknown option", { drain = 10 }, "drain" },
  }

  for _, case in ipairs(cases) do
    it("rejects " .. case[1], function()
      local text, err, code = systemd.unit(case[2])
      assert.is_nil(text)
      assert.equal("invalid_option", code)
      assert.truthy(err:find(case[3], 1, true), err)
    end)
  end
end)
