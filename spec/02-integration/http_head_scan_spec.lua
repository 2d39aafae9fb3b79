-- The bare-LF and folded-line checks of request and response heads when
-- a head arrives in pieces: each piece boundary falls between CR and LF,
-- right after LF, or inside a line, and the checks must give the same
-- answer as for the whole head.
local core = require("justavps.core")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")

local async = helpers.async


-- Sends pieces to a new server, a short pause between them so that each
-- arrives in its own read, and returns the response status.
local function server_status(pieces)
  local srv = assert(core.http.listen({
    port = 0,
    access_log = false,
    handler = function()
      return 200, nil, "ok"
    end,
  }))
  local sock = raw.connect(srv:port())
  for _, piece in ipairs(pieces) do
    assert(sock:write(piece))
    core.sleep(0.02)
  end
  local res = assert(raw.read_response(sock))
  sock:close()
  srv:close()
  return res.status
end


-- Serves pieces as a raw upstream's response, each after a short pause,
-- and returns what core.http.request makes of them.
local function client_result(pieces)
  local up = assert(core.tcp.listen({
    port = 0,
    on_accept = function(sock)
      sock:settimeout(5)
      sock:readuntil("\r\n\r\n")
      for _, piece in ipairs(pieces) do
        sock:write(piece)
        core.sleep(0.02)
      end
      sock:close()
    end,
  }))
  local res, err, code = core.http.request({ host = "127.0.0.1",
    port = up:port(), path = "/", timeout = 5 })
  local body
  if res then
    body = res:read_body()
  end
  up:close()
  return res, body, code, err
end


describe("request head scan in pieces", function()
  it("accepts CRLF split between reads", async(function()
    assert.equal(200, server_status({ "GET / HTTP/1.1\r", "\nHost: a\r",
      "\n\r", "\n" }))
  end))

  it("accepts leading empty lines", async(function()
    assert.equal(200, server_status({ "\r\n", "\r\nGET / HTTP/1.1\r\n",
      "Host: a\r\n\r\n" }))
  end))

  it("rejects a bare LF after a split", async(function()
    assert.equal(400, server_status({ "GET / HTTP/1.1\r\nHost: a", "\n\r\n" }))
  end))

  it("rejects a folded line after a split", async(function()
    assert.equal(400, server_status({ "GET / HTTP/1.1\r\nHost: a\r\n",
      " b\r\n\r\n" }))
  end))
end)


describe("response head scan in pieces", function()
  it("accepts CRLF split between reads", async(function()
    local res, body = client_result({ "HTTP/1.1 200 OK\r",
      "\nContent-Length: 2\r\n\r", "\nok" })
    assert.equal(200, res.status)
    assert.equal("ok", body)
  end))

  it("rejects a bare LF after a split", async(function()
    local res, _, code = client_result({ "HTTP/1.1 200 OK\r\nX-A: b",
      "\nContent-Length: 0\r\n\r\n" })
    assert.is_nil(res)
    assert.equal("protocol_error", code)
  end))

  it("rejects a folded line after a split", async(function()
    local res, _, code = client_result({ "HTTP/1.1 200 OK\r\nX-A: b\r\n",
      "\tc\r\nContent-Length: 0\r\n\r\n" })
    assert.is_nil(res)
    assert.equal("protocol_error", code)
  end))
end)
