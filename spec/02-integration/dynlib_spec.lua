-- libpq and libcurl load with dlopen() on first use (core/dynlib.c). A
-- process that never calls core.pg or core.curl must not map them. A
-- process that cannot load them must get nil, message,
-- "library_unavailable" and keep running. Each case runs in a child
-- process, because this busted process may have loaded both already.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")

local async = helpers.async

local BUILD = os.getenv("JV_BUILD_DIR") or "build"
local BIN = os.getenv("JUSTAVPS_TEST_BIN") or (BUILD .. "/justavps")

-- The child: a luajit with core.so from the build. It prints one
-- "name=value" line per step. Its own /proc/self/maps shows whether a
-- library is mapped.
local CHILD_SCRIPT = [[
local core = require("justavps.core")
local dir = ...

local function mapped(pattern)
  local f = assert(io.open("/proc/self/maps"))
  local maps = f:read("*a")
  f:close()
  return maps:find(pattern) ~= nil
end

local function report(name, ...)
  local values = { ... }
  for i = 1, select("#", ...) do
    values[i] = tostring(values[i])
  end
  print(name .. "=" .. table.concat(values, "|"))
end

core.spawn(function()
  report("libpq_before", mapped("/libpq%.so"))
  report("libcurl_before", mapped("/libcurl%.so"))

  -- A socket directory with no server: libpq fails at once.
  report("connect", core.pg.connect("host=" .. dir, { timeout = 5 }))
  report("connect_again", core.pg.connect({ host = dir }, { timeout = 5 }))
  local pool = core.pg.pool({ conninfo = "host=" .. dir })
  report("pool_query", pool:query("SELECT 1"))
  report("pool_transaction", pool:transaction(function()
    return true
  end))
  report("pool_total", pool:stats().total)
  report("libpq_after", mapped("/libpq%.so"))

  -- Port 1 on loopback: nothing listens there, so libcurl gets a refusal.
  report("request", core.curl.request({ url = "http://127.0.0.1:1/",
    timeout = 5 }))
  report("request_again", core.curl.request({ url = "ftp://127.0.0.1/" }))
  report("libcurl_after", mapped("/libcurl%.so"))
end)
core.run()
report("exit", "clean")
]]


local function sh(cmd)
  assert(os.execute(cmd) == 0, "command failed: " .. cmd)
end


-- Reads a pipe to its end.
local function read_all(stream)
  local parts = {}
  while true do
    local data = stream:read()
    if not data then
      break
    end
    parts[#parts + 1] = data
  end
  return table.concat(parts)
end


-- Splits the child's "name=a|b|c" lines into name -> { a, b, c }.
local function parse_report(out)
  local steps = {}
  for name, values in out:gmatch("([%w_]+)=([^\n]*)") do
    local list = {}
    for value in (values .. "|"):gmatch("([^|]*)|") do
      list[#list + 1] = value
    end
    steps[name] = list
  end
  return steps
end


describe("libpq and libcurl loading", function()
  local dir, script

  -- Runs CHILD_SCRIPT with extra environment variables. Returns its exit
  -- status, the parsed report and the whole output.
  local function run_child(extra)
    local env = helpers.child_env({
      LUA_PATH = "lua/?.lua;lua/?/init.lua;;",
      LUA_CPATH = BUILD .. "/lua/?.so;;",
      -- Under tools/test.sh --sanitize this drops the ASan preload.
      LUA_INIT = os.getenv("LUA_INIT"),
    })
    for name, value in pairs(extra or {}) do
      env[name] = value
    end
    local p = assert(core.proc.spawn({ file = "luajit",
      args = { script, dir }, env = env, stdout = "pipe",
      stderr = "stdout" }))
    p.stdout:settimeout(30)
    local out = read_all(p.stdout)
    local status = p:wait(30)
    p.stdout:close()
    return status, parse_report(out), out
  end

  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    sh("mkdir -p " .. dir)
    script = dir .. "/child.lua"
    local f = assert(io.open(script, "w"))
    f:write(CHILD_SCRIPT)
    f:close()
  end)

  teardown(function()
    os.execute("rm -rf " .. dir)
  end)

  it("daemon maps neither library", async(function()
    local conf_path = dir .. "/daemon.json"
    local f = assert(io.open(conf_path, "w"))
    f:write(json.encode({ slug = "dynlib-1", token = string.rep("t", 32),
      public = { host = "127.0.0.1", port = 0 },
      internal = { host = "127.0.0.1", port = 0 },
      broker_cidrs = { "127.0.0.0/8" }, toolbox_root = dir,
      state_dir = dir, platform_url = "http://127.0.0.1:1" }))
    f:close()

    local p = assert(core.proc.spawn({ file = BIN,
      args = { "daemon", "--config", conf_path, "--access-log=false" },
      env = helpers.child_env(), stdout = "null", stderr = "pipe" }))
    p.stderr:settimeout(20)
    local listening = 0
    while listening < 2 do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      if line:find("msg=listening", 1, true) then
        listening = listening + 1
      end
    end

    local maps_file = io.open("/proc/" .. p:pid() .. "/maps")
    local maps = maps_file and maps_file:read("*a") or ""
    if maps_file then
      maps_file:close()
    end
    p:kill("SIGTERM")
    local status = p:wait(10)
    p.stderr:close()

    assert.equal(2, listening, "the daemon did not log both listeners")
    assert.truthy(maps:find("/libuv%.so"), "libuv not in the daemon's maps")
    assert.falsy(maps:find("/libpq%.so"), "the daemon mapped libpq")
    assert.falsy(maps:find("/libcurl%.so"), "the daemon mapped libcurl")
    assert.equal(0, status)
  end, 30))

  it("first use maps each library", async(function()
    local status, steps, out = run_child()
    assert.equal(0, status, out)
    assert.same({ "false" }, steps.libpq_before, out)
    assert.same({ "false" }, steps.libcurl_before, out)
    assert.equal("database_unavailable", steps.connect[3], out)
    assert.equal("database_unavailable", steps.pool_query[3], out)
    assert.same({ "true" }, steps.libpq_after, out)
    assert.equal("connect_failed", steps.request[3], out)
    assert.equal("protocol_error", steps.request_again[3], out)
    assert.same({ "true" }, steps.libcurl_after, out)
    assert.same({ "clean" }, steps.exit, out)
  end, 40))

  it("missing libraries return library_unavailable", async(function()
    local status, steps, out = run_child({
      JUSTAVPS_LIBPQ = dir .. "/missing/libpq.so.5",
      JUSTAVPS_LIBCURL = dir .. "/missing/libcurl.so.4" })
    assert.equal(0, status, out)

    for _, name in ipairs({ "connect", "connect_again", "pool_query",
        "pool_transaction" }) do
      local step = steps[name]
      assert.is_table(step, name .. " did not run: " .. out)
      assert.equal("nil", step[1], out)
      assert.equal("library_unavailable", step[3], out)
      assert.truthy(step[2]:find("failed to load libpq.so.5: " .. dir
        .. "/missing/libpq.so.5: ", 1, true), step[2])
      assert.truthy(step[2]:find("Install the Debian package libpq5 or "
        .. "unset JUSTAVPS_LIBPQ.", 1, true), step[2])
    end
    -- A failed connect gives its pool slot back.
    assert.same({ "0" }, steps.pool_total, out)
    assert.same({ "false" }, steps.libpq_after, out)

    for _, name in ipairs({ "request", "request_again" }) do
      local step = steps[name]
      assert.is_table(step, name .. " did not run: " .. out)
      assert.equal("nil", step[1], out)
      assert.equal("library_unavailable", step[3], out)
      assert.truthy(step[2]:find("failed to load libcurl.so.4: ", 1, true),
        step[2])
      assert.truthy(step[2]:find("Install the Debian package libcurl4 or "
        .. "unset JUSTAVPS_LIBCURL.", 1, true), step[2])
    end
    assert.same({ "false" }, steps.libcurl_after, out)
    assert.same({ "clean" }, steps.exit, out)
  end, 40))

  it("library without the symbols is rejected", async(function()
    -- libc loads, but it has none of the functions.
    local status, steps, out = run_child({ JUSTAVPS_LIBPQ = "libc.so.6",
      JUSTAVPS_LIBCURL = "libc.so.6" })
    assert.equal(0, status, out)
    assert.equal("library_unavailable", steps.connect[3], out)
    assert.truthy(steps.connect[2]:find("failed to load PQbackendPID from "
      .. "libc.so.6: ", 1, true), steps.connect[2])
    assert.equal("library_unavailable", steps.request[3], out)
    assert.truthy(steps.request[2]:find("failed to load curl_easy_cleanup "
      .. "from libc.so.6: ", 1, true), steps.request[2])
    assert.same({ "clean" }, steps.exit, out)
  end, 40))

  it("migrate reports a missing libpq", async(function()
    local env = helpers.child_env({
      JUSTAVPS_LIBPQ = dir .. "/missing/libpq.so.5" })
    local p = assert(core.proc.spawn({ file = BIN,
      args = { "migrate", "--status", "--dsn", "host=" .. dir },
      env = env, stdout = "pipe", stderr = "stdout" }))
    p.stdout:settimeout(30)
    local out = read_all(p.stdout)
    local status = p:wait(30)
    p.stdout:close()
    assert.equal(1, status, out)
    assert.truthy(out:find("code=library_unavailable", 1, true), out)
    assert.truthy(out:find("Install the Debian package libpq5", 1, true),
      out)
  end, 40))
end)
