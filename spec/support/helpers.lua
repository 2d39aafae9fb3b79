-- Shared spec helpers: run a test body as a core coroutine on the real loop.
local core = require("justavps.core")

local _M = {}

-- Runs fn(...) in a coroutine started by core.spawn and drives the loop
-- until it returns, raising its error (with traceback) in the busted test.
-- A body still running after timeout seconds (default 10) fails the test.
function _M.run(fn, timeout)
  timeout = timeout or 10
  local finished, failure = false, nil

  core.spawn(function()
    local ok, err = xpcall(fn, debug.traceback)
    finished = true
    if not ok then
      failure = err
    end
  end)

  local timer = core.timer(timeout, function()
    if not finished then
      finished = true
      failure = "spec body timed out after " .. timeout .. " s"
    end
  end)

  while not finished do
    core.run("once")
  end

  timer:stop()
  core.run("nowait")

  if failure then
    error(failure, 0)
  end
end

-- Returns an environment for a child process: PATH and HOME, the
-- sanitizer options when set (so an ASan build of the binary keeps them),
-- and the entries of extra.
function _M.child_env(extra)
  local env = {}
  for _, name in ipairs({ "PATH", "HOME", "ASAN_OPTIONS", "UBSAN_OPTIONS",
      "LSAN_OPTIONS", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE" }) do
    env[name] = os.getenv(name)
  end
  for name, value in pairs(extra or {}) do
    env[name] = value
  end
  return env
end

-- Wraps a test body so busted's `it` runs it on the loop:
--   it("echoes", helpers.async(function() ... end))
function _M.async(fn, timeout)
  return function()
    _M.run(fn, timeout)
  end
end

-- Returns the contents of the file at path, or nil when it cannot be read.
function _M.read_file(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local data = f:read("*a")
  f:close()
  return data
end

-- Returns a TCP port on 127.0.0.1 that was free a moment ago.
function _M.free_port()
  local listener = assert(core.tcp.listen({ host = "127.0.0.1", port = 0,
    on_accept = function(sock) sock:close() end }))
  local port = listener:port()
  listener:close()
  return port
end

-- Returns true when pid is a process that has not exited (a zombie has).
function _M.process_alive(pid)
  local stat = _M.read_file("/proc/" .. pid .. "/stat")
  return stat ~= nil and stat:match("^%d+ %b() (%a)") ~= "Z"
end

-- Polls fn every 0.2 s until it returns a true value, for at most timeout
-- seconds. Returns that value, or nil.
function _M.eventually(timeout, fn)
  local deadline = core.now() + timeout
  while true do
    local v = fn()
    if v then
      return v
    end
    core.update_time()
    if core.now() > deadline then
      return nil
    end
    core.sleep(0.2)
  end
end

return _M
