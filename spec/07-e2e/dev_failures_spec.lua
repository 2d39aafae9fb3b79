-- How `justavps dev` handles a bad environment: a port another program
-- listens on, a directory with a space, a damaged secrets.json, a lost
-- stack.json and a run killed with SIGKILL. Each test starts a real stack
-- in its own temporary directory.
local core = require("justavps.core")
local json = require("cjson.safe")
local helpers = require("support.helpers")

local async = helpers.async
local read_file = helpers.read_file
local free_port = helpers.free_port
local process_alive = helpers.process_alive

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")


-- Runs `justavps dev` in dir with ports (and extra arguments) until it is
-- ready or exits. Returns the process (nil once exited), its exit status
-- and its log text.
local function start_dev(dir, ports, extra)
  local args = { "dev", "--dir", dir,
    "--platform-port", tostring(ports.platform),
    "--edge-port", tostring(ports.edge),
    "--broker-port", tostring(ports.broker),
    "--first-address", tostring(ports.first_address),
  }
  for _, a in ipairs(extra or {}) do
    args[#args + 1] = a
  end
  local p = assert(core.proc.spawn({ file = BIN, args = args,
    env = helpers.child_env(), stdin = "null", stdout = "null",
    stderr = "pipe" }))
  local lines = {}
  local done = core.waiter()
  local finished = false
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      lines[#lines + 1] = line
      if line:find('msg="justavps dev is ready"', 1, true) then
        finished = true
        done:wake()
      end
    end
    finished = true
    done:wake()
  end)
  if not finished then
    done:wait(120)
  end
  local status = p:wait(0.5)
  return p, status, table.concat(lines, "\n")
end


local function stop_dev(p)
  p:kill("SIGTERM")
  return p:wait(60)
end


local function new_ports()
  return { platform = free_port(), edge = free_port(), broker = free_port(),
    first_address = math.random(190, 200) }
end


local function new_dir(name)
  local tmp = os.tmpname()
  os.remove(tmp)
  local dir = tmp .. "/" .. name
  assert(os.execute("mkdir -p '" .. dir .. "'") == 0)
  return tmp, dir
end


-- True when the cluster of dir still has its socket, so it still runs.
local function postgres_running(dir)
  return core.fs.stat(dir .. "/pg/.s.PGSQL.5432") ~= nil
end


describe("justavps dev failures", function()
  local tmps = {}

  lazy_teardown(function()
    for _, tmp in ipairs(tmps) do
      os.execute("rm -rf '" .. tmp .. "'")
    end
  end)

  it("refuses a port that is in use", async(function()
    local tmp, dir = new_dir("dev")
    tmps[#tmps + 1] = tmp
    local seen = 0
    local squatter = assert(core.http.listen({ host = "127.0.0.1", port = 0,
      access_log = false, handler = function()
        seen = seen + 1
        return 404, {}, ""
      end }))
    local ports = new_ports()
    ports.platform = squatter:port()

    local p, status, log = start_dev(dir, ports, { "--no-machine" })
    if not status then
      status = p:wait(30)
    end
    squatter:close()
    assert.equal(1, status)
    assert.truthy(log:find("port " .. ports.platform .. " on 127.0.0.1 for "
      .. "the platform is in use", 1, true), log)
    assert.truthy(log:find("--platform-port", 1, true), log)
    assert.equal(0, seen)
    assert.is_false(postgres_running(dir))
  end, 120))

  it("rejects a domain with an empty label", async(function()
    local tmp, dir = new_dir("dev")
    tmps[#tmps + 1] = tmp
    local p, status, log = start_dev(dir, new_ports(),
      { "--no-machine", "--domain", "a..b" })
    if not status then
      status = p:wait(30)
    end
    assert.equal(1, status)
    assert.truthy(log:find("invalid --domain a..b", 1, true), log)
    assert.is_false(postgres_running(dir))
  end, 60))

  it("runs in a directory with a space", async(function()
    local tmp, dir = new_dir("my dev")
    tmps[#tmps + 1] = tmp
    local p, status, log = start_dev(dir, new_ports(), { "--no-machine" })
    assert.is_nil(status, log)
    local stack = json.decode(read_file(dir .. "/stack.json") or "")
    assert.equal("table", type(stack), log)
    assert.matches("^sk_live_", stack.api_key)
    assert.is_true(postgres_running(dir))
    assert.equal(0, stop_dev(p))
    assert.is_false(postgres_running(dir))
  end, 120))

  it("rejects a damaged secrets.json", async(function()
    local tmp, dir = new_dir("dev")
    tmps[#tmps + 1] = tmp
    local ports = new_ports()
    local p, status, log = start_dev(dir, ports, { "--no-machine" })
    assert.is_nil(status, log)
    assert.equal(0, stop_dev(p))

    local f = assert(io.open(dir .. "/secrets.json", "wb"))
    f:write("garbage{")
    f:close()
    p, status, log = start_dev(dir, ports, { "--no-machine" })
    if not status then
      status = p:wait(30)
    end
    assert.equal(1, status)
    assert.truthy(log:find("secrets.json is not valid", 1, true), log)
    -- The start failed after PostgreSQL came up, and stopped it again.
    assert.is_false(postgres_running(dir))
    assert.equal("garbage{", read_file(dir .. "/secrets.json"))
  end, 120))

  it("finds its demo data without stack.json", async(function()
    local tmp, dir = new_dir("dev")
    tmps[#tmps + 1] = tmp
    local ports = new_ports()
    local p, status, log = start_dev(dir, ports)
    assert.is_nil(status, log)
    local first = assert(json.decode(read_file(dir .. "/stack.json")))
    assert.equal(0, stop_dev(p))

    os.remove(dir .. "/stack.json")
    p, status, log = start_dev(dir, ports)
    assert.is_nil(status, log)
    local second = assert(json.decode(read_file(dir .. "/stack.json")))
    assert.equal(first.machine.slug, second.machine.slug)
    assert.are_not.equal(first.api_key, second.api_key)

    -- The lost key is revoked, so one valid dev key remains.
    local function me(key)
      local res = assert(core.http.request({ host = "127.0.0.1",
        port = ports.platform, path = "/api/v1/me",
        headers = { Authorization = "Bearer " .. key } }))
      res:read_body()
      res:close()
      return res.status
    end
    assert.equal(401, me(first.api_key))
    assert.equal(200, me(second.api_key))
    assert.equal(0, stop_dev(p))
  end, 180))

  it("starts again after a run was killed with SIGKILL", async(function()
    local tmp, dir = new_dir("dev")
    tmps[#tmps + 1] = tmp
    local ports = new_ports()
    local p, status, log = start_dev(dir, ports, { "--no-machine" })
    assert.is_nil(status, log)
    local roles = {}
    for _, name in ipairs({ "platform", "broker", "edge" }) do
      roles[name] = tonumber((read_file(dir .. "/run/" .. name .. ".pid")
        or ""):match("^(%d+)"))
      assert.is_number(roles[name], name .. " has no pid file")
    end
    assert(p:kill("SIGKILL"))
    p:wait(10)
    -- The roles run in process groups of their own and outlive it.
    for name, pid in pairs(roles) do
      assert.is_true(process_alive(pid), name .. " is gone")
    end

    p, status, log = start_dev(dir, ports, { "--no-machine" })
    assert.is_nil(status, log)
    assert.truthy(log:find("stopping a process left by an earlier run", 1,
      true), log)
    for name, pid in pairs(roles) do
      assert.is_false(process_alive(pid), name .. " " .. pid
        .. " of the killed run still runs")
    end
    local res = assert(core.http.request({ host = "127.0.0.1",
      port = ports.platform, path = "/api/v1/health" }))
    res:read_body()
    res:close()
    assert.equal(200, res.status)
    assert.equal(0, stop_dev(p))
    assert.is_false(postgres_running(dir))
  end, 180))
end)
