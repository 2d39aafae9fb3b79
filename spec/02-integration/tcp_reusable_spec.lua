-- sock:reusable(), the check the proxy's upstream pool makes before it
-- sends a request on an idle connection. A peer that closed, reset or
-- sent bytes no request asked for makes a connection unusable.
local core = require("justavps.core")
local helpers = require("support.helpers")

local async = helpers.async


-- Starts a listener whose connections run behave(sock), and returns a
-- client socket connected to it.
local function pair(behave)
  local listener = assert(core.tcp.listen({ host = "127.0.0.1", port = 0,
    on_accept = behave }))
  local sock = assert(core.tcp.connect("127.0.0.1", listener:port()))
  return sock, listener
end


-- Polls sock:reusable(ask_kernel) until it equals want, for up to 5 s.
local function settles(sock, want, ask_kernel)
  for _ = 1, 100 do
    if sock:reusable(ask_kernel) == want then
      return true
    end
    core.sleep(0.05)
  end
  return false
end


describe("sock:reusable", function()
  it("is true for a quiet open connection", async(function()
    local hold = core.waiter()
    local sock, listener = pair(function(s)
      hold:wait(5)
      s:close()
    end)
    core.sleep(0.1)
    assert.is_true(sock:reusable())
    hold:wake()
    sock:close()
    listener:close()
  end))

  it("is false once the peer closed", async(function()
    local sock, listener = pair(function(s)
      s:close()
    end)
    assert.is_true(settles(sock, false))
    sock:close()
    listener:close()
  end))

  it("is false when the peer sent unasked bytes", async(function()
    local hold = core.waiter()
    local sock, listener = pair(function(s)
      s:write("HTTP/1.1 408 Request Timeout\r\n\r\n")
      hold:wait(5)
      s:close()
    end)
    assert.is_true(settles(sock, false))
    hold:wake()
    sock:close()
    listener:close()
  end))

  describe("with ask_kernel false", function()
    -- A pooled socket has read its response, so it keeps reading and the
    -- loop records a close the next time it polls.
    local function read_pair()
      local accepted
      local sock, listener = pair(function(s)
        accepted = s
        s:write("hi")
        core.sleep(5)
      end)
      assert.equal("hi", sock:readn(2))
      return sock, listener, accepted
    end

    -- Spins without letting the event loop poll.
    local function spin(seconds)
      local stop = os.clock() + seconds
      while os.clock() < stop do end
    end

    it("is false once the loop saw the peer close", async(function()
      local sock, listener, accepted = read_pair()
      accepted:close()
      assert.is_true(settles(sock, false, false))
      sock:close()
      listener:close()
    end))

    it("skips the kernel check for a close the loop has not seen",
      async(function()
        local sock, listener, accepted = read_pair()
        accepted:close()
        spin(0.05)
        assert.is_true(sock:reusable(false))
        assert.is_false(sock:reusable())
        sock:close()
        listener:close()
      end))
  end)

  it("is false after close", async(function()
    local sock, listener = pair(function(s)
      core.sleep(1)
      s:close()
    end)
    sock:close()
    assert.is_false(sock:reusable())
    listener:close()
  end))
end)
