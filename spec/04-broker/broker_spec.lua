-- A real `justavps broker` in plain HTTP development mode against a real
-- backend on loopback: signed requests built by hand from the wire
-- contract, every check of the verification order, the target policy,
-- header rewriting, streaming, SSE and WebSocket.
--
-- Denied targets are never dialed: the broker rejects them before it
-- opens a connection, so these specs send no traffic to those addresses.
local core = require("justavps.core")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")
local websocket = require("justavps.websocket")
local json = require("justavps.json")
local bp = require("04-broker.broker_process")

local async = helpers.async


local function send_raw(port, text)
  local sock = raw.connect(port)
  sock:write(text)
  local res = assert(raw.read_response(sock))
  sock:close()
  return res, json.decode(res.body)
end


describe("broker", function()
  local broker, app, port, backend_port

  setup(function()
    helpers.run(function()
      app = bp.backend()
      backend_port = app:port()
      broker = bp.start({
        broker_id = bp.BROKER_ID,
        secret = bp.SECRET,
        insecure_plain_http = true,
        listen = { host = "127.0.0.1", port = 0 },
        nonce = { max_bytes = "1M" },
        target = {
          allow_networks = { "127.0.0.0/8" },
          deny_networks = { "127.0.0.2/32" },
        },
        upstream = { connect_timeout = 2, header_timeout = 2,
          idle_timeout = 2 },
      })
      assert(broker.port, "broker did not start; log:\n"
        .. table.concat(broker.lines, "\n"))
      port = broker.port
    end)
  end)

  teardown(function()
    helpers.run(function()
      local status = bp.stop(broker)
      app:close()
      assert.equal(0, status)

      -- Neither the secret nor any signature may reach the log.
      local text = table.concat(broker.lines, "\n")
      assert.is_nil(text:find(bp.SECRET, 1, true))
      assert.is_nil(text:find("v1=%x%x%x%x%x%x%x%x"))
    end)
  end)

  it("warns loudly about plain HTTP at start", function()
    local line = bp.log_matching(broker, "insecure_plain_http")
    assert.truthy(line:find("level=warn", 1, true))
  end)

  describe("a valid request", function()
    it("reaches the machine with rewritten headers", async(function()
      local f = bp.fields(backend_port, { target = "/a/b?x=1&y=%2F" })
      local res, _, seen = bp.send(port, f)
      assert.equal(200, res.status)
      assert.equal("GET", seen.method)
      assert.equal("/a/b?x=1&y=%2F", seen.target)
      local h = seen.headers
      assert.equal("app-1.example.test", h["host"])
      assert.equal("198.51.100.7", h["x-real-ip"])
      assert.equal("198.51.100.7", h["x-forwarded-for"])
      assert.equal("https", h["x-forwarded-proto"])
      assert.equal("app-1.example.test", h["x-forwarded-host"])
      for _, entry in ipairs(bp.HEADERS) do
        assert.is_nil(h[entry[2]:lower()], entry[2] .. " was forwarded")
      end
      assert.equal("yes", res:header("x-kept"))
      assert.is_nil(res:header("x-private"))
    end))

    it("matches a mixed-case Host lowercased", async(function()
      local f = bp.fields(backend_port, { host = "App-1.Example.TEST:8443" })
      local res, _, seen = bp.send(port, f)
      assert.equal(200, res.status)
      assert.equal("app-1.example.test:8443", seen.headers["x-forwarded-host"])
    end))

    it("accepts an IPv6 client address", async(function()
      local f = bp.fields(backend_port, { client = "2001:db8::7" })
      local res, _, seen = bp.send(port, f)
      assert.equal(200, res.status)
      assert.equal("2001:db8::7", seen.headers["x-forwarded-for"])
    end))

    it("accepts a timestamp within the skew", async(function()
      local f = bp.fields(backend_port,
        { ts = tostring(math.floor(core.time()) - 10) })
      local res = bp.send(port, f)
      assert.equal(200, res.status)
    end))

    it("streams a request body", async(function()
      local body = string.rep("b", 300 * 1024)
      local f = bp.fields(backend_port, { method = "POST", target = "/up" })
      local res, _, seen = bp.send(port, f, { body = body })
      -- This test once failed with a 500 that did not reproduce, so the
      -- failure message includes the broker's log.
      assert.equal(200, res.status, table.concat(broker.lines, "\n"))
      assert.equal("POST", seen.method)
      assert.equal(#body, seen.body_bytes)
    end))
  end)

  describe("a tampered field", function()
    local function later_ts(f)
      return tostring(tonumber(f.ts) - 1)
    end

    local cases = {
      { "method", function(s) s.method = "POST" end },
      { "host", function(s) s.host = "app-2.example.test" end },
      { "request-target", function(s) s.target = "/other" end },
      { "target IP", function(s) s.ip = "127.0.0.3" end },
      { "target port", function(s) s.port = tostring(backend_port + 1) end },
      { "slug", function(s) s.slug = "spec-other" end },
      { "client IP", function(s) s.client = "198.51.100.8" end },
      { "timestamp", function(s) s.ts = later_ts(s) end },
      { "nonce", function(s) s.nonce = assert(core.crypto.random_token(24)) end },
      { "signature", function(s)
        local last = s.sig:sub(-1) == "0" and "1" or "0"
        s.sig = s.sig:sub(1, -2) .. last
      end },
      { "secret", function(s)
        s.sig = bp.sign(s, "another-secret-0123456789abcdef0123")
      end },
    }

    for _, case in ipairs(cases) do
      it("in " .. case[1] .. " fails the signature", async(function()
        local s = bp.signed(bp.fields(backend_port))
        case[2](s)
        local res, _, body = bp.send(port, s)
        assert.equal(401, res.status)
        assert.equal("bad_signature", body.error.code)
      end))
    end

    it("in the broker id is a wrong broker", async(function()
      local s = bp.signed(bp.fields(backend_port))
      s.broker = "other-broker"
      local res, _, body = bp.send(port, s)
      assert.equal(401, res.status)
      assert.equal("wrong_broker", body.error.code)
    end))

    it("for another broker, signed, is a wrong broker", async(function()
      local f = bp.fields(backend_port, { broker = "other-broker" })
      local res, _, body = bp.send(port, f)
      assert.equal(401, res.status)
      assert.equal("wrong_broker", body.error.code)
    end))
  end)

  describe("a missing header", function()
    for _, entry in ipairs(bp.HEADERS) do
      it(entry[2] .. " is a 400", async(function()
        local f = bp.fields(backend_port)
        local res, _, body = bp.send(port, f, { skip = entry[2] })
        assert.equal(400, res.status)
        assert.equal("missing_header", body.error.code)
        assert.truthy(body.error.message:find(entry[2], 1, true))
      end))
    end

    it("Host is a 400", async(function()
      -- HTTP/1.0, because the server itself rejects an HTTP/1.1 request
      -- without Host before the broker sees it.
      local s = bp.signed(bp.fields(backend_port))
      local lines = { "GET / HTTP/1.0" }
      for _, entry in ipairs(bp.HEADERS) do
        lines[#lines + 1] = entry[2] .. ": " .. s[entry[1]]
      end
      local res, body = send_raw(port, table.concat(lines, "\r\n")
        .. "\r\n\r\n")
      assert.equal(400, res.status)
      assert.equal("missing_header", body.error.code)
      assert.truthy(body.error.message:find("Host", 1, true))
    end))
  end)

  it("does not forward a signed CONNECT", async(function()
    local s = bp.signed(bp.fields(backend_port, { method = "CONNECT",
      target = "127.0.0.1:" .. backend_port }))
    local lines = { "CONNECT " .. s.target .. " HTTP/1.1", "Host: " .. s.host }
    for _, entry in ipairs(bp.HEADERS) do
      lines[#lines + 1] = entry[2] .. ": " .. s[entry[1]]
    end
    local res, body = send_raw(port, table.concat(lines, "\r\n") .. "\r\n\r\n")
    assert.equal(405, res.status)
    assert.equal("method_not_allowed", body.error.code)
  end))

  describe("a malformed header", function()
    local sig = "v1=" .. string.rep("ab", 32)
    local cases = {
      { "ip", "localhost" }, { "ip", "127.0.0" }, { "ip", "127.0.0.01" },
      { "ip", "256.0.0.1" }, { "ip", "fe80::1%eth0" }, { "ip", "[::1]" },
      { "ip", "" },
      { "port", "0" }, { "port", "65536" }, { "port", "80a" },
      { "port", "080" }, { "port", "-1" }, { "port", "" },
      { "slug", "ab" }, { "slug", string.rep("a", 41) },
      { "slug", "Spec-Machine" }, { "slug", "spec_machine" },
      { "client", "client" }, { "client", "1.2.3.4, 5.6.7.8" },
      { "ts", "-5" }, { "ts", "12.5" }, { "ts", "abc" }, { "ts", "" },
      { "ts", "0123" },
      { "nonce", string.rep("n", 15) }, { "nonce", string.rep("n", 65) },
      { "nonce", "nonce-with-a-dot.1" }, { "nonce", "nonce with spaces!" },
      { "broker", "" }, { "broker", "spec broker" },
      { "sig", "v1=" .. string.rep("a", 63) },
      { "sig", "v1=" .. string.rep("a", 65) },
      { "sig", "v1=" .. string.rep("AB", 32) },
      { "sig", "v2=" .. string.rep("ab", 32) },
      { "sig", string.rep("ab", 32) },
    }

    for _, case in ipairs(cases) do
      local field, value = case[1], case[2]
      it(field .. " = " .. ("%q"):format(value) .. " is a 400", async(function()
        local f = bp.fields(backend_port, { sig = sig })
        f[field] = value
        local res, _, body = bp.send(port, f)
        assert.equal(400, res.status)
        assert.equal("invalid_header", body.error.code)
        local name
        for _, entry in ipairs(bp.HEADERS) do
          if entry[1] == field then
            name = entry[2]
          end
        end
        assert.truthy(body.error.message:find(name, 1, true),
          body.error.message)
      end))
    end

    it("sent twice is a 400", async(function()
      local f = bp.signed(bp.fields(backend_port))
      local res, _, body = bp.send(port, f, { headers = {
        ["X-JustAVPS-Slug"] = { f.slug, "spec-other" } } })
      assert.equal(400, res.status)
      assert.equal("invalid_header", body.error.code)
    end))
  end)

  describe("the timestamp", function()
    local offsets = { -3600, -60, -31, 31, 60, 3600 }
    for _, offset in ipairs(offsets) do
      it("at " .. offset .. " s is stale", async(function()
        local ts = math.floor(core.time()) + offset
        local f = bp.fields(backend_port, { ts = tostring(ts) })
        local res, _, body = bp.send(port, f)
        assert.equal(401, res.status)
        assert.equal("stale_timestamp", body.error.code)
      end))
    end
  end)

  describe("the nonce", function()
    it("is rejected when replayed", async(function()
      local s = bp.signed(bp.fields(backend_port))
      local res = bp.send(port, s)
      assert.equal(200, res.status)
      local again, _, body = bp.send(port, s)
      assert.equal(401, again.status)
      assert.equal("replayed_nonce", body.error.code)
    end))

    it("is not recorded when the signature fails", async(function()
      local f = bp.fields(backend_port)
      local forged = bp.signed(f)
      forged.sig = bp.sign(f, "another-secret-0123456789abcdef0123")
      local res = bp.send(port, forged)
      assert.equal(401, res.status)
      local ok = bp.send(port, f)
      assert.equal(200, ok.status)
    end))

    it("is recorded before the target policy runs", async(function()
      local s = bp.signed(bp.fields(backend_port, { ip = "10.0.0.1" }))
      local res = bp.send(port, s)
      assert.equal(403, res.status)
      local again, _, body = bp.send(port, s)
      assert.equal(401, again.status)
      assert.equal("replayed_nonce", body.error.code)
    end))
  end)

  describe("the target policy", function()
    local denied = {
      "169.254.169.254", "10.0.0.1", "192.168.1.1", "172.16.0.1",
      "100.64.0.1", "fe80::1", "fc00::1", "0.0.0.0", "224.0.0.1",
      "255.255.255.255", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
      "64:ff9b::a9fe:a9fe", "::1", "127.0.0.2",
    }

    for _, ip in ipairs(denied) do
      it("denies " .. ip .. " before dialing", async(function()
        local f = bp.fields(backend_port, { ip = ip, port = "80" })
        local res, _, body = bp.send(port, f)
        assert.equal(403, res.status)
        assert.equal("target_denied", body.error.code)
      end))
    end

    it("allows loopback when configured", async(function()
      local res = bp.send(port, bp.fields(backend_port, { ip = "127.0.0.1" }))
      assert.equal(200, res.status)
    end))
  end)

  describe("header rewriting", function()
    it("strips hop-by-hop and Connection-named headers", async(function()
      local f = bp.fields(backend_port)
      local res, _, seen = bp.send(port, f, { headers = {
        ["Connection"] = "X-Named, keep-alive",
        ["X-Named"] = "dropped",
        ["X-Custom"] = "kept",
        ["Keep-Alive"] = "timeout=5",
        ["Proxy-Authorization"] = "Basic c3B5OnNweQ==",
        ["TE"] = "trailers",
        ["Trailer"] = "X-Checksum",
      } })
      assert.equal(200, res.status)
      local h = seen.headers
      assert.equal("kept", h["x-custom"])
      assert.is_nil(h["x-named"])
      assert.is_nil(h["keep-alive"])
      assert.is_nil(h["proxy-authorization"])
      assert.is_nil(h["te"])
      assert.is_nil(h["trailer"])
    end))

    it("replaces the client's forwarding headers", async(function()
      local f = bp.fields(backend_port)
      local res, _, seen = bp.send(port, f, { headers = {
        ["X-Forwarded-For"] = "203.0.113.66, 10.0.0.1",
        ["X-Real-IP"] = "203.0.113.66",
        ["X-Forwarded-Proto"] = "gopher",
        ["X-Forwarded-Host"] = "evil.example",
        ["Forwarded"] = "for=6.6.6.6;proto=http",
        ["X-Forwarded-Prefix"] = "/evil",
      } })
      assert.equal(200, res.status)
      local h = seen.headers
      assert.equal("198.51.100.7", h["x-forwarded-for"])
      assert.equal("198.51.100.7", h["x-real-ip"])
      assert.equal("https", h["x-forwarded-proto"])
      assert.equal("app-1.example.test", h["x-forwarded-host"])
      assert.is_nil(h["forwarded"])
      assert.is_nil(h["x-forwarded-prefix"])
    end))
  end)

  describe("streaming", function()
    it("delivers SSE event by event", async(function()
      local s = bp.signed(bp.fields(backend_port, { target = "/sse" }))
      local res = assert(core.http.request{ host = "127.0.0.1", port = port,
        path = s.target, headers = bp.headers(s), timeout = 10 })
      assert.equal(200, res.status)
      local events, buffer = {}, ""
      while #events < 3 do
        local data = res:read()
        assert(data, "stream ended after " .. #events .. " events")
        buffer = buffer .. data
        for event in buffer:gmatch("data: (event %d)\n\n") do
          events[#events + 1] = event
        end
        buffer = buffer:gsub("data: event %d\n\n", "")
      end
      assert.same({ "event 1", "event 2", "event 3" }, events)
      res:close()
    end))

    it("pipes a WebSocket after the checks", async(function()
      local s = bp.signed(bp.fields(backend_port, { target = "/ws" }))
      local sock = assert(core.tcp.connect("127.0.0.1", port))
      sock:settimeout(10)
      local headers = bp.headers(s)
      headers.Host = nil
      assert(websocket.client_handshake(sock, { host = s.host, path = "/ws",
        headers = headers }))
      local conn = websocket.wrap(sock, { role = "client" })

      local report = assert(conn:recv())
      local seen = json.decode(report)
      assert.equal("198.51.100.7", seen["x-forwarded-for"])
      assert.is_nil(seen["x-justavps-signature"])

      assert(conn:send("through the broker", "text"))
      local data, kind = conn:recv()
      assert.equal("text", kind)
      assert.equal("through the broker", data)
      local blob = string.rep("\0\1\2\255", 40000)
      assert(conn:send(blob, "binary"))
      data, kind = conn:recv()
      assert.equal("binary", kind)
      assert.equal(blob, data)
      conn:close(1000, "done")
    end))

    it("rejects a WebSocket with a bad signature", async(function()
      local s = bp.signed(bp.fields(backend_port, { target = "/ws" }))
      s.slug = "spec-other"
      local sock = assert(core.tcp.connect("127.0.0.1", port))
      sock:settimeout(10)
      local headers = bp.headers(s)
      headers.Host = nil
      local ok, _, code, status = websocket.client_handshake(sock,
        { host = s.host, path = "/ws", headers = headers })
      sock:close()
      assert.is_nil(ok)
      assert.equal("bad_status", code)
      assert.equal(401, status)
    end))
  end)

  describe("an upstream failure", function()
    it("is a 502 when nothing listens", async(function()
      local probe = assert(core.tcp.listen{ host = "127.0.0.1", port = 0,
        on_accept = function() end })
      local closed = probe:port()
      probe:close()
      local f = bp.fields(backend_port, { port = tostring(closed) })
      local res, _, body = bp.send(port, f)
      assert.equal(502, res.status)
      assert.equal("upstream_unreachable", body.error.code)
    end))

    it("is a 502 upstream_closed when the machine closes unanswered",
      async(function()
        local rude = assert(core.tcp.listen{ host = "127.0.0.1", port = 0,
          on_accept = function(s)
            s:settimeout(5)
            s:readuntil("\r\n\r\n")
            s:close()
          end })
        local f = bp.fields(backend_port, { port = tostring(rude:port()) })
        local res, _, body = bp.send(port, f)
        rude:close()
        assert.equal(502, res.status)
        assert.equal("upstream_closed", body.error.code)
      end))

    it("is a 504 when the machine is slow", async(function()
      local f = bp.fields(backend_port, { target = "/slow" })
      local res, _, body = bp.send(port, f)
      assert.equal(504, res.status)
      assert.equal("upstream_timeout", body.error.code)
    end))
  end)
end)
