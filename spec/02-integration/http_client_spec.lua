-- The HTTP/1.1 client against real servers on loopback: core.http.listen
-- for well-formed responses and raw core.tcp servers for framing edge
-- cases and malformed responses.
local core = require("justavps.core")
local helpers = require("support.helpers")

local async = helpers.async
local request = core.http.request

-- Starts an HTTP server on a free port with handler and returns it.
local function serve(handler, opts)
  opts = opts or {}
  opts.port = 0
  opts.handler = handler
  opts.access_log = false
  return assert(core.http.listen(opts))
end

-- Starts a raw TCP server that reads one request head and lets respond
-- write whatever bytes it likes. Returns the listener.
local function raw_server(respond)
  return assert(core.tcp.listen({
    port = 0,
    on_accept = function(sock)
      sock:settimeout(5)
      local head = sock:readuntil("\r\n\r\n")
      if head then
        respond(sock, head)
      end
    end,
  }))
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
  return 200, {
    ["X-Method"] = req.method,
    ["X-Transfer-Encoding"] = req:header("transfer-encoding") or "none",
    ["X-Content-Length"] = req:header("content-length") or "none",
  }, table.concat(parts)
end

local function get(port, opts)
  opts = opts or {}
  opts.host = "127.0.0.1"
  opts.port = port
  opts.timeout = opts.timeout or 5
  return request(opts)
end

describe("http client", function()
  it("reads a Content-Length response", async(function()
    local seen
    local srv = serve(function(req)
      seen = { path = req.target, host = req:header("host") }
      return 200, { ["X-Dup"] = { "1", "2" }, ["Content-Type"] = "text/plain" },
        "hello world\n"
    end)
    local res = assert(get(srv:port(), { path = "/a?b=1" }))
    assert.equal(200, res.status)
    assert.equal("OK", res.reason)
    assert.equal("1.1", res.version)
    assert.equal("text/plain", res:header("CONTENT-TYPE"))
    assert.equal("12", res:header("content-length"))
    assert.same({ "1", "2" }, res:headers()["x-dup"])
    assert.equal("hello world\n", res:read_body())
    assert.is_true(res:keepalive())
    assert.equal("/a?b=1", seen.path)
    assert.equal("127.0.0.1:" .. srv:port(), seen.host)
    res:close()
    srv:close()
  end))

  it("decodes a chunked response", async(function()
    local srv = serve(function(req)
      req:send_head(200)
      for i = 1, 3 do
        req:write("part " .. i .. ";")
      end
    end)
    local res = assert(get(srv:port()))
    assert.equal("chunked", res:header("transfer-encoding"))
    local parts = {}
    while true do
      local piece, err = res:read()
      if not piece then
        assert.is_nil(err)
        break
      end
      parts[#parts + 1] = piece
    end
    assert.equal("part 1;part 2;part 3;", table.concat(parts))
    assert.is_nil(res:read())
    assert.is_true(res:keepalive())
    res:close()
    srv:close()
  end))

  it("drops trailer fields", async(function()
    local srv = raw_server(function(sock)
      sock:write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "4\r\nbody\r\n0\r\nX-Trailer: 1\r\n\r\n")
      sock:read()
      sock:close()
    end)
    local res = assert(get(srv:port()))
    assert.equal("body", res:read_body())
    assert.is_nil(res:header("x-trailer"))
    assert.is_true(res:keepalive())
    res:close()
    srv:close()
  end))

  it("reads a close-delimited body", async(function()
    local srv = raw_server(function(sock)
      sock:write("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
      sock:write("until the ")
      sock:write("end")
      sock:close()
    end)
    local res = assert(get(srv:port()))
    assert.equal("until the end", res:read_body())
    assert.is_false(res:keepalive())
    local sock, err, code = res:socket()
    assert.is_nil(sock)
    assert.truthy(err)
    assert.equal("closed", code)
    res:close()
    srv:close()
  end))

  it("reads no body after HEAD", async(function()
    local srv = serve(function()
      return 200, nil, "hello world\n"
    end)
    local res = assert(get(srv:port(), { method = "HEAD" }))
    assert.equal("12", res:header("content-length"))
    assert.is_nil(res:read())
    assert.is_true(res:keepalive())
    local res2 = assert(request({ sock = res:socket(), timeout = 5 }))
    assert.equal("hello world\n", res2:read_body())
    res2:close()
    srv:close()
  end))

  it("reads no body after 204", async(function()
    local srv = serve(function()
      return 204
    end)
    local res = assert(get(srv:port()))
    assert.equal(204, res.status)
    assert.equal("", res:read_body())
    assert.is_true(res:keepalive())
    res:close()
    srv:close()
  end))

  it("reads no body after 304 with a length", async(function()
    local srv = raw_server(function(sock)
      -- A 304 may repeat the resource's length, but no body follows it.
      sock:write("HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n")
      if sock:readuntil("\r\n\r\n") then
        sock:write("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
      end
      sock:read()
      sock:close()
    end)
    local res = assert(get(srv:port()))
    assert.equal(304, res.status)
    assert.is_nil(res:read())
    assert.is_true(res:keepalive())
    local res2 = assert(request({ sock = res:socket(), timeout = 5 }))
    assert.equal(200, res2.status)
    assert.equal("next", res2:read_body())
    res2:close()
    srv:close()
  end))

  it("skips interim responses", async(function()
    local srv = raw_server(function(sock)
      sock:write("HTTP/1.1 100 Continue\r\n\r\n")
      core.sleep(0.01)
      sock:write("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        .. "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
      sock:read()
      sock:close()
    end)
    local res = assert(get(srv:port()))
    assert.equal(200, res.status)
    assert.is_nil(res:header("link"))
    assert.equal("ok", res:read_body())
    res:close()
    srv:close()
  end))

  it("sends a string body", async(function()
    local srv = serve(echo_body)
    local res = assert(get(srv:port(), { method = "POST", body = "ping" }))
    assert.equal("POST", res:header("x-method"))
    assert.equal("4", res:header("x-content-length"))
    assert.equal("ping", res:read_body())
    res:close()
    srv:close()
  end))

  it("streams a body_reader chunked", async(function()
    local srv = serve(echo_body)
    local pieces = { "one ", "", "two ", "three" }
    local i = 0
    local res = assert(get(srv:port(), {
      method = "PUT",
      body_reader = function()
        i = i + 1
        return pieces[i]
      end,
    }))
    assert.equal("chunked", res:header("x-transfer-encoding"))
    assert.equal("one two three", res:read_body())
    res:close()
    srv:close()
  end))

  it("streams a body_reader with a length", async(function()
    local srv = serve(echo_body)
    local pieces = { "abc", "def" }
    local i = 0
    local res = assert(get(srv:port(), {
      method = "POST",
      headers = { ["Content-Length"] = "6" },
      body_reader = function()
        i = i + 1
        return pieces[i]
      end,
    }))
    assert.equal("none", res:header("x-transfer-encoding"))
    assert.equal("6", res:header("x-content-length"))
    assert.equal("abcdef", res:read_body())
    res:close()
    srv:close()
  end))

  it("raises when body_reader overruns its length", async(function()
    local srv = serve(echo_body)
    local ok, err = pcall(get, srv:port(), {
      method = "POST",
      headers = { ["Content-Length"] = "2" },
      body_reader = function()
        return "too long"
      end,
    })
    assert.is_false(ok)
    assert.truthy(err:find("Content-Length", 1, true))
    srv:close()
  end))

  it("closes when body_reader raises", async(function()
    local srv = serve(echo_body)
    local ok, err = pcall(get, srv:port(), {
      method = "POST",
      body_reader = function()
        error("reader bug")
      end,
    })
    assert.is_false(ok)
    assert.truthy(err:find("reader bug", 1, true))
    srv:close()
  end))

  it("fails reads after close", async(function()
    local srv = serve(function()
      return 200, nil, "body"
    end)
    local res = assert(get(srv:port()))
    res:close()
    res:close()
    local piece, err, code = res:read()
    assert.is_nil(piece)
    assert.truthy(err)
    assert.equal("closed", code)
    assert.is_false(res:keepalive())
    srv:close()
  end))

  it("reuses a keep-alive connection", async(function()
    local peers, hosts = {}, {}
    local srv = serve(function(req)
      local _, port = req:peer()
      peers[#peers + 1] = port
      hosts[#hosts + 1] = req:header("host")
      return 200, nil, req.path
    end)
    local res = assert(get(srv:port(), { path = "/one" }))
    assert.equal("/one", res:read_body())
    local sock = assert(res:socket())
    local res2 = assert(request({ sock = sock, path = "/two", timeout = 5 }))
    assert.equal("/two", res2:read_body())
    assert.equal(2, #peers)
    assert.equal(peers[1], peers[2])
    -- Without host, the Host of a reused socket is its peer address.
    assert.equal("127.0.0.1:" .. srv:port(), hosts[2])
    assert.equal(1, (srv:connections()))
    res2:close()
    srv:close()
  end))

  it("raises when the socket is taken early", async(function()
    local srv = serve(function()
      return 200, nil, "body"
    end)
    local res = assert(get(srv:port()))
    assert.has_error(function()
      res:socket()
    end)
    res:close()
    srv:close()
  end))

  it("streams a large body in pieces", async(function()
    local size = 32 * 1024 * 1024
    local chunk = string.rep("x", 65536)
    local srv = serve(function(req)
      req:send_head(200, { ["Content-Length"] = tostring(size) })
      for _ = 1, size / #chunk do
        assert(req:write(chunk))
      end
    end)
    collectgarbage()
    local base = collectgarbage("count")
    local res = assert(get(srv:port()))
    local total, pieces, largest, peak = 0, 0, 0, 0
    while true do
      local piece = res:read()
      if not piece then
        break
      end
      total = total + #piece
      pieces = pieces + 1
      largest = math.max(largest, #piece)
      peak = math.max(peak, collectgarbage("count") - base)
    end
    assert.equal(size, total)
    assert.truthy(pieces > 1)
    assert.truthy(largest <= 65536)
    -- The whole body is 32768 KiB, and a bounded reader stays far below.
    assert.truthy(peak < 8192, "peak Lua heap growth " .. peak .. " KiB")
    assert.is_true(res:keepalive())
    res:close()
    srv:close()
  end), 60)

  it("returns pieces no larger than max", async(function()
    local srv = serve(function()
      return 200, nil, "0123456789"
    end)
    local res = assert(get(srv:port()))
    assert.equal("0123", res:read(4))
    assert.equal("4567", res:read(4))
    assert.equal("89", res:read(4))
    assert.is_nil(res:read(4))
    res:close()
    srv:close()
  end))

  it("rejects read_body over max_bytes", async(function()
    local srv = serve(function(req)
      if req.path == "/chunked" then
        req:send_head(200)
        req:write(string.rep("a", 100))
        return
      end
      return 200, nil, string.rep("a", 100)
    end)
    for _, path in ipairs({ "/length", "/chunked" }) do
      local res = assert(get(srv:port(), { path = path }))
      local body, err, code = res:read_body(50)
      assert.is_nil(body)
      assert.truthy(err)
      assert.equal("too_large", code)
      assert.is_false(res:keepalive())
    end
    srv:close()
  end))
end)

describe("http client over TLS", function()
  local files = {}

  local function tmp()
    local path = os.tmpname()
    files[#files + 1] = path
    return path
  end

  teardown(function()
    for _, path in ipairs(files) do
      os.remove(path)
    end
  end)

  -- Makes a CA and a leaf for "localhost" signed by it.
  local function make_pki()
    local pki = {
      ca_cert = tmp(), ca_key = tmp(), cert = tmp(), key = tmp(),
    }
    assert(core.tls.generate({
      cert_out = pki.ca_cert, key_out = pki.ca_key, cn = "spec CA", ca = true,
    }))
    assert(core.tls.generate({
      cert_out = pki.cert, key_out = pki.key, cn = "localhost",
      names = { "localhost", "127.0.0.1" },
      issuer_cert = pki.ca_cert, issuer_key = pki.ca_key,
    }))
    return pki
  end

  it("verifies the server against a CA", async(function()
    local pki = make_pki()
    local server_tls = assert(core.tls.server_context({
      cert = pki.cert, key = pki.key,
    }))
    local srv = serve(function(req)
      return 200, nil, "secret " .. req:header("host")
    end, { tls = server_tls })
    local client_tls = assert(core.tls.client_context({ ca = pki.ca_cert }))
    local res = assert(get(srv:port(), {
      tls = client_tls, server_name = "localhost",
    }))
    assert.equal(200, res.status)
    assert.equal("secret localhost:" .. srv:port(), res:read_body())
    res:close()
    srv:close()
  end))

  it("fails on an unknown CA", async(function()
    local pki = make_pki()
    local other = make_pki()
    local server_tls = assert(core.tls.server_context({
      cert = pki.cert, key = pki.key,
    }))
    local srv = serve(function()
      return 200, nil, "secret"
    end, { tls = server_tls })
    local client_tls = assert(core.tls.client_context({ ca = other.ca_cert }))
    local res, err, code = get(srv:port(), {
      tls = client_tls, server_name = "localhost",
    })
    assert.is_nil(res)
    assert.truthy(err)
    assert.equal("tls_error", code)
    srv:close()
  end))

  it("raises without server_name", function()
    local client_tls = assert(core.tls.client_context({ verify = false }))
    assert.has_error(function()
      request({ host = "127.0.0.1", port = 1, tls = client_tls })
    end)
  end)
end)

describe("http client failures", function()
  it("reports a refused connection", async(function()
    local listener = raw_server(function() end)
    local port = listener:port()
    listener:close()
    core.sleep(0.01)
    local res, err, code = get(port)
    assert.is_nil(res)
    assert.truthy(err)
    assert.equal("ECONNREFUSED", code)
  end))

  it("times out on a silent server", async(function()
    local srv = raw_server(function(sock)
      sock:read()
      sock:close()
    end)
    local res, err, code = get(srv:port(), { timeout = 0.2 })
    assert.is_nil(res)
    assert.truthy(err)
    assert.equal("timeout", code)
    srv:close()
  end))

  local malformed = {
    { name = "malformed status line", code = "protocol_error",
      response = "HTTP/1.1 OK\r\n\r\n" },
    { name = "non-HTTP response", code = "protocol_error",
      response = "SSH-2.0-OpenSSH_9.6\r\n" },
    { name = "bare LF in the head", code = "protocol_error",
      response = "HTTP/1.1 200 OK\nContent-Length: 0\n\n" },
    { name = "folded header line", code = "protocol_error",
      response = "HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\n"
        .. "Content-Length: 0\r\n\r\n" },
    { name = "Content-Length with Transfer-Encoding", code = "protocol_error",
      response = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
        .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
    { name = "duplicate Content-Length", code = "protocol_error",
      response = "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
        .. "Content-Length: 2\r\n\r\nab" },
    { name = "oversized head", code = "too_large",
      response = "HTTP/1.1 200 OK\r\nX-Big: " .. string.rep("b", 2000)
        .. "\r\n\r\n" },
    { name = "too many header fields", code = "too_large",
      response = "HTTP/1.1 200 OK\r\n" .. string.rep("X-A: 1\r\n", 20)
        .. "\r\n" },
    { name = "truncated head", code = "closed",
      response = "HTTP/1.1 200 OK\r\nContent-" },
    { name = "empty response", code = "closed", response = "" },
  }

  for _, case in ipairs(malformed) do
    it("rejects a " .. case.name, async(function()
      local srv = raw_server(function(sock)
        sock:write(case.response)
        sock:close()
      end)
      local res, err, code = get(srv:port(), {
        max_header_size = 1000, max_headers = 10,
      })
      assert.is_nil(res)
      assert.truthy(err)
      assert.equal(case.code, code)
      srv:close()
    end))
  end

  local truncated = {
    { name = "chunked", response = "HTTP/1.1 200 OK\r\n"
      .. "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nab" },
    { name = "Content-Length", response = "HTTP/1.1 200 OK\r\n"
      .. "Content-Length: 10\r\n\r\nhello" },
  }

  for _, case in ipairs(truncated) do
    it("fails on a truncated " .. case.name .. " body", async(function()
      local srv = raw_server(function(sock)
        sock:write(case.response)
        sock:close()
      end)
      local res = assert(get(srv:port()))
      local body, err, code = res:read_body()
      assert.is_nil(body)
      assert.truthy(err)
      assert.equal("closed", code)
      -- The failure sticks: a later read returns it again.
      local piece, err2, code2 = res:read()
      assert.is_nil(piece)
      assert.equal(err, err2)
      assert.equal(code, code2)
      assert.is_false(res:keepalive())
      srv:close()
    end))
  end

  it("rejects a bad chunk size", async(function()
    local srv = raw_server(function(sock)
      sock:write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n")
      sock:read()
      sock:close()
    end)
    local res = assert(get(srv:port()))
    assert.equal(200, res.status)
    -- Pieces parsed before the error come first, then the error.
    assert.equal("hello", res:read())
    local piece, err, code = res:read()
    assert.is_nil(piece)
    assert.truthy(err)
    assert.equal("protocol_error", code)
    srv:close()
  end))

  it("raises on CR or LF in a header", function()
    assert.has_error(function()
      request({ host = "127.0.0.1", port = 1,
        headers = { ["X-Bad"] = "a\r\nX-Evil: 1" } })
    end)
  end)

  it("raises on an invalid method or path", function()
    assert.has_error(function()
      request({ host = "127.0.0.1", port = 1, method = "GE T" })
    end)
    assert.has_error(function()
      request({ host = "127.0.0.1", port = 1, path = "/a b" })
    end)
  end)
end)

describe("http client upgrade", function()
  it("hands over the socket after 101", async(function()
    local got
    local srv = raw_server(function(sock, head)
      got = head
      sock:write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
        .. "Connection: Upgrade\r\n\r\nearly bytes")
      local data = sock:read()
      if data then
        sock:write(data)
      end
      sock:read()
      sock:close()
    end)
    local res = assert(get(srv:port(), {
      headers = { Upgrade = "echo", Connection = "Upgrade" },
    }))
    assert.equal(101, res.status)
    assert.is_nil(res:read())
    assert.is_false(res:keepalive())
    local sock = assert(res:socket())
    assert.equal("early bytes", sock:readn(11))
    sock:write("later")
    assert.equal("later", sock:readn(5))
    assert.truthy(got:find("Upgrade: echo", 1, true))
    sock:close()
    srv:close()
  end))
end)
