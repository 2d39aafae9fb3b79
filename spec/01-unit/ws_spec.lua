-- core.ws and justavps.websocket: handshake, framing, limits and closing,
-- over real sockets on loopback.
local core = require("justavps.core")
local websocket = require("justavps.websocket")
local helpers = require("spec.support.helpers")

local ws = core.ws
local async = helpers.async

local RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
local RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


-- Returns two connected sockets: the accepted one and the dialed one.
local function socket_pair()
  local accepted
  local w = core.waiter()
  local listener = assert(core.tcp.listen({
    host = "127.0.0.1",
    port = 0,
    on_accept = function(sock)
      accepted = sock
      w:wake()
    end,
  }))
  local client = assert(core.tcp.connect("127.0.0.1", listener:port()))
  if not accepted then
    w:wait(5)
  end
  listener:close()
  assert(accepted, "no connection accepted")
  return accepted, client
end


-- Returns wrapped server and client connections over a socket pair.
local function ws_pair(server_opts, client_opts)
  local s, c = socket_pair()
  server_opts = server_opts or {}
  client_opts = client_opts or {}
  server_opts.role = "server"
  client_opts.role = "client"
  s:settimeout(5)
  c:settimeout(5)
  return websocket.wrap(s, server_opts), websocket.wrap(c, client_opts), s, c
end


local function valid_headers()
  return {
    Host = "example.test",
    Upgrade = "websocket",
    Connection = "keep-alive, Upgrade",
    ["Sec-WebSocket-Version"] = "13",
    ["Sec-WebSocket-Key"] = RFC_KEY,
  }
end


-- Parses a request head into a method and a table of lower-case headers.
local function parse_head(head)
  local method = head:match("^(%u+) ")
  local headers = {}
  for name, value in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do
    headers[name:lower()] = value
  end
  return method, headers
end


describe("core.ws handshake", function()
  it("accept_key matches the RFC 6455 example", function()
    assert.equal(RFC_ACCEPT, ws.accept_key(RFC_KEY))
  end)

  it("check_request accepts a valid upgrade", function()
    local ok, key = ws.check_request("GET", valid_headers())
    assert.is_true(ok)
    assert.equal(RFC_KEY, key)
  end)

  it("check_request reads headers through a function", function()
    local h = valid_headers()
    local lower = {}
    for k, v in pairs(h) do
      lower[k:lower()] = v
    end
    local ok = ws.check_request("GET", function(name)
      return lower[name:lower()]
    end)
    assert.is_true(ok)
  end)

  it("check_request joins repeated headers", function()
    local h = valid_headers()
    h.Connection = { "keep-alive", "Upgrade" }
    assert.is_true((ws.check_request("GET", h)))
  end)

  local rejects = {
    { "POST method", "POST", {}, "bad_method", 400 },
    { "missing Upgrade", "GET", { Upgrade = false }, "bad_upgrade", 400 },
    { "Upgrade h2c", "GET", { Upgrade = "h2c" }, "bad_upgrade", 400 },
    { "Connection close", "GET", { Connection = "close" }, "bad_upgrade",
      400 },
    { "version 8", "GET", { ["Sec-WebSocket-Version"] = "8" },
      "unsupported_version", 426 },
    { "missing version", "GET", { ["Sec-WebSocket-Version"] = false },
      "unsupported_version", 426 },
    { "missing key", "GET", { ["Sec-WebSocket-Key"] = false }, "bad_key",
      400 },
    { "key of 15 bytes", "GET",
      { ["Sec-WebSocket-Key"] = "AAAAAAAAAAAAAAAAAAAA" }, "bad_key", 400 },
    { "key with bad characters", "GET",
      { ["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25j*Q==" }, "bad_key",
      400 },
  }

  for _, case in ipairs(rejects) do
    it("check_request rejects " .. case[1], function()
      local h = valid_headers()
      for k, v in pairs(case[3]) do
        h[k] = v or nil
      end
      local ok, message, code, status = ws.check_request(case[2], h)
      assert.is_nil(ok)
      assert.is_string(message)
      assert.equal(case[4], code)
      assert.equal(case[5], status)
    end)
  end

  it("server_handshake raises on a header with CRLF", async(function()
    local s, c = socket_pair()
    local ok, err = pcall(ws.server_handshake, s, RFC_KEY,
                          { ["X-Bad"] = "a\r\nb" })
    assert.is_false(ok)
    assert.matches("must not contain CR, LF or NUL", err)
    s:close()
    c:close()
  end))

  it("client and server complete the handshake", async(function()
    local s, c = socket_pair()
    s:settimeout(5)
    c:settimeout(5)

    core.spawn(function()
      local head = assert(s:readuntil("\r\n\r\n"))
      local method, headers = parse_head(head)
      local ok, key = ws.check_request(method, headers)
      assert(ok, key)
      assert(headers.origin == "http://example.test")
      assert(headers["x-extra"] == "1")
      -- The 101 and a first frame arrive together: the frame must stay
      -- in the client's socket buffer.
      assert(ws.server_handshake(s, key, { ["X-Server"] = "yes" }))
      assert(s:write(ws.encode_frame("text", "first")))
    end)

    local ok, headers = ws.client_handshake(c, {
      host = "example.test",
      path = "/_pty?session=1",
      origin = "http://example.test",
      headers = { ["X-Extra"] = "1" },
    })
    assert.is_true(ok)
    assert.equal("yes", headers["x-server"])

    local conn = websocket.wrap(c, { role = "client" })
    local data, kind = conn:recv()
    assert.equal("first", data)
    assert.equal("text", kind)
    s:close()
    c:close()
  end))

  local bad_responses = {
    { "a 200", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "bad_status" },
    { "a wrong accept", "HTTP/1.1 101 Switching Protocols\r\n"
      .. "Upgrade: websocket\r\nConnection: Upgrade\r\n"
      .. "Sec-WebSocket-Accept: " .. RFC_ACCEPT .. "\r\n\r\n", "bad_accept" },
    { "a missing Upgrade", "HTTP/1.1 101 Switching Protocols\r\n"
      .. "Connection: Upgrade\r\n\r\n", "bad_upgrade" },
    { "garbage", "hello\r\n\r\n", "bad_status" },
  }

  for _, case in ipairs(bad_responses) do
    it("client_handshake rejects " .. case[1], async(function()
      local s, c = socket_pair()
      c:settimeout(5)
      core.spawn(function()
        s:readuntil("\r\n\r\n")
        s:write(case[2])
      end)
      local ok, message, code = ws.client_handshake(c, { host = "h" })
      assert.is_nil(ok)
      assert.is_string(message)
      assert.equal(case[3], code)
      s:close()
      c:close()
    end))
  end

  it("client_handshake bounds the response head", async(function()
    local s, c = socket_pair()
    c:settimeout(5)
    core.spawn(function()
      s:readuntil("\r\n\r\n")
      s:write("HTTP/1.1 101 OK\r\nX-Pad: " .. ("a"):rep(20000) .. "\r\n\r\n")
    end)
    local ok, _, code = ws.client_handshake(c, { host = "h" })
    assert.is_nil(ok)
    assert.equal("too_large", code)
    s:close()
    c:close()
  end))
end)


describe("core.ws parser", function()
  it("parses input fed one byte at a time", function()
    local p = ws.parser({ role = "server" })
    local wire = ws.encode_frame("text", "héllo", false, true)
      .. ws.encode_frame("ping", "p", true, true)
      .. ws.encode_frame("continuation", " world", true, true)
    local events = {}
    for i = 1, #wire do
      p:feed(wire:sub(i, i))
      while true do
        local data, kind = p:next()
        if data == nil then
          assert.is_nil(kind)
          break
        end
        events[#events + 1] = kind .. ":" .. data
      end
    end
    assert.same({ "ping:p", "text:héllo world" }, events)
  end)

  it("returns several messages from one input", function()
    local p = ws.parser({ role = "client" })
    p:feed(ws.encode_frame("text", "a") .. ws.encode_frame("binary", "b"))
    local d1, k1 = p:next()
    local d2, k2 = p:next()
    assert.equal("a", d1)
    assert.equal("text", k1)
    assert.equal("b", d2)
    assert.equal("binary", k2)
    assert.is_nil(p:next())
  end)

  it("keeps a violation sticky", function()
    local p = ws.parser({ role = "server" })
    p:feed(ws.encode_frame("text", "x"))
    local _, _, code1 = p:next()
    p:feed(ws.encode_frame("text", "y", true, true))
    local _, _, code2, close_code = p:next()
    assert.equal("protocol_error", code1)
    assert.equal("protocol_error", code2)
    assert.equal(1002, close_code)
  end)

  local violations = {
    { "a continuation without a message",
      ws.encode_frame("continuation", "x", true, true), 1002 },
    { "a new message inside a fragmented one",
      ws.encode_frame("text", "a", false, true)
      .. ws.encode_frame("text", "b", true, true), 1002 },
    { "RSV1 set", string.char(0xC1, 0x80, 0, 0, 0, 0), 1002 },
    { "reserved opcode 3", string.char(0x83, 0x80, 0, 0, 0, 0), 1002 },
    { "reserved opcode 11", string.char(0x8B, 0x80, 0, 0, 0, 0), 1002 },
    { "a fragmented ping", string.char(0x09, 0x80, 0, 0, 0, 0), 1002 },
    { "a 126-byte ping",
      string.char(0x89, 0xFE, 0, 126, 0, 0, 0, 0) .. ("a"):rep(126), 1002 },
    { "a 1-byte close payload",
      string.char(0x88, 0x81, 0, 0, 0, 0, 3), 1002 },
    { "close code 1005", ws.encode_frame("close", "\3\237", true, true),
      1002 },
    { "close code 999", ws.encode_frame("close", "\3\231", true, true), 1002 },
    { "a close reason in invalid UTF-8",
      ws.encode_frame("close", "\3\232\255", true, true), 1007 },
    { "text ending inside a UTF-8 sequence",
      ws.encode_frame("text", "\195", true, true), 1007 },
    { "a UTF-16 surrogate", ws.encode_frame("text", "\237\160\128", true,
                                            true), 1007 },
    { "an overlong encoding", ws.encode_frame("text", "\192\175", true,
                                              true), 1007 },
    { "a frame over max_frame",
      ws.encode_frame("binary", ("a"):rep(101), true, true), 1009 },
  }

  for _, case in ipairs(violations) do
    it("rejects " .. case[1], function()
      local p = ws.parser({ role = "server", max_frame = 100 })
      p:feed(case[2])
      local data, message, _, close_code
      repeat
        data, message, _, close_code = p:next()
      until data == nil
      assert.is_string(message)
      assert.equal(case[3], close_code)
    end)
  end

  it("accepts UTF-8 split across fragments", function()
    local p = ws.parser({ role = "server" })
    p:feed(ws.encode_frame("text", "\195", false, true)
      .. ws.encode_frame("continuation", "\169", true, true))
    local data, kind = p:next()
    assert.equal("é", data)
    assert.equal("text", kind)
  end)

  it("fails invalid UTF-8 before the message ends", function()
    local p = ws.parser({ role = "server" })
    p:feed(ws.encode_frame("text", "ok\255", false, true))
    local data, _, code, close_code = p:next()
    assert.is_nil(data)
    assert.equal("invalid_payload", code)
    assert.equal(1007, close_code)
  end)

  it("checks max_message across fragments", function()
    local p = ws.parser({ role = "server", max_message = 10 })
    p:feed(ws.encode_frame("binary", ("a"):rep(6), false, true)
      .. ws.encode_frame("continuation", ("a"):rep(6), true, true))
    local data, _, code, close_code = p:next()
    assert.is_nil(data)
    assert.equal("too_large", code)
    assert.equal(1009, close_code)
  end)

  it("raises on an unknown role", function()
    assert.has_error(function()
      ws.parser({ role = "proxy" })
    end)
  end)
end)


describe("core.ws encoding", function()
  local lengths = { 0, 125, 126, 65535, 65536 }

  for _, n in ipairs(lengths) do
    it("frame_header encodes length " .. n, function()
      local h = ws.frame_header("binary", n)
      local expected = n < 126 and 2 or n < 65536 and 4 or 10
      assert.equal(expected, #h)
      assert.equal(0x82, h:byte(1))
    end)
  end

  it("encode_frame masks with a fresh key", function()
    local a = ws.encode_frame("binary", ("x"):rep(32), true, true)
    local b = ws.encode_frame("binary", ("x"):rep(32), true, true)
    assert.equal(2 + 4 + 32, #a)
    assert.not_equal(a, b)
  end)

  it("encode_frame raises on an oversized ping", function()
    assert.has_error(function()
      ws.encode_frame("ping", ("a"):rep(126))
    end)
  end)

  it("encode_frame raises on a fragmented close", function()
    assert.has_error(function()
      ws.encode_frame("close", "", false)
    end)
  end)

  for _, code in ipairs({ 999, 1004, 1005, 1006, 1015, 2000, 5000 }) do
    it("close_frame raises on code " .. code, function()
      assert.has_error(function()
        ws.close_frame(code)
      end)
    end)
  end

  for _, code in ipairs({ 1000, 1003, 1007, 1011, 3000, 4999 }) do
    it("close_frame accepts code " .. code, function()
      local f = ws.close_frame(code, "r")
      assert.equal(string.char(0x88, 3, math.floor(code / 256), code % 256)
                   .. "r", f)
    end)
  end

  it("close_frame raises on a 124-byte reason", function()
    assert.has_error(function()
      ws.close_frame(1000, ("a"):rep(124))
    end)
  end)
end)


describe("justavps.websocket", function()
  local sizes = { 0, 1, 125, 126, 127, 65535, 65536, 65537, 3 * 1024 * 1024 }

  for _, kind in ipairs({ "text", "binary" }) do
    it(kind .. " round trips at frame boundaries", async(function()
      local server, client = ws_pair()
      for _, n in ipairs(sizes) do
        local payload = ("ab"):rep(n):sub(1, n)

        assert(client:send(payload, kind))
        local data, got_kind = server:recv()
        assert.equal(kind, got_kind)
        assert.equal(n, #data)
        assert.equal(payload, data)

        assert(server:send(payload, kind))
        data, got_kind = client:recv()
        assert.equal(kind, got_kind)
        assert.equal(payload, data)
      end
      server.sock:close()
      client.sock:close()
    end, 30))
  end

  it("splits messages into frame_size frames", async(function()
    local server, client = ws_pair({ frame_size = 1000 },
                                   { frame_size = 1000 })
    local payload = ("0123456789"):rep(1000)
    assert(client:send(payload, "binary"))
    assert.equal(payload, (server:recv()))
    assert(server:send(payload))
    assert.equal(payload, (client:recv()))
    server.sock:close()
    client.sock:close()
  end))

  it("assembles fragments around a ping", async(function()
    local server, client, _, c = ws_pair()
    assert(c:write(ws.encode_frame("text", "hel", false, true)
      .. ws.encode_frame("ping", "p", true, true)
      .. ws.encode_frame("continuation", "lo", true, true)))

    local data, kind = server:recv()
    assert.equal("p", data)
    assert.equal("ping", kind)
    data, kind = server:recv()
    assert.equal("hello", data)
    assert.equal("text", kind)

    -- The automatic pong reached the client.
    data, kind = client:recv()
    assert.equal("p", data)
    assert.equal("pong", kind)
    server.sock:close()
    client.sock:close()
  end))

  it("answers ping with pong", async(function()
    local server, client = ws_pair()
    assert(client:ping("abc"))
    local data, kind = server:recv()
    assert.equal("abc", data)
    assert.equal("ping", kind)
    data, kind = client:recv()
    assert.equal("abc", data)
    assert.equal("pong", kind)
    assert(server:pong("hb"))
    data, kind = client:recv()
    assert.equal("hb", data)
    assert.equal("pong", kind)
    server.sock:close()
    client.sock:close()
  end))

  it("leaves pings unanswered without auto_pong", async(function()
    local server, client = ws_pair({ auto_pong = false })
    assert(client:ping("abc"))
    assert.equal("ping", select(2, server:recv()))
    assert(server:send("after"))
    local data, kind = client:recv()
    assert.equal("after", data)
    assert.equal("text", kind)
    server.sock:close()
    client.sock:close()
  end))

  local function expect_failure(close_code, code, server_opts, wire)
    local server, client, _, c = ws_pair(server_opts)
    assert(c:write(wire))

    local data, message, got_code, got_close = server:recv()
    assert.is_nil(data)
    assert.is_string(message)
    assert.equal(code, got_code)
    assert.equal(close_code, got_close)
    assert.is_true(server:closed())

    -- The client sees the server's close frame with that code.
    local reason, kind, peer_code = client:recv()
    assert.equal("close", kind)
    assert.equal("", reason)
    assert.equal(close_code, peer_code)
  end

  it("rejects an unmasked client frame with 1002", async(function()
    expect_failure(1002, "protocol_error", nil,
                   ws.encode_frame("text", "hi", true, false))
  end))

  it("rejects invalid UTF-8 text with 1007", async(function()
    expect_failure(1007, "invalid_payload", nil,
                   ws.encode_frame("text", "a\255b", true, true))
  end))

  it("rejects an oversized message with 1009", async(function()
    expect_failure(1009, "too_large", { max_message = 1000 },
                   ws.encode_frame("binary", ("a"):rep(2000), true, true))
  end))

  it("rejects a masked server frame with 1002", async(function()
    local server, client, s = ws_pair()
    assert(s:write(ws.encode_frame("binary", "x", true, true)))
    local data, _, code, close_code = client:recv()
    assert.is_nil(data)
    assert.equal("protocol_error", code)
    assert.equal(1002, close_code)
    local _, kind, peer_code = server:recv()
    assert.equal("close", kind)
    assert.equal(1002, peer_code)
  end))

  it("completes the close handshake", async(function()
    local server, client = ws_pair()
    local got = {}
    core.spawn(function()
      got.reason, got.kind, got.code, got.reason2 = server:recv()
    end)
    local ok, peer_code, peer_reason = client:close(4000, "done")
    assert.is_true(ok)
    assert.equal(4000, peer_code)
    assert.equal("", peer_reason)
    assert.equal("close", got.kind)
    assert.equal(4000, got.code)
    assert.equal("done", got.reason)
    assert.equal("done", got.reason2)
    assert.is_true(server:closed())
    assert.is_true(client:closed())

    local data, _, code = server:recv()
    assert.is_nil(data)
    assert.equal("closed", code)
  end))

  it("close waits for a recv in another coroutine", async(function()
    local server, client = ws_pair()
    local got = {}
    core.spawn(function()
      got.data, got.kind, got.code = client:recv()
    end)
    core.spawn(function()
      server:recv()
    end)
    local ok, peer_code = client:close(1001, "going away")
    assert.is_true(ok)
    assert.equal(1001, peer_code)
    assert.equal("close", got.kind)
    assert.equal(1001, got.code)
  end))

  it("close times out when the peer stays silent", async(function()
    local s, c = socket_pair()
    local client = websocket.wrap(c, { role = "client", close_timeout = 0.2 })
    local ok, message, code = client:close()
    assert.is_nil(ok)
    assert.is_string(message)
    assert.equal("timeout", code)
    assert.is_true(client:closed())
    s:close()
  end))

  it("close raises on codes that may not be sent", async(function()
    local server, client = ws_pair()
    for _, code in ipairs({ 1005, 1006, 1015, 999, 2000 }) do
      assert.has_error(function()
        client:close(code)
      end)
    end
    assert.has_error(function()
      client:close(1000, ("a"):rep(124))
    end)
    server.sock:close()
    client.sock:close()
  end))

  it("send raises on invalid UTF-8 text", async(function()
    local server, client = ws_pair()
    assert.has_error(function()
      client:send("\255")
    end)
    assert(client:send("\255", "binary"))
    assert.equal("\255", (server:recv()))
    server.sock:close()
    client.sock:close()
  end))

  it("reports 1006 when the peer vanishes", async(function()
    local server, _, _, c = ws_pair()
    c:close()
    local data, message, code, close_code = server:recv()
    assert.is_nil(data)
    assert.is_string(message)
    assert.equal("closed", code)
    assert.equal(1006, close_code)
  end))

  it("keeps the connection after a read timeout", async(function()
    local server, client = ws_pair()
    server:settimeout(0.1)
    local data, _, code = server:recv()
    assert.is_nil(data)
    assert.equal("timeout", code)
    assert(client:send("late"))
    assert.equal("late", (server:recv()))
    server.sock:close()
    client.sock:close()
  end))

  it("refuses to send after close", async(function()
    local server, client = ws_pair()
    core.spawn(function()
      server:recv()
    end)
    assert(client:close())
    local ok, _, code = client:send("x")
    assert.is_nil(ok)
    assert.equal("closed", code)
  end))

  it("wrap raises on a bad role", function()
    assert.has_error(function()
      websocket.wrap({}, { role = "peer" })
    end)
  end)
end)
