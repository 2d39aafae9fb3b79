-- A WebSocket echo served by the HTTP server: the handler checks the
-- upgrade, hijacks the connection and frames over it; the client connects
-- through the client handshake. Messages cross in several frames, as text
-- and binary, with pings in between.
local core = require("justavps.core")
local websocket = require("justavps.websocket")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")

local async = helpers.async


local function echo_server()
  return assert(core.http.listen{
    port = 0,
    access_log = false,
    handler = function(req)
      local ok, key, code, status = websocket.check_request(req.method,
        function(name)
          return req:header(name)
        end)
      if not ok then
        return status, { ["Content-Type"] = "application/json" },
          '{"error":{"code":"' .. code .. '","message":"not an upgrade"}}'
      end

      local sock = req:hijack()
      assert(websocket.server_handshake(sock, key))
      local conn = websocket.wrap(sock, { role = "server", frame_size = 1000 })
      while true do
        local data, kind = conn:recv()
        if data == nil or kind == "close" then
          break
        end
        if kind == "text" or kind == "binary" then
          assert(conn:send(data, kind))
        end
      end
    end,
  })
end


local function client(port)
  local sock = assert(core.tcp.connect("127.0.0.1", port))
  sock:settimeout(10)
  assert(websocket.client_handshake(sock, { host = "127.0.0.1", path = "/ws" }))
  -- Small frames force the server to reassemble fragmented messages.
  return websocket.wrap(sock, { role = "client", frame_size = 700 })
end


describe("websocket over the http server", function()
  it("echoes fragmented text and binary messages", async(function()
    local srv = echo_server()
    local conn = client(srv:port())

    local text = string.rep("héllo wörld ", 500)
    assert(conn:send(text, "text"))
    local data, kind = conn:recv()
    assert.equal("text", kind)
    assert.equal(text, data)

    local bytes = {}
    for i = 0, 4095 do
      bytes[#bytes + 1] = string.char(i % 256)
    end
    local binary = table.concat(bytes)
    assert(conn:send(binary, "binary"))
    data, kind = conn:recv()
    assert.equal("binary", kind)
    assert.equal(binary, data)

    assert(conn:ping("are you there"))
    data, kind = conn:recv()
    assert.equal("pong", kind)
    assert.equal("are you there", data)

    assert(conn:close(1000, "done"))
    srv:close()
  end))

  it("answers a plain GET with 400", async(function()
    local srv = echo_server()
    local sock = raw.connect(srv:port())
    sock:write("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(400, res.status)
    sock:close()
    srv:close()
  end))

  it("answers a wrong version with 426", async(function()
    local srv = echo_server()
    local sock = raw.connect(srv:port())
    sock:write("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
      .. "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
      .. "Sec-WebSocket-Version: 8\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(426, res.status)
    sock:close()
    srv:close()
  end))
end)
