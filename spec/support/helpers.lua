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

-- Wraps a test body so busted's `it` runs it on the loop:
--   it("echoes", helpers.async(function() ... end))
function _M.async(fn, timeout)
  return function()
    _M.run(fn, timeout)
  end
end

return _M
