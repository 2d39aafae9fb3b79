-- core.signal: Lua handlers for real signals sent to this process.
local core = require("justavps.core")
local helpers = require("spec.support.helpers")

local signal = core.signal
local proc = core.proc

describe("core.signal", function()
  it("runs a handler for a signal sent by kill", helpers.async(function()
    local got = core.waiter()
    local name, parkable
    local h = signal.on("SIGHUP", function(signame)
      name, parkable = signame, core.parkable()
      got:wake(true)
    end)
    -- Sent by another process, as an operator's `kill -HUP` would be.
    local p = assert(proc.spawn{
      file = "/bin/kill", args = { "-HUP", tostring(proc.getpid()) },
    })
    assert.equal(0, (p:wait(10)))
    -- The handler may have run before the wait above returned.
    if name == nil then
      assert.is_true(got:wait(10))
    end
    assert.equal("SIGHUP", name)
    -- The handler runs in a coroutine of its own, so it may wait.
    assert.is_true(parkable)
    h:stop()
  end))

  it("runs every handler for one signal", helpers.async(function()
    local seen = {}
    local got = core.waiter()
    local function handler(tag)
      return function()
        seen[#seen + 1] = tag
        if #seen == 2 then
          got:wake(true)
        end
      end
    end
    local a = signal.on("USR1", handler("a"))
    local b = signal.on(signal.number("SIGUSR1"), handler("b"))
    assert.is_true(proc.kill(proc.getpid(), "USR1"))
    assert.is_true(got:wait(10))
    table.sort(seen)
    assert.same({ "a", "b" }, seen)
    a:stop()
    b:stop()
  end))

  it("stops calling a stopped handler", helpers.async(function()
    local calls = 0
    local got = core.waiter()
    local stopped = signal.on("USR2", function() calls = calls + 1 end)
    local active = signal.on("USR2", function() got:wake(true) end)
    stopped:stop()
    stopped:stop()
    assert.is_true(proc.kill(proc.getpid(), "USR2"))
    assert.is_true(got:wait(10))
    assert.equal(0, calls)
    active:stop()
  end))

  it("maps names and numbers", function()
    assert.equal(15, signal.number("SIGTERM"))
    assert.equal(15, signal.number("term"))
    assert.equal("SIGHUP", signal.name(1))
    assert.is_nil(signal.number("SIGNOPE"))
    assert.is_nil(signal.name(0))
  end)

  it("rejects signals that cannot be handled", function()
    assert.has_error(function() signal.on("SIGKILL", print) end)
    assert.has_error(function() signal.on("SIGSTOP", print) end)
    assert.has_error(function() signal.on("SIGPIPE", print) end)
    assert.has_error(function() signal.on("SIGNOPE", print) end)
    assert.has_error(function() signal.on(0, print) end)
    assert.has_error(function() signal.on("SIGHUP") end)
  end)
end)
