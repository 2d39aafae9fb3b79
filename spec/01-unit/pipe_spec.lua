-- core.ws.pipe: a bidirectional byte pipe between two sockets, over real
-- sockets on loopback.
local core = require("justavps.core")
local helpers = require("spec.support.helpers")
local sockets = require("spec.support.sockets")

local pipe = core.ws.pipe
local async = helpers.async

local MiB = 1024 * 1024

local under_asan = (os.getenv("LD_PRELOAD") or ""):find("libasan") ~= nil


-- Returns two connected sockets: the accepted one and the dialed one.
local function socket_pair()
  local client, accepted = sockets.pair(10)
  return accepted, client
end


-- Builds client <-> [a pipe b] <-> far: returns the client end, the two
-- piped sockets and the far end.
local function piped_chain()
  local a, client = socket_pair()
  local far, b = socket_pair()
  return client, a, b, far
end


local function start_pipe(a, b, opts)
  return sockets.start_pipe(a, b, opts, pipe)
end


local function wait_pipe(result)
  return result.wait(10)
end


-- Reads until end of stream and returns everything read.
local function read_all(sock)
  local parts = {}
  while true do
    local data, _, code = sock:read()
    if not data then
      assert.equal("closed", code)
      return table.concat(parts)
    end
    parts[#parts + 1] = data
  end
end


local function rss_kib()
  local f = assert(io.open("/proc/self/status"))
  local status = f:read("*a")
  f:close()
  return tonumber(status:match("VmRSS:%s*(%d+)"))
end


describe("core.ws.pipe", function()
  it("echoes through the pipe", async(function()
    local client, a, b, far = piped_chain()
    local result = start_pipe(a, b)

    core.spawn(function()
      while true do
        local data = far:read()
        if not data then
          break
        end
        far:write(data)
      end
      far:shutdown()
    end)

    assert(client:write("hello"))
    assert.equal("hello", client:readn(5))
    assert(client:write(" world"))
    assert.equal(" world", client:readn(6))

    client:shutdown()
    assert.equal("", read_all(client))

    local values = wait_pipe(result)
    assert.equal(11, values[1])
    assert.equal(11, values[2])
    client:close()
    far:close()
  end))

  it("propagates a half-close", async(function()
    local client, a, b, far = piped_chain()
    local result = start_pipe(a, b)

    assert(client:write("request"))
    assert(client:shutdown())

    -- far reads the request and then end of stream, yet can still reply.
    assert.equal("request", read_all(far))
    assert(far:write("late reply"))
    assert(far:shutdown())

    assert.equal("late reply", read_all(client))
    local values = wait_pipe(result)
    assert.equal(7, values[1])
    assert.equal(10, values[2])
    client:close()
    far:close()
  end))

  it("ends when a piped socket is closed", async(function()
    local client, a, b, far = piped_chain()
    local result = start_pipe(a, b)

    assert(client:write("x"))
    assert.equal("x", far:readn(1))
    a:close()

    local values = wait_pipe(result)
    assert.is_nil(values[1])
    assert.equal("closed", values[3])
    assert.is_true(b:closed())
    client:close()
    far:close()
  end))

  it("forwards buffered bytes first", async(function()
    local client, a, b, far = piped_chain()

    -- One write: the head and what follows it arrive in one read, so
    -- "early" waits in a's buffer as after an HTTP upgrade.
    assert(client:write("HEAD\nearly"))
    assert.equal("HEAD", a:readuntil("\n"))
    assert.equal(5, a:buffered())

    local result = start_pipe(a, b)
    assert.equal("early", far:readn(5))
    assert(client:write("later"))
    assert.equal("later", far:readn(5))

    client:shutdown()
    far:shutdown()
    local values = wait_pipe(result)
    assert.equal(10, values[1])
    assert.equal(0, values[2])
    client:close()
    far:close()
  end))

  it("moves 64 MiB with bounded memory", async(function()
    local client, a, b, far = piped_chain()
    local result = start_pipe(a, b)
    local total = 64 * MiB
    local chunk = ("0123456789abcdef"):rep(MiB / 16)

    core.spawn(function()
      for _ = 1, total / #chunk do
        assert(client:write(chunk))
      end
      client:shutdown()
    end)

    collectgarbage()
    local base = rss_kib()
    local peak = base
    local received = 0

    -- Read a little, then stall: without backpressure the pipe would
    -- queue everything the writer sends during the stall.
    received = received + #far:readn(MiB)
    core.sleep(0.3)

    -- During the stall the pipe stops reading once b has 256 KiB queued;
    -- one more read of at most 64 KiB may land on top.
    assert.is_true(b:queued() <= 320 * 1024,
                   "b has " .. b:queued() .. " bytes queued")

    while true do
      local data = far:read(256 * 1024)
      if not data then
        break
      end
      received = received + #data
      if received % (8 * MiB) < #data then
        collectgarbage()
        local now = rss_kib()
        if now > peak then
          peak = now
        end
      end
    end

    assert.equal(total, received)
    -- The bound is an estimate: socket buffers, two high-water queues and
    -- Lua garbage stay far below the 64 MiB that buffering everything
    -- would cost. AddressSanitizer keeps freed blocks in quarantine, so
    -- RSS says nothing about live memory there.
    if not under_asan then
      assert.is_true(peak - base < 32 * 1024,
                     "RSS grew by " .. (peak - base) .. " KiB")
    end

    far:shutdown()
    local values = wait_pipe(result)
    assert.equal(total, values[1])
    assert.equal(0, values[2])
    client:close()
    far:close()
  end, 60))

  it("closes both sides after idle_timeout", async(function()
    local client, a, b, far = piped_chain()
    local values = { pipe(a, b, { idle_timeout = 0.1 }) }

    assert.is_nil(values[1])
    assert.is_string(values[2])
    assert.equal("timeout", values[3])
    assert.equal(0, values[4])
    assert.equal(0, values[5])
    assert.is_true(a:closed())
    assert.is_true(b:closed())

    local data, _, code = client:read()
    assert.is_nil(data)
    assert.equal("closed", code)
    data, _, code = far:read()
    assert.is_nil(data)
    assert.equal("closed", code)
  end))

  it("returns sockets at end of stream", async(function()
    local client, a, b, far = piped_chain()
    local result = start_pipe(a, b)
    client:shutdown()
    far:shutdown()
    wait_pipe(result)

    -- The socket methods work again: reads report the end of stream, and
    -- writes fail because the pipe shut down both write halves.
    for _, sock in ipairs({ a, b }) do
      local data, _, code = sock:read()
      assert.is_nil(data)
      assert.equal("closed", code)
      local ok = sock:write("x")
      assert.is_nil(ok)
    end
    client:close()
    far:close()
    a:close()
    b:close()
  end))

  it("raises on the same socket twice", async(function()
    local a, client = socket_pair()
    assert.has_error(function()
      pipe(a, a)
    end)
    a:close()
    client:close()
  end))

  it("raises on a socket with a parked reader", async(function()
    local client, a, b, far = piped_chain()
    core.spawn(function()
      a:read()
    end)
    local ok, err = pcall(pipe, a, b)
    assert.is_false(ok)
    assert.matches("parked", err)
    client:close()
    far:close()
    a:close()
    b:close()
  end))

  it("raises outside a core coroutine", function()
    local a, client
    helpers.run(function()
      a, client = socket_pair()
    end)
    assert.has_error(function()
      pipe(a, client)
    end)
    a:close()
    client:close()
  end)
end)
