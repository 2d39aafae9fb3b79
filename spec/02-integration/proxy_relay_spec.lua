-- justavps.proxy.forward's relay of the upstream response with res:relay:
-- the head and the body bytes already read go out in one write, and a body
-- that arrived whole ends the response without req:finish. These specs
-- cover the cases around that shortcut: a body that arrives after the
-- head, many small chunks, bodyless answers, several requests on one
-- client connection with the upstream connection reused. Also covers
-- req:peer on a kept-alive connection and req:forward_head with small and
-- large set_headers and drop_headers tables.
local cjson = require("cjson")
local core = require("justavps.core")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")
local proxy = require("justavps.proxy")
local log = require("justavps.log")

local async = helpers.async


-- Starts a raw upstream that answers each request head read on a
-- connection with respond(sock, head, n), n counting the requests on that
-- connection; stats.connections counts accepted connections.
local function upstream(stats, respond)
  return assert(core.tcp.listen({
    port = 0,
    on_accept = function(sock)
      stats.connections = (stats.connections or 0) + 1
      sock:settimeout(5)
      local n = 0
      while true do
        local head = sock:readuntil("\r\n\r\n")
        if not head then
          break
        end
        n = n + 1
        if respond(sock, head, n) == false then
          break
        end
      end
      sock:close()
    end,
  }))
end


-- Starts a server that forwards each request to the upstream at port,
-- with the options in extra added to proxy.forward's, after before(req)
-- when given.
local function front(port, extra, before)
  return assert(core.http.listen({
    port = 0,
    access_log = false,
    handler = function(req)
      if before then
        before(req)
      end
      local opts = { host = "127.0.0.1", port = port, timeout = 5 }
      for name, value in pairs(extra or {}) do
        opts[name] = value
      end
      return proxy.forward(req, opts)
    end,
  }))
end


local GET = "GET / HTTP/1.1\r\nHost: app\r\n\r\n"


describe("proxy relay of the upstream response", function()
  after_each(function()
    proxy.close_pool()
  end)

  it("relays a body that arrives after the head", async(function()
    local up = upstream({}, function(sock)
      sock:write("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
      core.sleep(0.05)
      sock:write("first")
      core.sleep(0.05)
      sock:write("-last")
    end)
    local srv = front(up:port())
    local sock = raw.connect(srv:port())
    assert(sock:write(GET))
    local res = assert(raw.read_response(sock))
    assert.equal(200, res.status)
    assert.equal("10", res.headers["content-length"])
    assert.equal("first-last", res.body)
    sock:close()
    srv:close()
    up:close()
  end))

  it("relays an answer sent before the whole body", async(function()
    -- The upstream rejects the request on its head and closes, as the
    -- core server does with a Content-Length above max_body.
    local up = upstream({}, function(sock)
      sock:write("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n"
        .. "Connection: close\r\n\r\ntoo large")
      return false
    end)
    local srv = front(up:port())
    local sock = raw.connect(srv:port())
    sock:settimeout(3)
    -- Three bytes of a million, then the client waits for a response.
    assert(sock:write("PUT /up HTTP/1.1\r\nHost: app\r\n"
      .. "Content-Length: 1000000\r\n\r\nabc"))
    local res = assert(raw.read_response(sock))
    assert.equal(413, res.status)
    assert.equal("too large", res.body)
    -- The rest of the body would be read as the next request.
    assert.is_true(raw.is_closed(sock))
    sock:close()
    srv:close()
    up:close()
  end))

  it("answers 502 when the upstream dies during the body", async(function()
    -- It reads a little of the body and closes with the rest unread,
    -- which resets the connection.
    local up = upstream({}, function(sock)
      sock:read(1000)
      return false
    end)
    local srv = front(up:port())
    for _ = 1, 5 do
      local sock = raw.connect(srv:port())
      sock:settimeout(5)
      assert(sock:write("PUT /up HTTP/1.1\r\nHost: app\r\n"
        .. "Content-Length: 800000\r\n\r\n"))
      -- The body goes out while the response is read. The write ends
      -- with an error once the proxy closes.
      core.spawn(function()
        sock:write(("x"):rep(800000))
      end)
      local res = assert(raw.read_response(sock))
      assert.equal(502, res.status, res.body)
      -- A reset or a broken pipe after the connect: the upstream closed
      -- the connection, it was not unreachable.
      assert.equal("upstream_closed", cjson.decode(res.body).error.code,
        res.body)
      sock:close()
    end
    srv:close()
    up:close()
  end))

  it("closes a silent upstream once the client has gone", async(function()
    local upstream_saw = core.waiter()
    local seen
    local up = upstream({}, function(sock)
      sock:settimeout(20)
      sock:write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "5\r\nfirst\r\n")
      -- Then nothing, as a command that prints nothing more.
      local data, _, code = sock:read()
      seen = data or code
      upstream_saw:wake()
      return false
    end)
    -- A read timeout longer than the wait below, so that only the check
    -- can end the upstream connection in time.
    local srv = assert(core.http.listen({ port = 0, access_log = false,
      handler = function(req)
        return proxy.forward(req, { host = "127.0.0.1", port = up:port(),
          timeout = 30 })
      end }))
    local sock = raw.connect(srv:port())
    assert(sock:write(GET))
    assert(sock:readuntil("first", 4096))
    sock:close()
    upstream_saw:wait(10)
    assert.equal("closed", seen)
    srv:close()
    up:close()
  end))

  it("answers 408 when the client's body stops arriving", async(function()
    local up = upstream({}, function(sock)
      sock:settimeout(10)
      while sock:read() do
      end
      return false
    end)
    local failed = 0
    local srv = assert(core.http.listen({ port = 0, access_log = false,
      idle_timeout = 0.5, handler = function(req)
        local ok, status, headers, body = pcall(proxy.forward, req,
          { host = "127.0.0.1", port = up:port(), timeout = 10 })
        if not ok then
          failed = failed + 1
          error(status, 0)
        end
        return status, headers, body
      end }))
    local sock = raw.connect(srv:port())
    sock:settimeout(5)
    assert(sock:write("PUT /up HTTP/1.1\r\nHost: app\r\n"
      .. "Content-Length: 100000\r\n\r\n" .. ("x"):rep(1000)))
    local res = assert(raw.read_response(sock))
    assert.equal(408, res.status, res.body)
    assert.truthy(res.body:find("request_timeout", 1, true), res.body)
    assert.is_true(raw.is_closed(sock))
    assert.equal(0, failed)
    sock:close()
    srv:close()
    up:close()
  end))

  it("streams a body to an upstream that answers while it reads",
    async(function()
      local got = {}
      local up = upstream({}, function(sock, head)
        local length = tonumber(head:match("[Cc]ontent%-[Ll]ength: (%d+)"))
        sock:write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        local left = length
        while left > 0 do
          local data = assert(sock:read(left))
          left = left - #data
          got[#got + 1] = data
          sock:write(string.format("%x\r\n%s\r\n", #data, data))
        end
        sock:write("0\r\n\r\n")
      end)
      local srv = front(up:port())
      local sock = raw.connect(srv:port())
      sock:settimeout(3)
      assert(sock:write("POST /echo HTTP/1.1\r\nHost: app\r\n"
        .. "Content-Length: 10\r\n\r\nfirst"))
      core.sleep(0.1)
      assert(sock:write("-last"))
      local res = assert(raw.read_response(sock))
      assert.equal(200, res.status)
      assert.equal("first-last", res.body)
      assert.equal("first-last", table.concat(got))
      sock:close()
      srv:close()
      up:close()
    end))

  it("joins many small chunks that arrive with the head", async(function()
    local parts, expected = {}, {}
    for i = 1, 40 do
      local piece = string.format("%02d", i)
      parts[#parts + 1] = "2\r\n" .. piece .. "\r\n"
      expected[#expected + 1] = piece
    end
    local up = upstream({}, function(sock)
      sock:write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. table.concat(parts) .. "0\r\n\r\n")
    end)
    local srv = front(up:port())
    local sock = raw.connect(srv:port())
    assert(sock:write(GET))
    local res = assert(raw.read_response(sock))
    assert.equal("chunked", res.headers["transfer-encoding"])
    assert.equal(table.concat(expected), res.body)
    sock:close()
    srv:close()
    up:close()
  end))

  it("ends a 204 and a 304 without a body", async(function()
    local up = upstream({}, function(sock, _, n)
      if n == 1 then
        sock:write("HTTP/1.1 204 No Content\r\n\r\n")
      else
        sock:write("HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")
      end
    end)
    local srv = front(up:port())
    local sock = raw.connect(srv:port())
    assert(sock:write(GET))
    local res = assert(raw.read_response(sock, { head = true }))
    assert.equal(204, res.status)
    assert.is_nil(res.headers["transfer-encoding"])
    assert(sock:write(GET))
    res = assert(raw.read_response(sock, { head = true }))
    assert.equal(304, res.status)
    assert.equal("\"x\"", res.headers["etag"])
    sock:close()
    srv:close()
    up:close()
  end))

  it("serves keep-alive requests over one reused upstream connection",
    async(function()
      local stats = {}
      local up = upstream(stats, function(sock, _, n)
        local body = "reply " .. n
        sock:write("HTTP/1.1 200 OK\r\nContent-Length: " .. #body
          .. "\r\n\r\n" .. body)
      end)
      local srv = front(up:port())
      local sock = raw.connect(srv:port())
      for n = 1, 5 do
        assert(sock:write(GET))
        local res = assert(raw.read_response(sock))
        assert.equal(200, res.status)
        assert.equal("reply " .. n, res.body)
      end
      assert.equal(1, stats.connections)
      sock:close()
      srv:close()
      up:close()
    end))

  describe("when the upstream closed the pooled connection", function()
    -- The front closes the upstream's end of the pooled connection itself
    -- right before it forwards, so the close reaches the kernel but not
    -- the event loop: the proxy takes the pooled socket without having
    -- seen the close.
    local function run(method, body)
      local stats, ends = {}, {}
      local up = upstream(stats, function(sock, head)
        ends[#ends + 1] = sock
        local length = tonumber(head:match("[Cc]ontent%-[Ll]ength: (%d+)"))
        local got = length and sock:readn(length) or ""
        local reply = head:match("^(%u+)") .. " " .. got
        sock:write("HTTP/1.1 200 OK\r\nContent-Length: " .. #reply
          .. "\r\n\r\n" .. reply)
      end)
      local srv = front(up:port(), nil, function(req)
        if req.target == "/second" then
          ends[1]:close()
        end
      end)
      local sock = raw.connect(srv:port())
      sock:settimeout(5)
      assert(sock:write("GET /first HTTP/1.1\r\nHost: app\r\n\r\n"))
      assert.equal(200, assert(raw.read_response(sock)).status)
      assert(sock:write(method .. " /second HTTP/1.1\r\nHost: app\r\n"
        .. (body and "Content-Length: " .. #body .. "\r\n" or "")
        .. "\r\n" .. (body or "")))
      local res = assert(raw.read_response(sock))
      sock:close()
      srv:close()
      up:close()
      return res, stats.connections
    end

    it("sends a GET again on a new connection", async(function()
      local res, connections = run("GET")
      assert.equal(200, res.status)
      assert.equal("GET ", res.body)
      assert.equal(2, connections)
    end))

    it("keeps a request with a body off it", async(function()
      local res, connections = run("POST", "data")
      assert.equal(200, res.status)
      assert.equal("POST data", res.body)
      assert.equal(2, connections)
    end))
  end)

  describe("when the upstream wrote a 408 on the pooled connection",
    function()
      -- As some app servers do before they close an idle connection. The
      -- front writes it from the upstream's end right before it forwards,
      -- so it reaches the kernel but not the event loop.
      local STALE = "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
        .. "Content-Length: 5\r\n\r\nstale"

      -- stale is the 408 the front writes; stale_408 the proxy option.
      -- Returns the second response and the connections the upstream saw.
      local function run(method, stale, stale_408)
        local stats, ends = {}, {}
        local up = upstream(stats, function(sock, head)
          ends[#ends + 1] = sock
          local reply = head:match("^(%u+ %S+)")
          sock:write("HTTP/1.1 200 OK\r\nContent-Length: " .. #reply
            .. "\r\n\r\n" .. reply)
        end)
        local srv = front(up:port(), { stale_408 = stale_408 },
          function(req)
            if req.target == "/second" then
              assert(ends[1]:write(stale))
            end
          end)
        local sock = raw.connect(srv:port())
        sock:settimeout(5)
        assert(sock:write("GET /first HTTP/1.1\r\nHost: app\r\n\r\n"))
        assert.equal(200, assert(raw.read_response(sock)).status)
        assert(sock:write(method .. " /second HTTP/1.1\r\nHost: app\r\n"
          .. "Content-Length: 0\r\n\r\n"))
        local res = assert(raw.read_response(sock))
        sock:close()
        srv:close()
        up:close()
        return res, stats.connections
      end

      it("resends a GET with stale_408",
        async(function()
          local res, connections = run("GET", STALE, true)
          assert.equal(200, res.status)
          assert.equal("GET /second", res.body)
          assert.equal(2, connections)
        end))

      it("keeps a POST off the connection", async(function()
        local res, connections = run("POST", STALE, true)
        assert.equal(200, res.status)
        assert.equal("POST /second", res.body)
        assert.equal(2, connections)
      end))

      it("relays it without stale_408",
        async(function()
          -- At a broker or an edge, a 408 is a response the next hop
          -- relayed. Resending would run the request twice, and through
          -- the edge it would repeat a signed nonce.
          local res, connections = run("GET", STALE, nil)
          assert.equal(408, res.status)
          assert.equal("stale", res.body)
          assert.equal(1, connections)
        end))

      it("relays a 408 that keeps the connection open", async(function()
        local res, connections = run("GET", "HTTP/1.1 408 Request Timeout"
          .. "\r\nContent-Length: 4\r\n\r\nslow", true)
        assert.equal(408, res.status)
        assert.equal("slow", res.body)
        assert.equal(1, connections)
      end))

      it("relays a 408 read on a new connection", async(function()
        local up = upstream({}, function(sock)
          sock:write(STALE)
          return false
        end)
        local srv = front(up:port(), { stale_408 = true })
        local sock = raw.connect(srv:port())
        assert(sock:write(GET))
        local res = assert(raw.read_response(sock))
        assert.equal(408, res.status)
        assert.equal("stale", res.body)
        sock:close()
        srv:close()
        up:close()
      end))
    end)

  describe("pool sweep", function()
    local saved

    before_each(function()
      saved = proxy.pool_sweep_seconds
      proxy.pool_sweep_seconds = 0.1
    end)

    after_each(function()
      proxy.pool_sweep_seconds = saved
    end)

    it("closes pooled sockets whose upstream closed them", async(function()
      local ends = {}
      local up = upstream({}, function(sock)
        ends[#ends + 1] = sock
        sock:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
      end)
      local srv = front(up:port())
      local clients = {}
      for i = 1, 3 do
        clients[i] = raw.connect(srv:port())
        assert(clients[i]:write(GET))
      end
      for i = 1, 3 do
        assert.equal(200, assert(raw.read_response(clients[i])).status)
      end
      assert.equal(3, proxy.pooled())
      for _, sock in ipairs(ends) do
        sock:close()
      end
      assert.truthy(helpers.eventually(3, function()
        return proxy.pooled() == 0
      end))
      for i = 1, 3 do
        clients[i]:close()
      end
      srv:close()
      up:close()
    end))

    it("closes sockets idle longer than pool_idle", async(function()
      local stats = {}
      local up = upstream(stats, function(sock)
        sock:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
      end)
      local srv = front(up:port(), { pool_idle = 0.3 })
      local sock = raw.connect(srv:port())
      assert(sock:write(GET))
      assert.equal(200, assert(raw.read_response(sock)).status)
      assert(sock:write(GET))
      assert.equal(200, assert(raw.read_response(sock)).status)
      assert.equal(1, stats.connections)
      assert.truthy(helpers.eventually(3, function()
        return proxy.pooled() == 0
      end))
      assert(sock:write(GET))
      assert.equal(200, assert(raw.read_response(sock)).status)
      assert.equal(2, stats.connections)
      sock:close()
      srv:close()
      up:close()
    end))

    it("keeps live sockets and reuses them", async(function()
      local stats = {}
      local up = upstream(stats, function(sock)
        sock:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
      end)
      local srv = front(up:port())
      local sock = raw.connect(srv:port())
      assert(sock:write(GET))
      assert.equal(200, assert(raw.read_response(sock)).status)
      core.sleep(0.5)
      assert.equal(1, proxy.pooled())
      assert(sock:write(GET))
      assert.equal(200, assert(raw.read_response(sock)).status)
      assert.equal(1, stats.connections)
      sock:close()
      srv:close()
      up:close()
    end))
  end)

  describe("when a pooled connection fails after the request went out",
    function()
      -- The upstream reads the second request on the pooled connection
      -- and closes it without a response, the first time only. seen
      -- counts the second requests that reached it.
      local function run(method, timeout, delay, body, chunked)
        local seen = 0
        local up = upstream({}, function(sock, head)
          if head:find(" /second ", 1, true) then
            seen = seen + 1
            if seen == 1 then
              if delay then
                core.sleep(delay)
              end
              return false
            end
          end
          local reply = "ok"
          local length = tonumber(head:match("[Cc]ontent%-[Ll]ength: (%d+)"))
          if length and length > 0 then
            reply = sock:readn(length)
          elseif head:find("[Cc]hunked") then
            reply = ""
            while true do
              local size = tonumber(sock:readuntil("\r\n"), 16)
              if size == 0 then
                sock:readuntil("\r\n")
                break
              end
              reply = reply .. sock:readn(size)
              sock:readuntil("\r\n")
            end
          end
          sock:write("HTTP/1.1 200 OK\r\nContent-Length: " .. #reply
            .. "\r\n\r\n" .. reply)
        end)
        local srv = front(up:port(), { timeout = timeout })
        local sock = raw.connect(srv:port())
        sock:settimeout(5)
        assert(sock:write("GET /first HTTP/1.1\r\nHost: app\r\n\r\n"))
        assert.equal(200, assert(raw.read_response(sock)).status)
        body = body or ""
        if chunked then
          assert(sock:write(method .. " /second HTTP/1.1\r\nHost: app\r\n"
            .. "Transfer-Encoding: chunked\r\n\r\n"
            .. string.format("%x", #body) .. "\r\n" .. body .. "\r\n0\r\n\r\n"))
        else
          assert(sock:write(method .. " /second HTTP/1.1\r\nHost: app\r\n"
            .. "Content-Length: " .. #body .. "\r\n\r\n" .. body))
        end
        local res = assert(raw.read_response(sock))
        sock:close()
        srv:close()
        up:close()
        return res, seen
      end

      it("stops pooling for a while",
        async(function()
          -- An app that closes each connection after its response without
          -- Connection: close fails every POST on a reused connection, so
          -- after the first failure requests get new connections.
          local stats = {}
          local up = upstream(stats, function(sock, head)
            if head:find(" /second ", 1, true) then
              return false
            end
            sock:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
          end)
          local srv = front(up:port())
          local sock = raw.connect(srv:port())
          sock:settimeout(5)
          assert(sock:write(GET))
          assert.equal(200, assert(raw.read_response(sock)).status)
          assert.equal(1, proxy.pooled())
          local messages = {}
          local previous = log.set_default(log.new({
            write = function(_, msg, fields)
              messages[#messages + 1] = msg .. " port=" .. tostring(fields.port)
            end,
            enabled = function() return true end,
          }))
          assert(sock:write("POST /second HTTP/1.1\r\nHost: app\r\n"
            .. "Content-Length: 0\r\n\r\n"))
          local res = raw.read_response(sock)
          log.set_default(previous)
          assert.equal(502, assert(res).status)
          local logged = table.concat(messages, "\n")
          assert.truthy(logged:find("new connections only for a while port="
            .. up:port(), 1, true), logged)
          sock:close()
          local before = stats.connections
          for _ = 1, 3 do
            sock = raw.connect(srv:port())
            assert(sock:write(GET))
            assert.equal(200, assert(raw.read_response(sock)).status)
            sock:close()
            assert.equal(0, proxy.pooled())
          end
          assert.equal(before + 3, stats.connections)
          srv:close()
          up:close()
        end))

      it("sends an idempotent request again", async(function()
        local res, seen = run("DELETE")
        assert.equal(200, res.status)
        assert.equal(2, seen)
      end))

      it("resends a PUT with its body", async(function()
        local res, seen = run("PUT", nil, nil, '{"name":"value"}')
        assert.equal(200, res.status)
        assert.equal('{"name":"value"}', res.body)
        assert.equal(2, seen)
      end))

      it("resends a chunked PUT with its body", async(function()
        local res, seen = run("PUT", nil, nil, ("c"):rep(3000), true)
        assert.equal(200, res.status)
        assert.equal(("c"):rep(3000), res.body)
        assert.equal(2, seen)
      end))

      it("answers 502 to a large PUT",
        async(function()
          local res, seen = run("PUT", nil, nil, ("b"):rep(64 * 1024 + 1))
          assert.equal(502, res.status)
          assert.equal(1, seen)
        end))

      it("answers 502 to a POST with a body",
        async(function()
          local res, seen = run("POST", nil, nil, "data")
          assert.equal(502, res.status)
          assert.equal(1, seen)
        end))

      it("answers 502 to a bodyless POST", async(function()
        local res, seen = run("POST")
        assert.equal(502, res.status)
        assert.equal("upstream_closed", cjson.decode(res.body).error.code)
        assert.equal(1, seen)
      end))

      it("answers 504 to a timed-out GET",
        async(function()
          local res, seen = run("GET", 0.2, 0.5)
          assert.equal(504, res.status)
          assert.equal(1, seen)
        end))
    end)

  it("answers pipelined requests in order", async(function()
    local up = upstream({}, function(sock, head)
      local path = head:match("^GET (%S+)")
      sock:write("HTTP/1.1 200 OK\r\nContent-Length: " .. #path
        .. "\r\n\r\n" .. path)
    end)
    local srv = front(up:port())
    local sock = raw.connect(srv:port())
    assert(sock:write("GET /a HTTP/1.1\r\nHost: app\r\n\r\n"
      .. "GET /bb HTTP/1.1\r\nHost: app\r\n\r\n"))
    local first = assert(raw.read_response(sock))
    local second = assert(raw.read_response(sock))
    assert.equal("/a", first.body)
    assert.equal("/bb", second.body)
    sock:close()
    srv:close()
    up:close()
  end))

  it("closes the client connection when the upstream body is cut short",
    async(function()
      local up = upstream({}, function(sock)
        sock:write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        return false
      end)
      local srv = front(up:port())
      local sock = raw.connect(srv:port())
      assert(sock:write(GET))
      local head = assert(sock:readuntil("\r\n\r\n"))
      assert.truthy(head:find("Content-Length: 100", 1, true))
      local rest = sock:read(100)
      assert.equal("partial", rest)
      local after, err = sock:read(100)
      assert.is_nil(after)
      assert.truthy(err)
      sock:close()
      srv:close()
      up:close()
    end))
end)


describe("req:peer on a kept-alive connection", function()
  it("returns the same address for every request", async(function()
    local seen = {}
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        local ip, port = req:peer()
        seen[#seen + 1] = ip .. " " .. port
        return 200, nil, "ok"
      end,
    }))
    local sock = raw.connect(srv:port())
    for _ = 1, 3 do
      assert(sock:write(GET))
      assert.equal(200, assert(raw.read_response(sock)).status)
    end
    assert.equal(3, #seen)
    assert.equal(seen[1], seen[2])
    assert.equal(seen[1], seen[3])
    assert.truthy(seen[1]:find("^127%.0%.0%.1 %d+$"))
    sock:close()
    srv:close()
  end))
end)


describe("req:forward_head name sets", function()
  -- Returns the head forward_head builds for request under set and drop.
  local function forward_head(request, set, drop)
    local head
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        head = req:forward_head("127.0.0.1", 8080, nil, set, drop)
        return 200, nil, "ok"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert(sock:write(request))
    assert(raw.read_response(sock))
    sock:close()
    srv:close()
    return head
  end

  local REQUEST = "GET / HTTP/1.1\r\nHost: app\r\nX-Keep: 1\r\n"
    .. "X-Drop-70: 1\r\nx-set-3: old\r\n\r\n"

  for _, count in ipairs({ 10, 100 }) do
    it("drops and replaces names with " .. count .. " entries",
      async(function()
        local drop, set = {}, {}
        for i = 1, count do
          drop["x-drop-" .. i] = true
          set["X-Set-" .. i] = "new"
        end
        local head = forward_head(REQUEST, set, drop)
        assert.truthy(head:find("\r\nX-Keep: 1\r\n", 1, true))
        assert.truthy(head:find("\r\nHost: app\r\n", 1, true))
        assert.falsy(head:find("old", 1, true))
        assert.truthy(head:find("\r\nX-Set-3: new\r\n", 1, true))
        if count >= 70 then
          assert.falsy(head:find("X-Drop-70", 1, true))
        else
          assert.truthy(head:find("\r\nX-Drop-70: 1\r\n", 1, true))
        end
      end))
  end
end)


describe("core.http.header_names", function()
  it("keeps names in lower case and order", function()
    local names = core.http.header_names({ "X-One", "two", "Three-3" })
    assert.same({ "x-one", "two", "three-3" }, names:list())
    assert.is_true(names:has("X-ONE"))
    assert.is_true(names:has("three-3"))
    assert.is_false(names:has("x-on"))
    assert.is_false(names:has("four"))
  end)

  it("rejects invalid lists", function()
    local cases = {
      { "an empty name", { "" } },
      { "a colon", { "x:y" } },
      { "a space", { "x y" } },
      { "a non-string", { 1 } },
      { "a name listed twice", { "X-A", "x-a" } },
    }
    for _, case in ipairs(cases) do
      assert.has_error(function()
        core.http.header_names(case[2])
      end, nil, case[1])
    end
    local many = {}
    for i = 1, 65 do
      many[i] = "x-" .. i
    end
    assert.has_error(function()
      core.http.header_names(many)
    end)
  end)
end)


describe("req:header_values and forward_head with a name list", function()
  -- Runs fn(req) in a server's handler for request and returns what fn
  -- returned, as a table.
  local function with_request(request, fn)
    local results
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        results = { fn(req) }
        return 200, nil, "ok"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert(sock:write(request))
    assert(raw.read_response(sock))
    sock:close()
    srv:close()
    return results
  end

  local REQUEST = "GET / HTTP/1.1\r\nHost: app\r\nX-Once: 1\r\n"
    .. "x-twice: a\r\nX-Twice: b\r\nX-Empty: \r\nX-Drop: 1\r\n\r\n"

  it("returns one value, false or nil per name", async(function()
    local names = core.http.header_names({ "x-once", "X-Twice", "x-none",
      "x-empty", "host" })
    local got = with_request(REQUEST, function(req)
      return req:header_values(names)
    end)
    assert.equal("1", got[1])
    assert.is_false(got[2])
    assert.is_nil(got[3])
    assert.equal("", got[4])
    assert.equal("app", got[5])
  end))

  it("rejects a table in place of a list", async(function()
    local got = with_request(REQUEST, function(req)
      return pcall(req.header_values, req, { "x-once" })
    end)
    assert.is_false(got[1])
    assert.truthy(tostring(got[2]):find("header_names", 1, true))
  end))

  it("drops the listed names in forward_head", async(function()
    local drop = core.http.header_names({ "x-drop", "X-TWICE" })
    local got = with_request(REQUEST, function(req)
      return req:forward_head("127.0.0.1", 8080, nil,
        { ["X-Set"] = "new" }, drop)
    end)
    local head = got[1]
    assert.truthy(head:find("\r\nX-Once: 1\r\n", 1, true))
    assert.truthy(head:find("\r\nHost: app\r\n", 1, true))
    assert.truthy(head:find("\r\nX-Set: new\r\n", 1, true))
    assert.falsy(head:lower():find("x-drop", 1, true))
    assert.falsy(head:lower():find("x-twice", 1, true))
  end))

  it("drops the listed names when set_headers overflows", async(function()
    local drop = core.http.header_names({ "x-drop" })
    local set = {}
    for i = 1, 100 do
      set["X-Set-" .. i] = "new"
    end
    local got = with_request(REQUEST, function(req)
      return req:forward_head("127.0.0.1", 8080, nil, set, drop)
    end)
    local head = got[1]
    assert.truthy(head:find("\r\nX-Once: 1\r\n", 1, true))
    assert.truthy(head:find("\r\nX-Set-100: new\r\n", 1, true))
    assert.falsy(head:lower():find("x-drop", 1, true))
  end))
end)


describe("req:forward_head extra_headers", function()
  -- Returns what pcall of forward_head with extra returned, as a table.
  local function forward_extra(extra)
    local results
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        results = { pcall(req.forward_head, req, "127.0.0.1", 8080, nil,
          nil, core.http.header_names({ "x-a" }), extra) }
        return 200, nil, "ok"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert(sock:write("POST / HTTP/1.1\r\nHost: app\r\nX-A: old\r\n"
      .. "Content-Length: 2\r\n\r\nhi"))
    assert(raw.read_response(sock))
    sock:close()
    srv:close()
    return results
  end

  it("adds the lines before the framing", async(function()
    local got = forward_extra("X-A: new\r\nX-B: two words\r\nX-C:\r\n")
    assert.is_true(got[1])
    assert.equal("POST / HTTP/1.1\r\nHost: app\r\nX-A: new\r\n"
      .. "X-B: two words\r\nX-C:\r\nContent-Length: 2\r\n\r\n", got[2])
  end))

  it("accepts an empty string", async(function()
    local got = forward_extra("")
    assert.is_true(got[1])
    assert.equal("POST / HTTP/1.1\r\nHost: app\r\n"
      .. "Content-Length: 2\r\n\r\n", got[2])
  end))

  local BAD = {
    { "a line without CRLF", "X-A: new" },
    { "a bare LF", "X-A: new\n" },
    { "a CR in a value", "X-A: n\rew\r\n" },
    { "a NUL in a value", "X-A: n\0ew\r\n" },
    { "a line without a colon", "X-A new\r\n" },
    { "an empty name", ": new\r\n" },
    { "a space in a name", "X A: new\r\n" },
    { "a Host line", "Host: other\r\n" },
    { "a Content-Length line", "content-length: 5\r\n" },
    { "a hop-by-hop line", "Transfer-Encoding: chunked\r\n" },
    { "a Connection line", "Connection: close\r\n" },
    { "a bad second line", "X-A: new\r\nX-B\r\n" },
  }
  for _, case in ipairs(BAD) do
    it("rejects " .. case[1], async(function()
      local got = forward_extra(case[2])
      assert.is_false(got[1])
      assert.truthy(tostring(got[2]):find("extra_headers", 1, true))
    end))
  end
end)


describe("req:forward_head Content-Length", function()
  -- The server keeps header values back to back in one buffer that it
  -- reuses on a kept-alive connection, so bytes of the first head follow
  -- the second head's last value.
  it("reads only the value's own digits", async(function()
    local lengths = {}
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        local _, mode, length = req:forward_head("127.0.0.1", 8080)
        lengths[#lengths + 1] = { mode, length }
        while req:read() do
        end
        return 200, nil, "ok"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert(sock:write("GET / HTTP/1.1\r\nHost: app\r\nX-Pad: "
      .. string.rep("9", 40) .. "\r\n\r\n"))
    assert.equal(200, assert(raw.read_response(sock)).status)
    assert(sock:write("POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 2"
      .. "\r\n\r\nhi"))
    assert.equal(200, assert(raw.read_response(sock)).status)
    sock:close()
    srv:close()
    assert.same({ "none", nil }, lengths[1])
    assert.same({ "length", 2 }, lengths[2])
  end))

  it("drops the spaces llhttp keeps after the value", async(function()
    local seen
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        local head, mode, length = req:forward_head("127.0.0.1", 8080)
        seen = { head = head, mode = mode, length = length }
        while req:read() do
        end
        return 200, nil, "ok"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert(sock:write("POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5  "
      .. "\r\n\r\nhello"))
    assert.equal(200, assert(raw.read_response(sock)).status)
    sock:close()
    srv:close()
    assert.equal("length", seen.mode)
    assert.equal(5, seen.length)
    assert.truthy(seen.head:find("\r\nContent-Length: 5\r\n", 1, true),
      seen.head)
  end))
end)
