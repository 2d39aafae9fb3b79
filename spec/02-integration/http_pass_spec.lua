-- The HTTP server's fast path (core/http_pass.c): after a handler records
-- its forwarding decision with req:pass_learn, later GET and HEAD requests
-- with the same key on an admitted connection are forwarded in C, without
-- the handler. These specs count the handler's calls to see which path a
-- request took, and use raw upstreams to see the bytes each side sent.
local core = require("justavps.core")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")
local proxy = require("justavps.proxy")

local async = helpers.async

local OK = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


-- Starts a keep-alive upstream. respond(head, sock) returns the bytes to
-- send for the request head (without its final CRLF), or nil to close
-- the connection without a response. Every head is appended to seen.
local function upstream(seen, respond)
  respond = respond or function()
    return OK
  end
  return assert(core.tcp.listen({
    port = 0,
    on_accept = function(sock)
      sock:settimeout(10)
      seen.connections = (seen.connections or 0) + 1
      while true do
        local head = sock:readuntil("\r\n\r\n")
        if not head then
          break
        end
        seen[#seen + 1] = head
        local out = respond(head, sock)
        if out == nil or not sock:write(out) then
          break
        end
      end
      sock:close()
    end,
  }))
end


-- Starts a front server whose handler learns its decision for GET and
-- HEAD requests and forwards with proxy.forward. calls.n counts the
-- handler's runs; learn (default) can be overridden per spec.
local function front(port, calls, learn)
  learn = learn or {}
  return assert(core.http.listen({
    port = 0,
    access_log = false,
    handler = function(req)
      calls.n = (calls.n or 0) + 1
      calls.failure = req:pass_failure()
      local method = req.method
      local target = learn.target or "/app" .. req.path
      if method == "GET" or method == "HEAD" then
        assert(req:pass_learn({
          host = "127.0.0.1",
          port = port,
          target = target,
          set_headers = learn.set_headers,
          vary = learn.vary,
          timeout = learn.timeout or 5,
          stale_408 = learn.stale_408,
        }))
      end
      local query = req.query
      return proxy.forward(req, {
        host = "127.0.0.1",
        port = port,
        target = query and target .. "?" .. query or target,
        set_headers = learn.set_headers,
        timeout = learn.timeout or 5,
        stale_408 = learn.stale_408,
      })
    end,
  }))
end


local function get(sock, path, extra)
  assert(sock:write("GET " .. path .. " HTTP/1.1\r\nHost: front\r\n"
    .. (extra or "") .. "\r\n"))
  return assert(raw.read_response(sock))
end


local function cleanup(...)
  for _, server in ipairs({ ... }) do
    server:close()
  end
  proxy.close_pool()
end


describe("http fast path", function()
  it("forwards repeat requests without the handler", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen)
    local srv = front(up:port(), calls, {
      set_headers = { ["X-Forwarded-Prefix"] = "/p" } })
    local sock = raw.connect(srv:port())
    local before = core.http.pass_stats().passed

    for i = 1, 3 do
      local res = get(sock, "/x?q=" .. i, "X-Forwarded-Prefix: /evil\r\n"
        .. "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Kept: " .. i
        .. "\r\n")
      assert.equal(200, res.status)
      assert.equal("ok", res.body)
    end

    assert.equal(1, calls.n)
    assert.equal(before + 2, core.http.pass_stats().passed)
    assert.equal(3, #seen)
    for i = 2, 3 do
      local head = seen[i]
      assert.truthy(head:find("^GET /app/x%?q=" .. i .. " HTTP/1%.1\r\n"))
      assert.truthy(head:find("\r\nHost: front", 1, false))
      assert.truthy(head:find("\r\nX%-Kept: " .. i))
      assert.truthy(head:find("\r\nX%-Forwarded%-Prefix: /p"))
      assert.falsy(head:find("/evil", 1, true))
      assert.falsy(head:lower():find("x-hop", 1, true))
      assert.falsy(head:lower():find("\r\nconnection:", 1, true))
    end
    -- The two forwarded requests went over one pooled connection.
    assert.equal(2, seen.connections)
    sock:close()
    cleanup(srv, up)
  end))

  it("sends a new connection to the handler", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen)
    local srv = front(up:port(), calls)
    local a = raw.connect(srv:port())
    get(a, "/x")
    local b = raw.connect(srv:port())
    get(b, "/x")
    assert.equal(2, calls.n)
    get(b, "/x")
    assert.equal(2, calls.n)
    a:close()
    b:close()
    cleanup(srv, up)
  end))

  it("leaves other requests to the handler", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen, function(head, sock)
      local length = head:lower():match("content%-length: (%d+)")
      if length then
        sock:readn(tonumber(length))
      end
      return OK
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    assert.equal(1, calls.n)
    get(sock, "/y")
    assert.equal(2, calls.n)
    assert(sock:write("POST /x HTTP/1.1\r\nHost: front\r\n"
      .. "Content-Length: 2\r\n\r\nhi"))
    assert.equal(200, raw.read_response(sock).status)
    assert.equal(3, calls.n)
    assert(sock:write("GET /x HTTP/1.1\r\nHost: front\r\n"
      .. "Content-Length: 2\r\n\r\nhi"))
    assert.equal(200, raw.read_response(sock).status)
    assert.equal(4, calls.n)
    get(sock, "/x", "Expect: 100-continue\r\n")
    assert.equal(5, calls.n)
    get(sock, "/x")
    assert.equal(5, calls.n)
    sock:close()

    -- An upgrade request without a 101 response ends its connection.
    local up_sock = raw.connect(srv:port())
    get(up_sock, "/x")
    get(up_sock, "/x", "Connection: Upgrade\r\nUpgrade: websocket\r\n")
    assert.equal(7, calls.n)
    up_sock:close()
    cleanup(srv, up)
  end))

  it("keys decisions on the vary header", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen)
    local srv = front(up:port(), calls, { vary = "X-Forwarded-Host" })
    local sock = raw.connect(srv:port())
    get(sock, "/x", "X-Forwarded-Host: a\r\n")
    get(sock, "/x", "X-Forwarded-Host: a\r\n")
    assert.equal(1, calls.n)
    get(sock, "/x", "X-Forwarded-Host: b\r\n")
    assert.equal(2, calls.n)
    get(sock, "/x")
    assert.equal(3, calls.n)
    get(sock, "/x")
    get(sock, "/x", "X-Forwarded-Host: b\r\n")
    assert.equal(3, calls.n)
    sock:close()
    cleanup(srv, up)
  end))

  it("drops decisions on pass_reset", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    get(sock, "/x")
    assert.equal(1, calls.n)
    -- Without an argument the pooled connections stay.
    core.http.pass_reset()
    assert.equal(1, core.http.pass_stats().pooled)
    core.http.pass_reset(true)
    assert.equal(0, core.http.pass_stats().pooled)
    get(sock, "/x")
    assert.equal(2, calls.n)
    get(sock, "/x")
    assert.equal(2, calls.n)
    sock:close()
    cleanup(srv, up)
  end))

  it("relays each response framing", async(function()
    local responses = {
      ["/chunked"] = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
      ["/length"] = "HTTP/1.1 201 Created\r\nContent-Length: 5\r\n"
        .. "X-App: 1\r\nConnection: keep-alive, X-App\r\n\r\nhello",
      ["/nobody"] = "HTTP/1.1 204 No Content\r\n\r\n",
      ["/notmod"] = "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
      ["/hints"] = "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        .. "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nh",
      ["/many"] = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. string.rep("1\r\nz\r\n", 40) .. "0\r\n\r\n",
    }
    local seen, calls = {}, {}
    local up = upstream(seen, function(head)
      return responses[head:match("^%u+ /app(/%w+)")]
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    for path in pairs(responses) do
      get(sock, path)
    end
    local n = calls.n
    local res = get(sock, "/chunked")
    assert.equal("chunked", res.headers["transfer-encoding"])
    assert.equal("abcde", res.body)
    res = get(sock, "/length")
    assert.equal(201, res.status)
    assert.equal("5", res.headers["content-length"])
    assert.equal("hello", res.body)
    assert.is_nil(res.headers["x-app"])
    res = get(sock, "/nobody")
    assert.equal(204, res.status)
    res = get(sock, "/notmod")
    assert.equal(304, res.status)
    res = get(sock, "/hints")
    assert.equal(200, res.status)
    assert.equal("h", res.body)
    res = get(sock, "/many")
    assert.equal(string.rep("z", 40), res.body)
    assert(sock:write("HEAD /length HTTP/1.1\r\nHost: front\r\n\r\n"))
    res = assert(raw.read_response(sock, { head = true }))
    assert.equal(201, res.status)
    assert.equal("5", res.headers["content-length"])
    -- No body followed the HEAD's head: the next response reads whole.
    assert.equal("hello", get(sock, "/length").body)
    -- A decision holds for the path whatever the method: the HEAD too
    -- took the fast path.
    assert.equal(n, calls.n)
    sock:close()
    cleanup(srv, up)
  end))

  it("ends a close-delimited body", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen, function(_, sock)
      sock:write("HTTP/1.0 200 OK\r\n\r\nuntil-close")
      return nil
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    local res = get(sock, "/x")
    assert.equal(1, calls.n)
    assert.equal("until-close", res.body)
    assert.equal("chunked", res.headers["transfer-encoding"])
    assert.equal(2, seen.connections)
    assert.equal(0, core.http.pass_stats().pooled)
    sock:close()
    cleanup(srv, up)
  end))

  it("relays pipelined responses in order", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen, function(head)
      local n = head:match("^GET /app/(%d+)")
      return "HTTP/1.1 200 OK\r\nContent-Length: " .. #n .. "\r\n\r\n" .. n
    end)
    local srv = front(up:port(), calls, { target = "/app/1" })
    local sock = raw.connect(srv:port())
    get(sock, "/1")
    assert(sock:write(string.rep("GET /1 HTTP/1.1\r\nHost: f\r\n\r\n", 5)))
    for _ = 1, 5 do
      assert.equal("1", raw.read_response(sock).body)
    end
    assert.equal(1, calls.n)
    sock:close()
    cleanup(srv, up)
  end))

  it("streams a large response slowly", async(function()
    local size = 8 * 1024 * 1024
    local seen, calls = {}, {}
    local block = string.rep("b", 65536)
    local up = upstream(seen, function(_, sock)
      sock:write("HTTP/1.1 200 OK\r\nContent-Length: " .. size .. "\r\n\r\n")
      for _ = 1, size / #block do
        if not sock:write(block) then
          return nil
        end
      end
      return ""
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    sock:settimeout(20)
    get(sock, "/big")
    assert(sock:write("GET /big HTTP/1.1\r\nHost: f\r\n\r\n"))
    core.sleep(0.5) -- the proxy stops reading once the client lags
    local res = assert(raw.read_response(sock))
    assert.equal(size, #res.body)
    assert.equal(1, calls.n)
    assert.equal(0, core.http.pass_stats().exchanges)
    sock:close()
    cleanup(srv, up)
  end, 30))

  it("delivers stream pieces as they arrive", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen, function(_, sock)
      sock:write("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        .. "Transfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
      core.sleep(0.3)
      sock:write("7\r\ndata: 2\r\n0\r\n\r\n")
      return ""
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/sse")
    assert(sock:write("GET /sse HTTP/1.1\r\nHost: f\r\n\r\n"))
    local started = core.now()
    local head = assert(sock:readuntil("\r\n\r\n"))
    assert.truthy(head:find("chunked", 1, true))
    assert.equal("7", assert(sock:readuntil("\r\n")))
    assert.equal("data: 1", assert(sock:readn(7)))
    -- The first event arrived before the upstream sent the second.
    assert.is_true(core.now() - started < 0.3)
    assert.equal(1, calls.n)
    sock:close()
    cleanup(srv, up)
  end))
end)


describe("http fast path failures", function()
  it("reports a refused connect once", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen)
    local port = up:port()
    local srv = front(port, calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    -- The first request's connection stays in the Lua path's pool; the
    -- fast path has none and connects.
    up:close()
    local fallback = core.http.pass_stats().fallback
    local res = get(sock, "/x")
    assert.equal(502, res.status)
    assert.truthy(res.body:find('"upstream_unreachable"', 1, true))
    assert.equal("ECONNREFUSED", calls.failure)
    assert.equal(2, calls.n)
    assert.equal(fallback + 1, core.http.pass_stats().fallback)
    assert.equal(1, #seen)
    sock:close()
    cleanup(srv)
  end))

  it("reports a closed new connection", async(function()
    local seen, calls = {}, {}
    local close_now = false
    local up = upstream(seen, function()
      if close_now then
        return nil
      end
      return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close"
        .. "\r\n\r\nok"
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    close_now = true
    local before = #seen
    local res = get(sock, "/x")
    assert.equal(502, res.status)
    assert.truthy(res.body:find('"upstream_closed"', 1, true))
    assert.equal("closed", calls.failure)
    assert.equal(before + 1, #seen)
    sock:close()
    cleanup(srv, up)
  end))

  it("resends a GET after a pooled close", async(function()
    local seen, calls = {}, {}
    local served = setmetatable({}, { __mode = "k" })
    -- Each connection serves one request, then closes at the next one
    -- without a response, as an app does that closed it just then.
    local up = upstream(seen, function(_, sock)
      if served[sock] then
        return nil
      end
      served[sock] = true
      return OK
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    local fallback = core.http.pass_stats().fallback
    assert.equal(200, get(sock, "/x").status)
    local before = #seen
    assert.equal(200, get(sock, "/x").status)
    -- The pooled connection got the request and failed, and a new one
    -- carried it.
    assert.equal(before + 2, #seen)
    assert.equal(1, calls.n)
    assert.equal(fallback, core.http.pass_stats().fallback)
    sock:close()
    cleanup(srv, up)
  end))

  it("drops a pooled connection the upstream closed", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen, function(_, sock)
      sock:write(OK)
      return nil -- closes after each response without Connection: close
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    assert.equal(200, get(sock, "/x").status)
    assert.truthy(helpers.eventually(2, function()
      return core.http.pass_stats().pooled == 0
    end))
    assert.equal(200, get(sock, "/x").status)
    assert.equal(3, #seen)
    assert.equal(1, calls.n)
    sock:close()
    cleanup(srv, up)
  end))

  it("resends after a stale 408", async(function()
    local seen, calls = {}, {}
    local count = 0
    local up = upstream(seen, function()
      count = count + 1
      if count == 3 then
        return "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
          .. "Content-Length: 0\r\n\r\n"
      end
      return OK
    end)
    local srv = front(up:port(), calls, { stale_408 = true })
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    assert.equal(200, get(sock, "/x").status)
    assert.equal(200, get(sock, "/x").status)
    assert.equal(1, calls.n)
    assert.equal(4, count)
    sock:close()
    cleanup(srv, up)
  end))

  it("returns 504 for a silent upstream", async(function()
    local seen, calls = {}, {}
    local silent = false
    local up = upstream(seen, function()
      if silent then
        core.sleep(4)
        return nil
      end
      return OK
    end)
    local srv = front(up:port(), calls, { timeout = 1 })
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    silent = true
    local before = #seen
    local res = get(sock, "/x")
    assert.equal(504, res.status)
    assert.truthy(res.body:find('"upstream_timeout"', 1, true))
    assert.equal("timeout", calls.failure)
    assert.equal(before + 1, #seen)
    sock:close()
    cleanup(srv, up)
  end, 15))

  it("reports a malformed response", async(function()
    local seen, calls = {}, {}
    local bad = false
    local up = upstream(seen, function()
      if bad then
        return "HTTP/1.1 200 OK\nContent-Length: 2\n\nok"
      end
      return OK
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    bad = true
    local res = get(sock, "/x")
    assert.equal(502, res.status)
    assert.truthy(res.body:find('"upstream_error"', 1, true))
    assert.truthy(res.body:find("malformed response: bare LF", 1, true),
      res.body)
    assert.equal("protocol_error", calls.failure)
    sock:close()
    cleanup(srv, up)
  end))

  it("cuts a body the upstream broke", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen, function(head, sock)
      if head:find("^GET /app/cut") then
        sock:write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
          .. "2\r\nok\r\n")
        return nil
      end
      return OK
    end)
    local srv = front(up:port(), calls)
    -- The first connection's request runs the handler and learns /cut,
    -- and the second connection's second request takes the fast path.
    local a = raw.connect(srv:port())
    local b = raw.connect(srv:port())
    get(b, "/ok")
    for _, sock in ipairs({ a, b }) do
      assert(sock:write("GET /cut HTTP/1.1\r\nHost: f\r\n\r\n"))
      assert(sock:readuntil("\r\n\r\n"))
      local parts = {}
      while true do
        local data = sock:read()
        if not data then
          break
        end
        parts[#parts + 1] = data
      end
      assert.equal("2\r\nok\r\n", table.concat(parts))
      sock:close()
    end
    assert.equal(2, calls.n)
    cleanup(srv, up)
  end))

  it("answers a client that half-closed", async(function()
    local seen, calls = {}, {}
    local slow = false
    local up = upstream(seen, function()
      if slow then
        core.sleep(1.5)
      end
      return OK
    end)
    local srv = front(up:port(), calls)
    local sock = raw.connect(srv:port())
    get(sock, "/x")
    slow = true
    assert(sock:write("GET /x HTTP/1.1\r\nHost: f\r\n\r\n"))
    assert(sock:shutdown())
    local res = assert(raw.read_response(sock))
    assert.equal(200, res.status)
    assert.equal("ok", res.body)
    assert.equal(1, calls.n)
    sock:close()
    cleanup(srv, up)
  end))

  it("closes the upstream when the client leaves", async(function()
    local seen, calls = {}, {}
    local upstream_gone = false
    local up = upstream(seen, function(head, sock)
      if not head:find("\r\nX-Stream: 1", 1, true) then
        return OK
      end
      sock:write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "1\r\na\r\n")
      -- Silent from here on, so that no failed write to the client can
      -- end the exchange: only the check for a departed client can.
      local data, _, code = sock:read()
      upstream_gone = data == nil and (code == "closed"
        or code == "ECONNRESET")
      return nil
    end)
    -- A timeout above the wait below, so that only the client check can
    -- close the upstream connection in time.
    local srv = front(up:port(), calls, { timeout = 30 })
    local sock = raw.connect(srv:port())
    get(sock, "/stream")
    assert(sock:write("GET /stream HTTP/1.1\r\nHost: f\r\nX-Stream: 1"
      .. "\r\n\r\n"))
    assert(sock:readuntil("\r\n\r\n"))
    sock:close()
    assert.truthy(helpers.eventually(8, function()
      return upstream_gone
    end))
    assert.equal(0, core.http.pass_stats().exchanges)
    cleanup(srv, up)
  end, 15))
end)


describe("req:pass_learn", function()
  it("skips a decision made across a reset", async(function()
    local results = {}
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        if #results == 0 then
          -- As a machine event or a reload while the handler waited.
          core.http.pass_reset()
        end
        results[#results + 1] = req:pass_learn({ host = "127.0.0.2",
          port = 20001, target = "/" })
        return 200, {}, "done"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert.equal(200, get(sock, "/r").status)
    assert.equal(200, get(sock, "/r").status)
    assert.same({ false, true }, results)
    sock:close()
    srv:close()
  end))

  it("keeps learning past 256 upstreams", async(function()
    local learned = {}
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        local port = tonumber(req.path:match("^/(%d+)$"))
        learned[#learned + 1] = req:pass_learn({ host = "127.0.0.2",
          port = port, target = "/" })
        return 200, {}, "done"
      end,
    }))
    local sock = raw.connect(srv:port())
    for port = 20001, 20300 do
      assert.equal(200, get(sock, "/" .. port).status)
    end
    assert.equal(300, #learned)
    for i = 1, 300 do
      assert.is_true(learned[i], "decision " .. i)
    end
    sock:close()
    srv:close()
  end))


  it("rejects invalid options", async(function()
    local errors = {}
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        for _, opts in ipairs({
          {},
          { host = "127.0.0.1", port = 0, target = "/" },
          { host = "127.0.0.1", port = 80, target = "/a?b" },
          { host = "127.0.0.1", port = 80, target = "/a b" },
          { host = "127.0.0.1", port = 80, target = "/", vary = "a b" },
          { host = "127.0.0.1", port = 80, target = "/",
            set_headers = { ["X-A"] = "1\r\nX-B: 2" } },
          { host = "127.0.0.1", port = 80, target = "/", timeout = 0 },
        }) do
          local ok, err = pcall(req.pass_learn, req, opts)
          errors[#errors + 1] = not ok and tostring(err) or "accepted"
        end
        errors.ipv6 = req:pass_learn({ host = "::1", port = 80,
          target = "/" })
        return 200, {}, "done"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert.equal(200, get(sock, "/").status)
    assert.equal(7, #errors)
    assert.truthy(errors[1]:find("host, port", 1, true))
    assert.truthy(errors[2]:find("host, port", 1, true))
    assert.truthy(errors[3]:find("without query", 1, true))
    assert.truthy(errors[4]:find("without query", 1, true))
    assert.truthy(errors[5]:find("vary must be a header name", 1, true))
    assert.truthy(errors[6]:find("CR, LF or NUL", 1, true))
    assert.truthy(errors[7]:find("timeout must be a number", 1, true))
    assert.is_false(errors.ipv6)
    sock:close()
    srv:close()
  end))
end)


describe("req:pass", function()
  -- A front whose handler forwards each request with req:pass, and with
  -- proxy.forward when req:pass declines. calls records each run.
  local function pass_front(port, calls)
    local drop = core.http.header_names({ "x-drop" })
    return assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        local run = {}
        run.failure, run.message, run.connected, run.host, run.port =
          req:pass_failure()
        calls[#calls + 1] = run
        local opts = {
          host = "127.0.0.1",
          port = port,
          target = "/up" .. req.target,
          drop_headers = drop,
          extra_headers = "X-Extra: 1\r\n",
          timeout = 5,
        }
        run.taken, run.reason = req:pass(opts)
        if run.taken then
          return
        end
        return proxy.forward(req, opts)
      end,
    }))
  end

  it("forwards each request in C", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen)
    local srv = pass_front(up:port(), calls)
    local sock = raw.connect(srv:port())
    for _ = 1, 3 do
      local res = get(sock, "/a?b=1", "X-Drop: secret\r\nX-Kept: k\r\n")
      assert.equal(200, res.status)
      assert.equal("ok", res.body)
    end
    assert.equal(3, #calls)
    for i = 1, 3 do
      assert.is_true(calls[i].taken)
      local head = seen[i]
      assert.truthy(head:find("^GET /up/a%?b=1 HTTP/1%.1\r\n"))
      assert.falsy(head:lower():find("x-drop", 1, true))
      assert.truthy(head:find("\r\nX%-Kept: k"))
      assert.truthy(head:find("\r\nX%-Extra: 1"))
    end
    assert.equal(1, seen.connections)
    sock:close()
    cleanup(srv, up)
  end))

  it("replaces Host from set_headers once", async(function()
    local seen = {}
    local up = upstream(seen)
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        assert(req:pass({ host = "127.0.0.1", port = up:port(),
          target = req.target,
          set_headers = { Host = "machine.test", Cookie = "a=1" } }))
      end,
    }))
    local sock = raw.connect(srv:port())
    assert.equal(200, get(sock, "/h", "Cookie: secret=1\r\n").status)
    local _, hosts = seen[1]:lower():gsub("\r\nhost:", "")
    assert.equal(1, hosts)
    assert.truthy(seen[1]:find("\r\nHost: machine.test", 1, true))
    assert.truthy(seen[1]:find("\r\nCookie: a=1", 1, true))
    assert.falsy(seen[1]:find("secret", 1, true))
    sock:close()
    cleanup(srv, up)
  end))

  it("takes a hop's added Date past 100 fields", async(function()
    -- An app's 100 fields without Date reach an inner hop, which adds
    -- Date: the outer hop must accept 101 with HOP_MAX_HEADERS.
    local fields = {}
    for i = 1, 100 do
      fields[#fields + 1] = "X-F" .. i .. ": v"
    end
    local seen = {}
    local up = upstream(seen, function()
      return "HTTP/1.1 200 OK\r\n" .. table.concat(fields, "\r\n")
        .. "\r\nContent-Length: 2\r\n\r\nok"
    end)
    local inner = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        local opts = { host = "127.0.0.1", port = up:port(),
          target = req.target, timeout = 5, max_headers = 101 }
        if not req:pass(opts) then
          return proxy.forward(req, opts)
        end
      end,
    }))
    local function outer_front(max_headers)
      return assert(core.http.listen({
        port = 0,
        access_log = false,
        handler = function(req)
          local opts = { host = "127.0.0.1", port = inner:port(),
            target = req.target, timeout = 5, max_headers = max_headers }
          if req.method == "HEAD" or not req:pass(opts) then
            return proxy.forward(req, opts)
          end
        end,
      }))
    end
    local wide, narrow = outer_front(proxy.HOP_MAX_HEADERS), outer_front(nil)
    for _, method in ipairs({ "GET", "HEAD" }) do
      local sock = raw.connect(wide:port())
      assert(sock:write(method .. " / HTTP/1.1\r\nHost: f\r\n\r\n"))
      local res = assert(raw.read_response(sock, { head = method == "HEAD" }))
      assert.equal(200, res.status, method)
      assert.equal("v", res.headers["x-f100"])
      sock:close()
      sock = raw.connect(narrow:port())
      assert(sock:write(method .. " / HTTP/1.1\r\nHost: f\r\n\r\n"))
      res = assert(raw.read_response(sock, { head = method == "HEAD" }))
      assert.equal(502, res.status, method)
      sock:close()
    end
    cleanup(wide, narrow, inner, up)
  end))

  it("declines a request with a body", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen, function(_, sock)
      sock:readn(2)
      return OK
    end)
    local srv = pass_front(up:port(), calls)
    local sock = raw.connect(srv:port())
    assert(sock:write("POST / HTTP/1.1\r\nHost: f\r\nContent-Length: 2\r\n"
      .. "\r\nhi"))
    assert.equal(200, assert(raw.read_response(sock)).status)
    assert.is_false(calls[1].taken)
    assert.equal("not_passable", calls[1].reason)
    sock:close()
    cleanup(srv, up)
  end))

  it("reruns the handler after a failure", async(function()
    local seen, calls = {}, {}
    local up = upstream(seen)
    local port = up:port()
    up:close()
    local srv = pass_front(port, calls)
    local sock = raw.connect(srv:port())
    local res = get(sock, "/a")
    assert.equal(502, res.status)
    assert.truthy(res.body:find('"upstream_unreachable"', 1, true))
    assert.equal(2, #calls)
    assert.is_true(calls[1].taken)
    assert.is_nil(calls[1].failure)
    assert.equal("ECONNREFUSED", calls[2].failure)
    assert.is_false(calls[2].connected)
    assert.equal("127.0.0.1", calls[2].host)
    assert.equal(port, calls[2].port)
    assert.is_false(calls[2].taken)
    -- proxy.forward consumed the failure while it reported it.
    assert.equal(2, #calls)
    sock:close()
    cleanup(srv)
  end))

  it("rejects invalid options", async(function()
    local errors = {}
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        for _, opts in ipairs({
          { host = "127.0.0.1", port = 80 },
          { host = "127.0.0.1", port = 80, target = "/ x" },
          { host = "127.0.0.1", port = 80, target = "/",
            extra_headers = "Host: x\r\n" },
          { host = "127.0.0.1", port = 80, target = "/",
            drop_headers = { "x-a" } },
        }) do
          local ok, err = pcall(req.pass, req, opts)
          errors[#errors + 1] = not ok and tostring(err) or "accepted"
        end
        return 200, {}, "done"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert.equal(200, get(sock, "/").status)
    assert.truthy(errors[1]:find("target are required", 1, true))
    assert.truthy(errors[2]:find("without blanks", 1, true))
    assert.truthy(errors[3]:find("Host", 1, true))
    assert.truthy(errors[4]:find("core.http.header_names", 1, true))
    sock:close()
    srv:close()
  end))
end)


describe("req:pass_learn_target and req:pass_learn_edge", function()
  it("reject invalid options", async(function()
    local errors = {}
    local drop = core.http.header_names({ "x-a" })
    local nonces = assert(core.nonce.new({ max_bytes = 4096, ttl = 60 }))
    local target = { secret = "s", broker_id = "b", forwarded_proto = "http",
      nonces = nonces, drop_headers = drop, target_ip = "127.0.0.2",
      target_port = 80 }
    local edge = { ttl = 5, host = "h.test", prefix = "", target = "/",
      target_ip = "127.0.0.2", target_port = "80", slug = "box-1",
      broker_id = "b", secret = "s", broker_host = "127.0.0.2",
      broker_port = 8444, drop_headers = drop }
    local function without(opts, name, value)
      local copy = {}
      for k, v in pairs(opts) do
        copy[k] = v
      end
      copy[name] = value
      return copy
    end
    local srv = assert(core.http.listen({
      port = 0,
      access_log = false,
      handler = function(req)
        for _, case in ipairs({
          { req.pass_learn_target, without(target, "secret", nil) },
          { req.pass_learn_target, without(target, "drop_headers", {}) },
          { req.pass_learn_target, without(target, "nonces", {}) },
          { req.pass_learn_target, without(target, "clock_skew", 0) },
          { req.pass_learn_edge, without(edge, "slug", nil) },
          { req.pass_learn_edge, without(edge, "broker_port", 0) },
          { req.pass_learn_edge, without(edge, "drop_headers", { "x" }) },
          { req.pass_learn_edge, without(edge, "ttl", -1) },
        }) do
          local ok, err = pcall(case[1], req, case[2])
          errors[#errors + 1] = not ok and tostring(err) or "accepted"
        end
        -- Valid options whose target is no IPv4 literal are not recorded.
        errors.ipv6 = req:pass_learn_target(without(target, "target_ip",
          "::1"))
        errors.mismatch = req:pass_learn_edge(without(edge, "target", "/x"))
        return 200, {}, "done"
      end,
    }))
    local sock = raw.connect(srv:port())
    assert.equal(200, get(sock, "/").status)
    assert.truthy(errors[1]:find("secret, broker_id and forwarded_proto",
      1, true))
    assert.truthy(errors[2]:find("core.http.header_names", 1, true))
    assert.truthy(errors[3]:find("nonce_cache", 1, true))
    assert.truthy(errors[4]:find("clock_skew must be a number", 1, true))
    assert.truthy(errors[5]:find("option slug is required", 1, true))
    assert.truthy(errors[6]:find("broker_host and broker_port", 1, true))
    assert.truthy(errors[7]:find("core.http.header_names", 1, true))
    assert.truthy(errors[8]:find("ttl must be a number", 1, true))
    assert.is_false(errors.ipv6)
    assert.is_false(errors.mismatch)
    sock:close()
    srv:close()
    nonces:close()
  end))
end)


describe("core.fs.tcp_listeners", function()
  it("reports a missing file", function()
    local found, message, code = core.fs.tcp_listeners("/nonexistent/tcp")
    assert.is_nil(found)
    assert.truthy(message)
    assert.equal("ENOENT", code)
  end)
end)
