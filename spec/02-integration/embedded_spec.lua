-- The binary alone: copied away from the checkout and given an empty
-- JUSTAVPS_ROOT, it must run its roles from the Lua tree compiled into it,
-- as a machine runs the daemon from one downloaded file.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")

local async = helpers.async

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")


local function sh(cmd)
  assert(os.execute(cmd) == 0, "command failed: " .. cmd)
end


describe("binary without a Lua tree", function()
  local dir, lone, env

  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    sh("mkdir -p " .. dir .. "/empty " .. dir .. "/bin")
    lone = dir .. "/bin/justavps-daemon"
    sh("cp " .. BIN .. " " .. lone)
    env = helpers.child_env({ JUSTAVPS_ROOT = dir .. "/empty" })
  end)

  teardown(function()
    os.execute("rm -rf " .. dir)
  end)

  local function run(args)
    local p = assert(core.proc.spawn({ file = lone, args = args, env = env,
      stdout = "pipe", stderr = "stdout" }))
    local parts = {}
    while true do
      local data = p.stdout:read()
      if not data then
        break
      end
      parts[#parts + 1] = data
    end
    return p:wait(20), table.concat(parts)
  end

  it("lists every role", async(function()
    local status, out = run({ "--help" })
    assert.equal(0, status)
    for _, role in ipairs({ "platform", "edge", "broker", "daemon", "dev", "serve",
        "migrate" }) do
      assert.truthy(out:find("\n  " .. role .. " ", 1, true), role)
    end
  end))

  it("runs a role to completion", async(function()
    local status, out = run({ "hello", "--count", "1" })
    assert.equal(0, status)
    assert.truthy(out:find("msg=hello", 1, true), out)
  end))

  it("serves the daemon's proxy", async(function()
    local backend = assert(core.http.listen({ port = 0, access_log = false,
      handler = function(req)
        return 200, nil, "through " .. req.target
      end }))
    local conf_path = dir .. "/config.json"
    local f = assert(io.open(conf_path, "w"))
    f:write(json.encode({ slug = "lone-1", token = string.rep("t", 32),
      public = { host = "127.0.0.1", port = 0 },
      internal = { host = "127.0.0.1", port = 0 },
      broker_cidrs = { "127.0.0.0/8" }, toolbox_root = dir,
      state_dir = dir, platform_url = "http://127.0.0.1:1" }))
    f:close()

    local p = assert(core.proc.spawn({ file = lone,
      args = { "daemon", "--config", conf_path, "--access-log=false" },
      env = env, stdout = "null", stderr = "pipe" }))
    local port
    local ready = core.waiter()
    core.spawn(function()
      while true do
        local line = p.stderr:readuntil("\n", 1024 * 1024)
        if not line then
          break
        end
        local n = line:match("msg=listening .*listener=public .*port=(%d+)")
        if n and not port then
          port = tonumber(n)
          ready:wake()
        end
      end
    end)
    if not port then
      ready:wait(10)
    end
    assert(port, "the daemon did not start")

    local res = assert(core.http.request({ host = "127.0.0.1", port = port,
      path = "/_port/" .. backend:port() .. "/x", timeout = 10 }))
    assert.equal(200, res.status)
    assert.equal("through /x", res:read_body())
    res:close()

    p:kill("SIGTERM")
    assert.equal(0, p:wait(10))
    backend:close()
  end))
end)
