-- The local provider: the shared conformance suite, then real daemon
-- processes started and stopped on loopback addresses.
local core = require("justavps.core")
local helpers = require("support.helpers")
local cloud_init = require("justavps.provision.cloud_init")
local sshkey = require("justavps.provision.sshkey")
local local_provider = require("providers.local")
local conformance = require("06-providers.conformance")

local async = helpers.async

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

local TOKEN = "local-spec-token-0123456789abcdef0123456789"


local function shell(command)
  local f = assert(io.popen(command .. " 2>&1"))
  local out = f:read("*a")
  local ok = f:close()
  assert(ok, "command failed: " .. command .. "\n" .. out)
  return out
end

local ROOT = shell("mktemp -d /tmp/justavps-local-spec.XXXXXX"):match("%S+")
-- A random slice of the pool, so that runs in other checkouts on this
-- host rarely meet the same addresses.
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16))
local ADDRESS_FIRST = math.random(20, 230)
local PUBLIC_PORT = math.random(20000, 29999)
local INTERNAL_PORT = PUBLIC_PORT + 10000

local public_key


local function new_driver()
  return assert(local_provider.new({
    root_dir = ROOT, binary = BIN, address_first = ADDRESS_FIRST,
    address_count = 20, public_port = PUBLIC_PORT,
    internal_port = INTERNAL_PORT, stop_timeout = 5,
  }))
end


local function server_request(slug)
  if not public_key then
    public_key = assert(sshkey.generate({ comment = "local-spec" })).public_key
  end
  local user_data = assert(cloud_init.user_data({
    slug = slug,
    daemon_url = "http://127.0.0.1/justavps-daemon",
    daemon_sha256 = string.rep("0", 64),
    daemon_config = { slug = slug, token = TOKEN,
      platform_url = "http://127.0.0.1:1", heartbeat_interval = 60,
      update = { installed_path = cloud_init.DAEMON_PATH } },
    ssh_public_keys = { public_key },
    broker_cidrs = { "127.0.0.0/8" },
  }))
  return { slug = slug, name = slug, region = "local", server_type = "local",
    image = "local", user_data = user_data }
end


local function factory()
  local driver = new_driver()
  return {
    driver = driver,
    server_request = server_request,
    server_count = function()
      return #driver:list_machines()
    end,
    close = function()
      for _, slug in ipairs(driver:list_machines()) do
        assert(driver:delete_server(slug))
      end
    end,
  }
end


-- Returns true when a TCP connection to host:port succeeds.
local function accepts(host, port)
  local sock = core.tcp.connect(host, port, { timeout = 2 })
  if sock then
    sock:close()
    return true
  end
  return false
end


local function wait_for(fn, what, seconds)
  local deadline = core.now() + (seconds or 15)
  while core.now() < deadline do
    if fn() then
      return
    end
    core.sleep(0.05)
    core.update_time()
  end
  error("timed out waiting for " .. what)
end


local function read_pid(slug)
  local f = io.open(ROOT .. "/" .. slug .. "/daemon.pid")
  if not f then
    return nil
  end
  local pid = tonumber(f:read("*l"):match("^(%d+)"))
  f:close()
  return pid
end


conformance("local", factory)


describe("local provider", function()
  teardown(function()
    helpers.run(function()
      local driver = new_driver()
      for _, slug in ipairs(driver:list_machines()) do
        driver:delete_server(slug)
      end
    end, 60)
    shell("rm -rf " .. ROOT)
  end)

  it("runs a daemon and deletes it", async(function()
    local driver = new_driver()
    local server = assert(driver:create_server(server_request("run-stop")))
    local host = server.ipv4
    assert.truthy(host:match("^127%.0%.0%.%d+$"))
    wait_for(function()
      return accepts(host, INTERNAL_PORT)
    end, "the daemon's internal listener")
    assert.is_true(accepts(host, PUBLIC_PORT))
    local pid = read_pid("run-stop")
    assert.is_number(pid)
    assert.is_true((core.proc.kill(pid, 0)))

    local perm = assert(core.fs.stat(ROOT .. "/run-stop/config.json")).perm
    assert.equal(tonumber("600", 8), perm % 512)

    assert(driver:delete_server(server.id))
    assert.is_nil((core.proc.kill(pid, 0)))
    assert.is_false(accepts(host, INTERNAL_PORT))
    assert.is_false(accepts(host, PUBLIC_PORT))
    assert.is_nil(io.open(ROOT .. "/run-stop/config.json"))
    local _, _, code = driver:get_server_status("run-stop")
    assert.equal("not_found", code)
  end, 60))

  it("gives each machine its own address", async(function()
    local driver = new_driver()
    local a = assert(driver:create_server(server_request("addr-a")))
    local b = assert(driver:create_server(server_request("addr-b")))
    assert.are_not.equal(a.ipv4, b.ipv4)
    wait_for(function()
      return accepts(a.ipv4, INTERNAL_PORT) and accepts(b.ipv4, INTERNAL_PORT)
    end, "both daemons")
    assert(driver:delete_server("addr-a"))
    assert(driver:delete_server("addr-b"))
    assert.is_false(accepts(a.ipv4, INTERNAL_PORT))
    assert.is_false(accepts(b.ipv4, INTERNAL_PORT))
  end, 60))

  it("finds a daemon with a new driver", async(function()
    local first = new_driver()
    local server = assert(first:create_server(server_request("restart")))
    local pid = read_pid("restart")
    -- A new driver is what a restarted platform has: only the files.
    local second = new_driver()
    local again = assert(second:create_server(server_request("restart")))
    assert.equal(server.ipv4, again.ipv4)
    assert.equal(pid, read_pid("restart"))
    local status = assert(second:get_server_status("restart"))
    assert.equal("running", status.status)
    assert(second:delete_server("restart"))
    assert.is_nil((core.proc.kill(pid, 0)))
  end, 60))

  it("restarts a daemon that exited", async(function()
    local driver = new_driver()
    assert(driver:create_server(server_request("revive")))
    local pid = read_pid("revive")
    assert(core.proc.kill(-pid, "SIGKILL"))
    wait_for(function()
      return assert(driver:get_server_status("revive")).status == "off"
    end, "the daemon to exit")
    assert(driver:create_server(server_request("revive")))
    local new_pid = read_pid("revive")
    assert.are_not.equal(pid, new_pid)
    assert.equal("running", assert(driver:get_server_status("revive")).status)
    assert(driver:delete_server("revive"))
  end, 60))

  it("names only real addresses when the pool is full", async(function()
    local root = shell("mktemp -d /tmp/justavps-local-full.XXXXXX")
      :match("%S+")
    -- The pool runs past .254; its one address is claimed already.
    shell("mkdir -p " .. root .. "/.claims/127.0.0.254")
    local driver = assert(local_provider.new({
      root_dir = root, binary = BIN, address_first = 254,
      address_count = 10, public_port = PUBLIC_PORT,
      internal_port = INTERNAL_PORT, stop_timeout = 5,
    }))
    local server, err, code = driver:create_server(server_request("full"))
    shell("rm -rf " .. root)
    assert.is_nil(server)
    assert.equal("capacity_unavailable", code)
    assert.truthy(err:find("127.0.0.254 to 127.0.0.254", 1, true), err)
  end))

  it("rejects user data without a config", async(function()
    local driver = new_driver()
    local req = server_request("no-config")
    req.user_data = "#cloud-config\n{}"
    local server, err, code = driver:create_server(req)
    assert.is_nil(server)
    assert.truthy(err:find("write_files", 1, true))
    assert.equal("invalid_request", code)
  end))
end)
