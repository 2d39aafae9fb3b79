-- core.pipe with ws_ping_interval: the pipe follows WebSocket frame
-- boundaries and, after a silence, pings each end that is between frames,
-- masked toward b (the server side) and unmasked toward a.
local core = require("justavps.core")
local helpers = require("support.helpers")
local sockets = require("support.sockets")

local async = helpers.async

local INTERVAL = 0.3


-- Returns two connected sockets: the client's end and the end the
-- listener accepted.
local socket_pair = sockets.pair


local read_for = sockets.read_for


-- A masked client frame with opcode and payload (mask key 1 2 3 4).
local function masked(opcode, payload)
  local key = { 1, 2, 3, 4 }
  local out = {}
  for i = 1, #payload do
    out[i] = string.char(bit.bxor(payload:byte(i), key[(i - 1) % 4 + 1]))
  end
  return string.char(0x80 + opcode, 0x80 + #payload, 1, 2, 3, 4)
    .. table.concat(out)
end


describe("core.pipe ws_ping_interval", function()
  local client, server, done

  before_each(function()
    helpers.run(function()
      local a
      client, a = socket_pair()
      local b
      b, server = socket_pair()
      done = false
      core.spawn(function()
        core.pipe(a, b, { ws_ping_interval = INTERVAL })
        done = true
      end)
    end)
  end)

  after_each(function()
    helpers.run(function()
      client:close()
      server:close()
    end)
  end)

  it("pings both ends after a silence", async(function()
    local frame = masked(0x1, "hi")
    assert(client:write(frame))
    assert.equal(frame, server:readn(#frame))

    local to_server = read_for(server, INTERVAL * 2.5)
    local to_client = read_for(client, 0.1)
    -- Toward the server: FIN + ping, the mask bit, four key bytes, once
    -- or more (one ping per interval).
    assert.equal("\137\128", to_server:sub(1, 2))
    assert.equal(0, #to_server % 6)
    -- Toward the client: an unmasked empty ping.
    assert.equal("\137\0", to_client:sub(1, 2))
    assert.is_false(done)
  end, 10))

  it("waits for a frame to end before pinging", async(function()
    local frame = masked(0x2, "0123456789")
    local head, rest = frame:sub(1, 4), frame:sub(5)
    assert(client:write(head))
    -- Inside the frame nothing may be added toward the server.
    local seen = read_for(server, INTERVAL * 2.5)
    assert.equal(head, seen)
    assert(client:write(rest))
    assert.equal(rest, server:readn(#rest))
    local after = read_for(server, INTERVAL * 2.5)
    assert.equal("\137\128", after:sub(1, 2))
  end, 10))

  it("keeps a half-closed pipe open", async(function()
    local frame = masked(0x1, "hi")
    assert(client:write(frame))
    assert.equal(frame, server:readn(#frame))
    -- The client's end of stream shuts the write half toward the server,
    -- so the pings that follow go only toward the client.
    assert(client:shutdown())
    core.sleep(INTERVAL * 2.5)
    local data, _, code = server:read()
    assert.is_nil(data)
    assert.equal("closed", code)
    assert.is_false(done)

    local reply = "\130\5hello"
    assert(server:write(reply))
    local got = read_for(client, INTERVAL * 0.5)
    assert.equal(reply, got:sub(-#reply))
    assert.equal("\137\0", got:sub(1, 2))
  end, 10))

  it("sends nothing after a close frame", async(function()
    local close = masked(0x8, "\3\232")
    assert(client:write(close))
    assert.equal(close, server:readn(#close))
    assert.equal("", read_for(server, INTERVAL * 2.5))
  end, 10))
end)
