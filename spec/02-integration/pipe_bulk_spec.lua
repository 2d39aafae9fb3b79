-- core.pipe with bulk traffic over real loopback sockets: large transfers
-- both ways, half-close, a reset, backpressure, buffered bytes, the idle
-- timeout and WebSocket pings between large frames. Every transfer is
-- checked by length and SHA-256.
local core = require("justavps.core")
local helpers = require("support.helpers")
local sockets = require("support.sockets")

local async = helpers.async
local crypto = core.crypto

local KiB = 1024
local MiB = 1024 * KiB

local under_asan = (os.getenv("LD_PRELOAD") or ""):find("libasan") ~= nil


-- Builds client <-> [a pipe b] <-> far.
local function piped_chain()
  local client, a = sockets.pair(20)
  local b, far = sockets.pair(20)
  return client, a, b, far
end


local start_pipe = sockets.start_pipe


-- Returns a deterministic block of n bytes that differs per seed.
local function pattern(n, seed)
  local unit = {}
  for i = 1, 256 do
    unit[i] = string.char((i * 7 + seed * 13) % 256)
  end
  local block = table.concat(unit)
  return block:rep(math.ceil(n / #block)):sub(1, n)
end


local function sha256_hex(data)
  return crypto.hex_encode(crypto.sha256(data))
end


-- Writes total bytes in chunks of pattern(chunk, seed), then shuts down
-- the write half. Returns the hex SHA-256 of what it wrote.
local function send_stream(sock, total, chunk, seed)
  local data = pattern(chunk, seed)
  local digest = crypto.sha256_new()
  local sent = 0
  while sent < total do
    local piece = data
    if total - sent < #piece then
      piece = piece:sub(1, total - sent)
    end
    assert(sock:write(piece))
    digest:update(piece)
    sent = sent + #piece
  end
  assert(sock:shutdown())
  return crypto.hex_encode(digest:final())
end


-- Reads sock to end of stream and returns the byte count and the hex
-- SHA-256 of what arrived.
local function receive_stream(sock)
  local digest = crypto.sha256_new()
  local count = 0
  while true do
    local data, _, code = sock:read(256 * KiB)
    if not data then
      assert.equal("closed", code)
      break
    end
    digest:update(data)
    count = count + #data
  end
  return count, crypto.hex_encode(digest:final())
end


local function rss_kib()
  local f = assert(io.open("/proc/self/status"))
  local status = f:read("*a")
  f:close()
  return tonumber(status:match("VmRSS:%s*(%d+)"))
end


-- Returns a WebSocket frame: FIN, opcode, length and, with mask, the key
-- 1 2 3 4. The payload goes unmasked, because the pipe never unmasks.
local function frame(opcode, payload, mask)
  local n = #payload
  local head = string.char(0x80 + opcode)
  local bit7 = mask and 0x80 or 0
  if n < 126 then
    head = head .. string.char(bit7 + n)
  elseif n < 65536 then
    head = head .. string.char(bit7 + 126, math.floor(n / 256), n % 256)
  else
    local bytes = {}
    local rest = n
    for i = 8, 1, -1 do
      bytes[i] = string.char(rest % 256)
      rest = math.floor(rest / 256)
    end
    head = head .. string.char(bit7 + 127) .. table.concat(bytes)
  end
  if mask then
    head = head .. "\1\2\3\4"
  end
  return head .. payload
end


-- Reads what arrives on sock within seconds, as one string, and sets the
-- socket's timeout back to 20 s.
local function read_for(sock, seconds)
  local data = sockets.read_for(sock, seconds)
  sock:settimeout(20)
  return data
end


describe("core.pipe bulk", function()
  for _, ping in ipairs({ false, true }) do
    local opts = nil
    local label = "raw"
    if ping then
      -- Frame tracking on, over bytes that are not WebSocket frames: the
      -- tracker must never alter them, and 30 s never passes here.
      opts = { ws_ping_interval = 30 }
      label = "with ws_ping_interval"
    end

    it("moves 24 MiB both ways, " .. label, async(function()
      local client, a, b, far = piped_chain()
      local result = start_pipe(a, b, opts)
      local total = 24 * MiB
      local up_sum, down_sum

      core.spawn(function()
        up_sum = send_stream(client, total, 61 * KiB + 3, 1)
      end)
      core.spawn(function()
        down_sum = send_stream(far, total, 97 * KiB + 5, 2)
      end)

      local got_down = {}
      local down_done = core.waiter()
      core.spawn(function()
        got_down.count, got_down.sum = receive_stream(client)
        down_done:wake()
      end)
      local up_count, up_got = receive_stream(far)
      if not got_down.count then
        down_done:wait(30)
      end

      assert.equal(total, up_count)
      assert.equal(up_sum, up_got)
      assert.equal(total, got_down.count)
      assert.equal(down_sum, got_down.sum)

      local values = result.wait()
      assert.equal(total, values[1])
      assert.equal(total, values[2])
      client:close()
      far:close()
      a:close()
      b:close()
    end, 60))
  end

  it("propagates a half-close", async(function()
    local client, a, b, far = piped_chain()
    local result = start_pipe(a, b)
    local request = pattern(3 * MiB, 3)

    core.spawn(function()
      assert(client:write(request))
      assert(client:shutdown())
    end)

    -- far reads the request and then end of stream, yet can still reply.
    local count, sum = receive_stream(far)
    assert.equal(#request, count)
    assert.equal(sha256_hex(request), sum)
    local reply = pattern(2 * MiB, 4)
    core.spawn(function()
      assert(far:write(reply))
      assert(far:shutdown())
    end)

    count, sum = receive_stream(client)
    assert.equal(#reply, count)
    assert.equal(sha256_hex(reply), sum)

    local values = result.wait()
    assert.equal(#request, values[1])
    assert.equal(#reply, values[2])
    client:close()
    far:close()
    a:close()
    b:close()
  end, 30))

  it("fails on a peer reset mid-transfer", async(function()
    local client, a, b, far = piped_chain()
    local result = start_pipe(a, b)

    -- far reads a little and closes with unread bytes, which resets the
    -- connection to b while the pipe is still writing to it.
    core.spawn(function()
      local chunk = pattern(256 * KiB, 5)
      for _ = 1, 64 do
        if not client:write(chunk) then
          break
        end
      end
    end)
    assert(far:readn(64 * KiB))
    far:close()

    local values = result.wait()
    assert.is_nil(values[1])
    assert.matches("pipe failed writing to b", values[2])
    assert.is_true(values[3] == "ECONNRESET" or values[3] == "EPIPE",
                   "code " .. tostring(values[3]))
    assert.is_true(values[4] >= 64 * KiB)
    assert.is_true(a:closed())
    assert.is_true(b:closed())
    client:close()
  end, 30))

  it("keeps memory bounded for a slow reader", async(function()
    local client, a, b, far = piped_chain()
    local result = start_pipe(a, b)
    local total = 64 * MiB
    local chunk = pattern(MiB, 6)

    core.spawn(function()
      for _ = 1, total / #chunk do
        assert(client:write(chunk))
      end
      client:shutdown()
    end)

    collectgarbage()
    local base = rss_kib()
    local peak = base
    local received = #far:readn(MiB)
    -- The stall: without backpressure the pipe would take in everything
    -- the writer sends meanwhile.
    core.sleep(0.3)
    -- The pipe stops reading once b has 256 KiB queued; one more read of
    -- at most 64 KiB may land on top.
    assert.is_true(b:queued() <= 320 * KiB,
                   "b has " .. b:queued() .. " bytes queued")

    while true do
      local data = far:read(64 * KiB)
      if not data then
        break
      end
      received = received + #data
      if received % (4 * MiB) < #data then
        collectgarbage()
        peak = math.max(peak, rss_kib())
        core.sleep(0.01)
      end
    end

    assert.equal(total, received)
    -- An estimate, far below the 64 MiB that buffering everything costs:
    -- one write queue at the high-water mark plus one read, and Lua
    -- garbage. AddressSanitizer's quarantine makes RSS meaningless.
    if not under_asan then
      assert.is_true(peak - base < 16 * 1024,
                     "RSS grew by " .. (peak - base) .. " KiB")
    end

    far:shutdown()
    local values = result.wait()
    assert.equal(total, values[1])
    client:close()
    far:close()
    a:close()
    b:close()
  end, 60))

  it("forwards buffered bytes first", async(function()
    local client, a, b, far = piped_chain()
    local bulk = pattern(4 * MiB, 7)

    assert(client:write("HEAD\nearly"))
    assert.equal("HEAD", a:readuntil("\n"))
    assert.equal(5, a:buffered())

    local result = start_pipe(a, b)
    core.spawn(function()
      assert(client:write(bulk))
      assert(client:shutdown())
    end)
    assert.equal("early", far:readn(5))
    local count, sum = receive_stream(far)
    assert.equal(#bulk, count)
    assert.equal(sha256_hex(bulk), sum)

    far:shutdown()
    local values = result.wait()
    assert.equal(5 + #bulk, values[1])
    assert.equal(0, values[2])
    client:close()
    far:close()
    a:close()
    b:close()
  end, 30))

  it("times out when idle", async(function()
    local client, a, b, far = piped_chain()
    assert(client:write(pattern(MiB, 8)))
    local result = start_pipe(a, b, { idle_timeout = 0.2 })
    assert.equal(MiB, #far:readn(MiB))

    local values = result.wait()
    assert.is_nil(values[1])
    assert.equal("timeout", values[3])
    assert.equal(MiB, values[4])
    assert.is_true(a:closed())
    assert.is_true(b:closed())
    local data, _, code = client:read()
    assert.is_nil(data)
    assert.equal("closed", code)
    far:close()
  end, 30))

  it("pings only between large frames", async(function()
    local interval = 0.3
    local client, a, b, server = piped_chain()
    local result = start_pipe(a, b, { ws_ping_interval = interval })

    -- Large frames each way, longer than one read of the pipe.
    local up = {}
    for i = 1, 6 do
      up[i] = frame(0x2, pattern(100 * KiB + i, 10 + i), true)
    end
    local down = frame(0x2, pattern(300 * KiB, 20), false)
    core.spawn(function()
      assert(client:write(table.concat(up)))
      assert(server:write(down))
    end)
    local up_all = table.concat(up)
    assert.equal(sha256_hex(up_all),
                 sha256_hex(server:readn(#up_all)))
    assert.equal(sha256_hex(down),
                 sha256_hex(client:readn(#down)))

    -- Stop inside a large frame: nothing may be added toward the server.
    local big = frame(0x2, pattern(200 * KiB, 30), true)
    local cut = 120 * KiB
    assert(client:write(big:sub(1, cut)))
    local seen = server:readn(cut)
    assert.equal(sha256_hex(big:sub(1, cut)), sha256_hex(seen))
    assert.equal("", read_for(server, interval * 2.5))

    -- The rest of the frame, then a masked ping follows it.
    assert(client:write(big:sub(cut + 1)))
    local rest = server:readn(#big - cut)
    assert.equal(sha256_hex(big:sub(cut + 1)),
                 sha256_hex(rest))
    local after = read_for(server, interval * 2.5)
    assert.equal("\137\128", after:sub(1, 2))
    assert.equal(0, #after % 6)
    -- Toward the client, unmasked pings.
    local to_client = read_for(client, 0.1)
    assert.equal("\137\0", to_client:sub(1, 2))

    client:shutdown()
    server:shutdown()
    local values = result.wait()
    assert.equal(#up_all + #big, values[1])
    assert.equal(#down, values[2])
    client:close()
    server:close()
    a:close()
    b:close()
  end, 30))
end)
