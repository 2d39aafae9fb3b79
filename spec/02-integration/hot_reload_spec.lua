-- Hot reload of a running `justavps serve` process: a client loop keeps
-- sending requests while the app file changes under it, and no request may
-- fail. The process runs from a copy of the Lua tree (JUSTAVPS_ROOT) so the
-- spec edits files without touching the checkout.
local core = require("justavps.core")
local helpers = require("support.helpers")

local async = helpers.async

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

local APP = "/lua/justavps/apps/hello.lua"


local function sh(cmd)
  assert(os.execute(cmd) == 0, "command failed: " .. cmd)
end


local function make_tree()
  local dir = os.tmpname()
  os.remove(dir)
  sh("mkdir -p " .. dir .. " && cp -r lua " .. dir .. "/")
  return dir
end


local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end


-- Writes path through a temporary file and a rename, as editors do, so the
-- watcher never sees a half-written file.
local function write_file(path, data)
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "wb"))
  f:write(data)
  f:close()
  assert(os.rename(tmp, path))
end


-- Starts the serve role and returns the process, its port and a log reader
-- that collects stderr lines in the background.
local function start_serve(root, extra)
  local args = { "serve", "--port", "0", "--access-log=false" }
  for _, a in ipairs(extra or {}) do
    args[#args + 1] = a
  end

  local env = helpers.child_env({ JUSTAVPS_ROOT = root })
  local p = assert(core.proc.spawn{
    file = BIN, args = args, env = env,
    stdin = "null", stdout = "null", stderr = "pipe",
  })

  local lines = {}
  local port
  local got_port = core.waiter()
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      lines[#lines + 1] = line
      local n = line:match("msg=listening .*port=(%d+)")
      if n and not port then
        port = tonumber(n)
        got_port:wake()
      end
    end
  end)

  if not port then
    got_port:wait(10)
  end
  assert(port, "serve did not report a port; log:\n" .. table.concat(lines, "\n"))
  return p, port, lines
end


local function get(port)
  local res, err, code = core.http.request{
    host = "127.0.0.1", port = port, path = "/", timeout = 5,
  }
  if not res then
    return nil, err, code
  end
  local body = res:read_body()
  res:close()
  return res.status, body
end


-- Polls until GET / returns want. Returns true, or false and the last
-- answer seen.
local function wait_for_body(port, want, seconds)
  local deadline = core.now() + seconds
  local status, body
  while core.now() < deadline do
    status, body = get(port)
    if status == 200 and body == want then
      return true
    end
    core.sleep(0.05)
  end
  return false, tostring(status) .. " " .. tostring(body)
end


local function log_has(lines, pattern)
  for _, line in ipairs(lines) do
    if line:find(pattern) then
      return true
    end
  end
  return false
end


describe("hot reload", function()
  it("swaps code on SIGHUP with no failed request", async(function()
    local root = make_tree()
    local p, port, lines = start_serve(root, { "--no-watch" })

    local failures, served = {}, 0
    local running = true
    local loop_done = core.waiter()
    core.spawn(function()
      while running do
        local status, body = get(port)
        if status ~= 200 then
          failures[#failures + 1] = tostring(status) .. " " .. tostring(body)
        else
          served = served + 1
        end
      end
      loop_done:wake()
    end)

    local source = read_file(root .. APP)
    for i = 1, 5 do
      write_file(root .. APP,
        (source:gsub('"hello world\\n"', '"hello ' .. i .. '\\n"')))
      assert(p:kill("SIGHUP"))
      local ok, last = wait_for_body(port, "hello " .. i .. "\n", 10)
      assert(ok, "last answer: " .. tostring(last) .. "\nlog:\n"
        .. table.concat(lines, "\n"))
    end

    running = false
    loop_done:wait(10)
    assert.same({}, failures)
    assert.truthy(served > 5)

    assert(p:kill("SIGTERM"))
    assert.equal(0, p:wait(10))
    sh("rm -rf " .. root)
  end, 60))

  it("keeps old code after a syntax error", async(function()
    local root = make_tree()
    local p, port, lines = start_serve(root, { "--no-watch" })
    local source = read_file(root .. APP)

    write_file(root .. APP, source .. "\nthis is not lua\n")
    assert(p:kill("SIGHUP"))
    core.sleep(0.5)

    local status, body = get(port)
    assert.equal(200, status)
    assert.equal("hello world\n", body)
    assert.is_true(log_has(lines, "reload failed"))
    assert.is_true(log_has(lines, "apps/hello.lua:%d+"))

    -- A module that raises while loading is rejected the same way.
    write_file(root .. APP, 'error("broken on purpose")\n')
    assert(p:kill("SIGHUP"))
    core.sleep(0.5)
    status, body = get(port)
    assert.equal(200, status)
    assert.equal("hello world\n", body)
    assert.is_true(log_has(lines, "broken on purpose"))

    -- A fixed file loads again.
    write_file(root .. APP,
      (source:gsub('"hello world\\n"', '"fixed\\n"')))
    assert(p:kill("SIGHUP"))
    assert.is_true(wait_for_body(port, "fixed\n", 10))

    assert(p:kill("SIGTERM"))
    assert.equal(0, p:wait(10))
    sh("rm -rf " .. root)
  end, 60))

  it("reloads when a watched file changes", async(function()
    local root = make_tree()
    local p, port, lines = start_serve(root)
    local source = read_file(root .. APP)

    write_file(root .. APP,
      (source:gsub('"hello world\\n"', '"watched\\n"')))
    local ok, last = wait_for_body(port, "watched\n", 10)
    assert(ok, "last answer: " .. tostring(last) .. "\nlog:\n"
      .. table.concat(lines, "\n"))

    assert(p:kill("SIGTERM"))
    assert.equal(0, p:wait(10))
    sh("rm -rf " .. root)
  end, 60))

  it("finishes a request in flight on SIGTERM", async(function()
    local root = make_tree()
    -- An app whose only route waits before answering.
    write_file(root .. APP, [[
local core = require("justavps.core")
return {
  handle = function()
    core.sleep(0.5)
    return 200, nil, "slow\n"
  end,
}
]])
    local p, port = start_serve(root, { "--no-watch" })

    local result
    core.spawn(function()
      result = { get(port) }
    end)
    core.sleep(0.1)
    assert(p:kill("SIGTERM"))
    assert.equal(0, p:wait(10))
    assert.same({ 200, "slow\n" }, result)
    sh("rm -rf " .. root)
  end, 60))
end)
