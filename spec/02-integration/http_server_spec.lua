-- The HTTP/1.1 server against real sockets on loopback: framing, keep-alive,
-- pipelining, streaming both ways, limits, smuggling forms and draining.
local core = require("justavps.core")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")

local async = helpers.async

-- Starts a server on a free port with handler and options; returns it.
local function serve(handler, opts)
  opts = opts or {}
  opts.port = 0
  opts.handler = handler
  if opts.access_log == nil then
    opts.access_log = false
  end
  return assert(core.http.listen(opts))
end

local function hello()
  return 200, { ["Content-Type"] = "text/plain" }, "hello world\n"
end

local function echo_body(req)
  local parts = {}
  while true do
    local data, err = req:read()
    if not data then
      assert(err == nil, err)
      break
    end
    parts[#parts + 1] = data
  end
  return 200, { ["X-Method"] = req.method }, table.concat(parts)
end

describe("http server", function()
  it("answers a GET with length and date", async(function()
    local srv = serve(hello)
    local sock = raw.connect(srv:port())
    sock:write("GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(200, res.status)
    assert.equal("hello world\n", res.body)
    assert.equal("12", res.headers["content-length"])
    assert.truthy(res.headers["date"]:match("GMT$"))
    assert.is_nil(res.headers["connection"])
    sock:close()
    srv:close()
  end))

  it("tells a handler when the client has gone", async(function()
    local seen = {}
    local client_gone = core.waiter()
    local srv = serve(function(req)
      req:send_head(200, { ["Content-Type"] = "text/plain" })
      assert(req:write("first\n"))
      seen.open = req:peer_closed()
      for _ = 1, 100 do
        if req:peer_closed() then
          seen.closed = true
          break
        end
        core.sleep(0.05)
      end
      client_gone:wake()
    end)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.truthy(sock:read())
    sock:close()
    client_gone:wait(10)
    srv:close()
    assert.is_false(seen.open)
    assert.is_true(seen.closed)
  end))

  it("exposes method, target, path, query, version", async(function()
    local seen
    local srv = serve(function(req)
      seen = {
        method = req.method, target = req.target, path = req.path,
        query = req.query, version = req.version, id = req.id,
        host = req:header("HOST"), headers = req:headers(),
        list = req:header_list(),
      }
      return 204
    end)
    local sock = raw.connect(srv:port())
    sock:write("DELETE /x/y?q=%20z HTTP/1.1\r\nHost: h.example\r\n"
      .. "X-Dup: 1\r\nx-dup: 2\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(204, res.status)
    assert.is_nil(res.headers["content-length"])
    assert.equal("DELETE", seen.method)
    assert.equal("/x/y?q=%20z", seen.target)
    assert.equal("/x/y", seen.path)
    assert.equal("q=%20z", seen.query)
    assert.equal("1.1", seen.version)
    assert.truthy(#seen.id >= 8)
    assert.equal("h.example", seen.host)
    assert.same({ "1", "2" }, seen.headers["x-dup"])
    assert.same({ "X-Dup", "1" }, seen.list[2])
    sock:close()
    srv:close()
  end))

  it("keeps a connection alive across requests", async(function()
    local srv = serve(hello)
    local sock = raw.connect(srv:port())
    for _ = 1, 5 do
      sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      local res = assert(raw.read_response(sock))
      assert.equal(200, res.status)
    end
    local open = srv:connections()
    assert.equal(1, open)
    sock:close()
    srv:close()
  end))

  it("answers pipelined requests in order", async(function()
    local srv = serve(function(req)
      if req.path == "/slow" then
        core.sleep(0.05)
      end
      return 200, nil, req.path
    end)
    local sock = raw.connect(srv:port())
    sock:write("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.equal("/slow", assert(raw.read_response(sock)).body)
    assert.equal("/two", assert(raw.read_response(sock)).body)
    local last = assert(raw.read_response(sock))
    assert.equal("/three", last.body)
    assert.equal("close", last.headers["connection"])
    assert.is_true(raw.is_closed(sock))
    srv:close()
  end))

  it("closes after HTTP/1.0 without keep-alive", async(function()
    local srv = serve(hello)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.0\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(200, res.status)
    assert.equal("close", res.headers["connection"])
    assert.is_true(raw.is_closed(sock))
    srv:close()
  end))

  it("streams a request body in pieces", async(function()
    local pieces = 0
    local srv = serve(function(req)
      local total = 0
      while true do
        local data = req:read()
        if not data then
          break
        end
        pieces = pieces + 1
        total = total + #data
      end
      return 200, nil, tostring(total)
    end, { max_body = 64 * 1024 * 1024 })
    local sock = raw.connect(srv:port())
    local size = 8 * 1024 * 1024
    sock:write("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: " .. size
      .. "\r\n\r\n")
    local chunk = string.rep("a", 65536)
    for _ = 1, size / #chunk do
      assert(sock:write(chunk))
    end
    local res = assert(raw.read_response(sock))
    assert.equal(tostring(size), res.body)
    assert.truthy(pieces > 1)
    sock:close()
    srv:close()
  end))

  it("decodes a chunked request body", async(function()
    local srv = serve(echo_body)
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal("hello world", res.body)
    sock:close()
    srv:close()
  end))

  it("streams a chunked response", async(function()
    local srv = serve(function(req)
      req:send_head(200, { ["Content-Type"] = "text/event-stream" })
      for i = 1, 3 do
        req:write("data: " .. i .. "\n\n")
      end
    end)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal("chunked", res.headers["transfer-encoding"])
    assert.equal("data: 1\n\ndata: 2\n\ndata: 3\n\n", res.body)
    -- The connection stays usable after the last chunk.
    sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(200, assert(raw.read_response(sock)).status)
    sock:close()
    srv:close()
  end))

  it("sends no body for HEAD", async(function()
    local srv = serve(hello)
    local sock = raw.connect(srv:port())
    sock:write("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(raw.read_response(sock, { head = true }))
    assert.equal("12", res.headers["content-length"])
    sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    local res2 = assert(raw.read_response(sock))
    assert.equal("hello world\n", res2.body)
    sock:close()
    srv:close()
  end))

  it("sends 100 Continue when the body is read", async(function()
    local srv = serve(echo_body)
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
      .. "Expect: 100-continue\r\n\r\n")
    local interim = assert(raw.read_response(sock))
    assert.equal(100, interim.status)
    sock:write("ping")
    local res = assert(raw.read_response(sock))
    assert.equal(200, res.status)
    assert.equal("ping", res.body)
    sock:close()
    srv:close()
  end))

  it("closes when a 100-continue body is refused", async(function()
    local srv = serve(function()
      return 401, nil, "no"
    end)
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
      .. "Expect: 100-continue\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(401, res.status)
    assert.is_true(raw.is_closed(sock))
    srv:close()
  end))

  it("skips an unread body to serve the next request", async(function()
    local srv = serve(hello)
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
      .. "0123456789GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(200, assert(raw.read_response(sock)).status)
    assert.equal(200, assert(raw.read_response(sock)).status)
    sock:close()
    srv:close()
  end))

  it("answers 500 when the handler raises", async(function()
    local srv = serve(function()
      error("handler bug")
    end)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(500, res.status)
    assert.truthy(res.body:find('"code":"internal"', 1, true))
    assert.falsy(res.body:find("handler bug", 1, true))
    sock:close()
    srv:close()
  end))

  it("rejects CR or LF in a response header", async(function()
    local srv = serve(function()
      return 200, { ["X-Bad"] = "a\r\nSet-Cookie: evil=1" }, "x"
    end)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(500, res.status)
    assert.is_nil(res.headers["set-cookie"])
    sock:close()
    srv:close()
  end))

  it("closes after refusing an upgrade", async(function()
    local calls = 0
    local srv = serve(function()
      calls = calls + 1
      return 400, nil, "no upgrade here"
    end)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
      .. "Connection: Upgrade\r\n\r\nnot http at all\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(400, res.status)
    assert.is_true(raw.is_closed(sock))
    assert.equal(1, calls)
    srv:close()
  end))

  it("counts open and busy connections", async(function()
    local srv = serve(hello)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert(raw.read_response(sock))
    assert.is_true(raw.is_closed(sock))
    local keep = raw.connect(srv:port())
    keep:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert(raw.read_response(keep))
    local open, busy = srv:connections()
    assert.equal(1, open)
    assert.equal(0, busy)
    keep:close()
    srv:close()
  end))

  it("keeps byte order on hijack", async(function()
    local first, rest
    local srv = serve(function(req)
      first = req:read(3)
      local sock = req:hijack()
      rest = sock:readn(12)
      sock:close()
    end)
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\n"
      .. "Connection: Upgrade\r\nContent-Length: 10\r\n\r\n"
      .. "0123456789after")
    assert.is_true(raw.is_closed(sock))
    assert.equal("012", first)
    -- The unread body comes before the bytes that followed it.
    assert.equal("3456789after", rest)
    srv:close()
  end))

  it("hands the socket over on hijack", async(function()
    local srv = serve(function(req)
      local sock = req:hijack()
      sock:write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
        .. "Connection: Upgrade\r\n\r\n")
      while true do
        local data = sock:read()
        if not data then
          break
        end
        sock:write(data)
      end
      sock:close()
    end)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\n"
      .. "Connection: Upgrade\r\n\r\nearly bytes")
    local res = assert(raw.read_response(sock, { head = true }))
    assert.equal(101, res.status)
    assert.equal("early bytes", sock:readn(11))
    sock:write("later")
    assert.equal("later", sock:readn(5))
    sock:close()
    srv:close()
  end))
end)

describe("http server limits", function()
  local cases = {
    { name = "oversized Content-Length", status = 413,
      request = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" },
    { name = "long request-target", status = 414,
      request = "GET /" .. string.rep("a", 300) .. " HTTP/1.1\r\nHost: x\r\n\r\n" },
    { name = "too many headers", status = 431,
      request = "GET / HTTP/1.1\r\n" .. string.rep("X-A: 1\r\n", 12) .. "\r\n" },
    { name = "oversized head", status = 431,
      request = "GET / HTTP/1.1\r\nX-Big: " .. string.rep("b", 700) .. "\r\n\r\n" },
  }

  for _, case in ipairs(cases) do
    it("rejects " .. case.name, async(function()
      local srv = serve(hello, {
        max_body = 1000, max_url = 200, max_headers = 10,
        max_header_size = 600,
      })
      local sock = raw.connect(srv:port())
      sock:write(case.request)
      local res = assert(raw.read_response(sock))
      assert.equal(case.status, res.status)
      assert.equal("close", res.headers["connection"])
      assert.is_true(raw.is_closed(sock))
      srv:close()
    end))
  end

  it("rejects a chunked body over the limit", async(function()
    local srv = serve(echo_body, { max_body = 10 })
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "10\r\n0123456789abcdef\r\n0\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(413, res.status)
    assert.is_true(raw.is_closed(sock))
    srv:close()
  end))

  it("times out a slow request head", async(function()
    local srv = serve(hello, { header_timeout = 0.2 })
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost:")
    local res = assert(raw.read_response(sock))
    assert.equal(408, res.status)
    assert.is_true(raw.is_closed(sock))
    srv:close()
  end))

  it("closes an idle keep-alive connection", async(function()
    local srv = serve(hello, { idle_timeout = 0.2 })
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(200, assert(raw.read_response(sock)).status)
    assert.is_true(raw.is_closed(sock))
    srv:close()
  end))
end)

describe("http server smuggling forms", function()
  -- Each request is ambiguous between two HTTP implementations; the server
  -- must reject it at once with 400 and close, never answer a second
  -- request hidden inside it.
  local smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
  local cases = {
    { name = "Content-Length with Transfer-Encoding",
      request = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" .. smuggled },
    { name = "duplicate Content-Length",
      request = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        .. "Content-Length: 40\r\n\r\n" .. smuggled },
    { name = "bare LF line endings",
      request = "GET / HTTP/1.1\nHost: x\n\n" .. smuggled },
    { name = "bare LF inside a header block",
      request = "GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n" .. smuggled },
    { name = "obsolete line folding",
      request = "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n" .. smuggled },
    { name = "space before the colon",
      request = "GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\n"
        .. smuggled },
    { name = "non-chunked final Transfer-Encoding",
      request = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, "
        .. "identity\r\n\r\n0\r\n\r\n" .. smuggled },
    { name = "invalid Content-Length",
      request = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n"
        .. smuggled },
    { name = "chunk data without its CRLF",
      request = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        .. "\r\n2\r\nhiGE0\r\n\r\n" .. smuggled },
    { name = "folding after leading empty lines",
      request = "\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n"
        .. smuggled },
    { name = "a missing Host",
      request = "GET / HTTP/1.1\r\n\r\n" .. smuggled },
    { name = "a repeated Host",
      request = "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" .. smuggled },
    { name = "a repeated Transfer-Encoding",
      request = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" .. smuggled },
    { name = "an endless chunk extension",
      request = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        .. "\r\n1;" .. string.rep("e", 2000) .. "\r\nx\r\n0\r\n\r\n" },
  }

  cases[#cases + 1] = { name = "a transfer coding other than chunked",
    status = 501, code = "unsupported_transfer_encoding",
    request = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
      .. "\r\n\r\n0\r\n\r\n" .. smuggled }

  for _, case in ipairs(cases) do
    it("rejects " .. case.name, async(function()
      local handled = 0
      local srv = serve(function(req)
        -- Read the whole body first, so errors in it reach the parser
        -- before any response; count only requests read without error.
        while true do
          local data, err = req:read()
          if not data then
            if err then
              return
            end
            break
          end
        end
        handled = handled + 1
        return 200, nil, "handled"
      end)
      local sock = raw.connect(srv:port())
      sock:write(case.request)
      local res = assert(raw.read_response(sock))
      assert.equal(case.status or 400, res.status)
      assert.equal("close", res.headers["connection"])
      assert.truthy(res.body:find('"code":"' .. (case.code or "bad_request")
        .. '"', 1, true))
      assert.is_true(raw.is_closed(sock))
      assert.equal(0, handled)
      srv:close()
    end))
  end
end)

describe("http server abuse", function()
  it("stops reading from a client that never reads", async(function()
    local srv = serve(hello)
    local sock = raw.connect(srv:port())
    sock:settimeout(2)
    local request = string.rep("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1000)
    local blocked = false
    for _ = 1, 2000 do
      local ok, _, code = sock:write(request)
      if not ok then
        assert.equal("timeout", code)
        blocked = true
        break
      end
    end
    -- Without backpressure the server would take every request and queue
    -- responses without bound; with it, the client's writes stall.
    assert.is_true(blocked)
    sock:close()
    srv:close()
  end), 60)

  it("closes a connection that leaves mid-body", async(function()
    local srv = serve(hello)
    for _ = 1, 5 do
      local sock = raw.connect(srv:port())
      sock:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        .. "\r\nabc")
      assert.equal(200, assert(raw.read_response(sock)).status)
      sock:close()
    end
    local open = 1
    for _ = 1, 100 do
      open = srv:connections()
      if open == 0 then
        break
      end
      core.sleep(0.02)
    end
    assert.equal(0, open)
    srv:close()
  end))

  it("closes a body that stops after the response", async(function()
    local srv = serve(hello, { idle_timeout = 0.3 })
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
    assert.equal(200, assert(raw.read_response(sock)).status)
    assert.is_true(raw.is_closed(sock))
    srv:close()
  end))

  it("times out a body read that stalls", async(function()
    local result
    local srv = serve(function(req)
      local data, _, code = req:read()
      result = { data, code }
      return 408, nil, "slow"
    end, { idle_timeout = 0.3 })
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    local res = assert(raw.read_response(sock))
    assert.equal(408, res.status)
    assert.same({ nil, "timeout" }, result)
    sock:close()
    srv:close()
  end))

  it("sends one response for a bad body after it", async(function()
    local srv = serve(hello)
    local sock = raw.connect(srv:port())
    sock:write("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
      .. "\r\n")
    assert.equal(200, assert(raw.read_response(sock)).status)
    sock:write("zz\r\n")
    assert.is_true(raw.is_closed(sock))
    srv:close()
  end))

  it("refuses connections above max_connections", async(function()
    local srv = serve(hello, { max_connections = 2 })
    local a, b = raw.connect(srv:port()), raw.connect(srv:port())
    core.sleep(0.05)
    local c = raw.connect(srv:port())
    assert.is_true(raw.is_closed(c))
    a:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(200, assert(raw.read_response(a)).status)
    local _, _, refused = srv:connections()
    assert.equal(1, refused)
    a:close()
    b:close()
    srv:close()
  end))
end)


describe("http server drain", function()
  it("finishes in-flight requests then returns", async(function()
    local srv = serve(function()
      core.sleep(0.1)
      return 200, nil, "late"
    end)
    local port = srv:port()
    local idle = raw.connect(port)
    local busy = raw.connect(port)
    busy:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    core.sleep(0.02)

    local drained
    core.spawn(function()
      drained = srv:drain(5)
    end)

    local res = assert(raw.read_response(busy))
    assert.equal(200, res.status)
    assert.equal("late", res.body)
    assert.equal("close", res.headers["connection"])
    assert.is_true(raw.is_closed(idle))
    core.sleep(0.05)
    assert.is_true(drained)
    local refused = core.tcp.connect("127.0.0.1", port)
    assert.is_nil(refused)
  end))

  it("closes what is left after the timeout", async(function()
    local srv = serve(function()
      core.sleep(2)
      return 200, nil, "too late"
    end)
    local sock = raw.connect(srv:port())
    sock:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    core.sleep(0.02)
    local ok = srv:drain(0.1)
    assert.is_false(ok)
    assert.is_true(raw.is_closed(sock))
  end))
end)
