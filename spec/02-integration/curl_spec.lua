-- core.curl.request against real servers on loopback: core.http.listen for
-- HTTP and HTTPS (with a CA and a leaf from core.tls.generate) and raw
-- core.tcp listeners where the spec must see whether a connection came.
local core = require("justavps.core")
local helpers = require("support.helpers")

local async = helpers.async
local request = core.curl.request

local dir

local function path(name)
  return dir .. "/" .. name
end

-- Starts an HTTP server on a free loopback port with handler.
local function serve(handler, opts)
  opts = opts or {}
  opts.port = 0
  opts.handler = handler
  opts.access_log = false
  return assert(core.http.listen(opts))
end

local function url(srv, target, scheme, host)
  return (scheme or "http") .. "://" .. (host or "127.0.0.1") .. ":"
    .. srv:port() .. (target or "/")
end

local function read_all(req)
  local parts = {}
  while true do
    local data, err = req:read()
    if not data then
      assert(err == nil, err)
      break
    end
    parts[#parts + 1] = data
  end
  return table.concat(parts)
end

-- Returns a port on 127.0.0.1 that nothing listens on: one the kernel
-- handed out a moment ago and that was closed again.
local function closed_port()
  local listener = assert(core.tcp.listen({ port = 0, on_accept = function() end }))
  local port = listener:port()
  listener:close()
  return port
end

describe("core.curl.request", function()
  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir) == 0)
    assert(core.tls.generate({ ca = true, cn = "curl spec ca",
      cert_out = path("ca.pem"), key_out = path("ca.key") }))
    assert(core.tls.generate({ names = { "localhost", "127.0.0.1" },
      cert_out = path("leaf.pem"), key_out = path("leaf.key"),
      issuer_cert = path("ca.pem"), issuer_key = path("ca.key") }))
  end)

  teardown(function()
    os.execute("rm -rf " .. dir)
  end)

  it("returns status, headers and body of a GET", async(function()
    local seen
    local srv = serve(function(req)
      seen = {
        method = req.method,
        target = req.target,
        agent = req:header("user-agent"),
        one = req:header("x-one"),
        empty = req:header("x-empty"),
        multi = req:headers()["x-multi"],
        content_type = req:header("content-type"),
        expect = req:header("expect"),
      }
      return 201, { ["Content-Type"] = "text/plain", ["X-Reply"] = "yes" }, "hello\n"
    end)

    local res, err, code = request({
      url = url(srv, "/a?b=1"),
      headers = { ["X-One"] = "1", ["X-Multi"] = { "a", 2 }, ["X-Empty"] = "" },
      timeout = 5,
    })
    assert(res, tostring(err) .. " " .. tostring(code))
    assert.equal(201, res.status)
    assert.equal("1.1", res.version)
    assert.equal("text/plain", res.headers["content-type"])
    assert.equal("yes", res.headers["x-reply"])
    assert.equal("6", res.headers["content-length"])
    assert.is_nil(res.headers["X-Reply"])
    assert.equal("hello\n", res.body)
    assert.equal(url(srv, "/a?b=1"), res.effective_url)
    assert.equal(0, res.redirects)
    assert.is_number(res.timing.total)
    assert.is_number(res.timing.connect)
    assert.is_true(res.timing.total >= res.timing.connect)

    assert.equal("GET", seen.method)
    assert.equal("/a?b=1", seen.target)
    assert.equal("justavps/" .. core.version, seen.agent)
    assert.equal("1", seen.one)
    assert.equal("", seen.empty)
    assert.same({ "a", "2" }, seen.multi)
    assert.is_nil(seen.content_type)
    assert.is_nil(seen.expect)
    srv:close()
  end))

  it("sends a POST body and reads it back", async(function()
    local srv = serve(function(req)
      local body = read_all(req)
      return 200, {
        ["X-Method"] = req.method,
        ["X-Content-Type"] = req:header("content-type") or "none",
        ["X-Content-Length"] = req:header("content-length") or "none",
      }, body
    end)

    local payload = string.rep("0123456789", 20000) .. "\0end"
    local res = assert(request({ method = "POST", url = url(srv), body = payload,
      timeout = 5 }))
    assert.equal(200, res.status)
    assert.equal("POST", res.headers["x-method"])
    assert.equal("none", res.headers["x-content-type"])
    assert.equal(tostring(#payload), res.headers["x-content-length"])
    assert.equal(payload, res.body)

    res = assert(request({ method = "PUT", url = url(srv), body = "{}",
      headers = { ["Content-Type"] = "application/json" }, timeout = 5 }))
    assert.equal("PUT", res.headers["x-method"])
    assert.equal("application/json", res.headers["x-content-type"])
    assert.equal("{}", res.body)

    res = assert(request({ method = "POST", url = url(srv), timeout = 5 }))
    assert.equal("0", res.headers["x-content-length"])
    assert.equal("", res.body)
    srv:close()
  end))

  it("opens a fresh connection per call without reuse", async(function()
    local peers = {}
    local srv = serve(function(req)
      local ip, port = req:peer()
      peers[#peers + 1] = ip .. ":" .. port
      return 200, nil, "ok"
    end)
    for _ = 1, 2 do
      assert(request({ url = url(srv), timeout = 5 }))
    end
    for _ = 1, 2 do
      assert(request({ url = url(srv), reuse = false, timeout = 5 }))
    end
    srv:close()
    -- The first two share a pooled connection; each call without reuse
    -- comes from a new one.
    assert.equal(peers[1], peers[2])
    assert.are_not.equal(peers[2], peers[3])
    assert.are_not.equal(peers[3], peers[4])
  end))

  it("returns a repeated header as an array", async(function()
    local srv = serve(function()
      return 200, { ["Set-Cookie"] = { "a=1", "b=2", "c=3" }, ["X-Single"] = "s" }, ""
    end)
    local res = assert(request({ url = url(srv), timeout = 5 }))
    assert.same({ "a=1", "b=2", "c=3" }, res.headers["set-cookie"])
    assert.equal("s", res.headers["x-single"])
    assert.equal("", res.body)
    srv:close()
  end))

  it("sends HEAD without reading a body", async(function()
    local srv = serve(function()
      return 200, { ["Content-Type"] = "text/plain" }, "not sent"
    end)
    -- max_body applies to the bytes of a body, and HEAD brings none.
    local res = assert(request({ method = "HEAD", url = url(srv), max_body = 1, timeout = 5 }))
    assert.equal(200, res.status)
    assert.equal("8", res.headers["content-length"])
    assert.equal("", res.body)
    srv:close()
  end))

  describe("redirects", function()
    local function redirect_server()
      return serve(function(req)
        if req.path == "/from" then
          return 302, { Location = "/to" }, "moved"
        end
        return 200, { ["X-Final"] = "1" }, "arrived at " .. req.path
      end)
    end

    it("follows a 302 with follow=true", async(function()
      local srv = redirect_server()
      local res = assert(request({ url = url(srv, "/from"), follow = true, timeout = 5 }))
      assert.equal(200, res.status)
      assert.equal("arrived at /to", res.body)
      assert.equal(url(srv, "/to"), res.effective_url)
      assert.equal(1, res.redirects)
      assert.equal("1", res.headers["x-final"])
      assert.is_nil(res.headers["location"])
      srv:close()
    end))

    it("returns the 302 with follow=false", async(function()
      local srv = redirect_server()
      local res = assert(request({ url = url(srv, "/from"), timeout = 5 }))
      assert.equal(302, res.status)
      assert.equal("/to", res.headers["location"])
      assert.equal("moved", res.body)
      assert.equal(0, res.redirects)
      srv:close()
    end))

    it("applies max_body to the final body only", async(function()
      local srv = serve(function(req)
        if req.path == "/from" then
          return 302, { Location = "/to" }, string.rep("m", 1000)
        end
        return 200, {}, "short"
      end)
      local res, err, code = request({ url = url(srv, "/from"), follow = true, max_body = 100,
        timeout = 5 })
      assert(res, tostring(err) .. " " .. tostring(code))
      assert.equal(200, res.status)
      assert.equal("short", res.body)
      srv:close()
    end))

    it("resends methods and bodies as documented", async(function()
      local srv = serve(function(req)
        local body = read_all(req)
        local status = tonumber(req.path:match("^/status/(%d+)$"))
        if status then
          return status, { Location = "/to" }, ""
        end
        return 200, {}, req.method .. " " .. body
      end)
      local cases = {
        { "POST", 301, "GET " }, { "POST", 302, "GET " }, { "POST", 303, "GET " },
        { "POST", 307, "POST B" }, { "POST", 308, "POST B" },
        { "PUT", 301, "PUT B" }, { "PUT", 302, "PUT B" }, { "PUT", 303, "PUT B" },
        { "PUT", 307, "PUT B" }, { "DELETE", 302, "DELETE " },
      }
      for _, case in ipairs(cases) do
        local method, status, expected = case[1], case[2], case[3]
        local res, err = request({ method = method, url = url(srv, "/status/" .. status),
          body = method ~= "DELETE" and "B" or nil, follow = true, timeout = 5 })
        assert(res, err)
        assert.equal(expected, res.body, method .. " after " .. status)
      end
      srv:close()
    end))

    it("drops Authorization on another host or port", async(function()
      local function echo_credentials(req)
        local to = req.path:match("^/go/(.+)$")
        if to then
          return 302, { Location = to }, ""
        end
        return 200, {}, tostring(req:header("authorization")) .. " "
          .. tostring(req:header("cookie")) .. " " .. tostring(req:header("x-key"))
      end
      local first = serve(echo_credentials)
      local second = serve(echo_credentials)
      local headers = { Authorization = "Bearer secret", Cookie = "c=1", ["X-Key"] = "k" }
      local cases = {
        { "/to", "Bearer secret c=1 k" },
        { url(first, "/to", "http", "localhost"), "nil nil k" },
        { url(second, "/to"), "nil nil k" },
      }
      for _, case in ipairs(cases) do
        local res, err = request({ url = url(first, "/go/" .. case[1]), headers = headers,
          follow = true, timeout = 5 })
        assert(res, err)
        assert.equal(case[2], res.body, case[1])
      end
      first:close()
      second:close()
    end))

    it("stops after max_redirects", async(function()
      local srv = serve(function()
        return 302, { Location = "/again" }, ""
      end)
      local res, err, code = request({ url = url(srv), follow = true, max_redirects = 2,
        timeout = 5 })
      assert.is_nil(res)
      assert.equal("curl_error", code)
      assert.matches("redirect", err)
      srv:close()
    end))

    it("rejects a redirect to file://", async(function()
      local secret = path("secret.txt")
      local f = assert(io.open(secret, "w"))
      f:write("do not read")
      f:close()
      local srv = serve(function()
        return 302, { Location = "file://" .. secret }, ""
      end)
      local res, err, code = request({ url = url(srv), follow = true, timeout = 5 })
      assert.is_nil(res)
      assert.equal("protocol_error", code)
      assert.is_string(err)
      srv:close()
    end))
  end)

  it("times out against a handler that sleeps", async(function()
    local srv = serve(function()
      core.sleep(2)
      return 200, {}, "late"
    end)
    local started = core.now()
    local res, err, code = request({ url = url(srv), timeout = 0.3 })
    assert.is_nil(res)
    assert.equal("timeout", code)
    assert.matches("timed out", err)
    assert.is_true(core.now() - started < 1.5)
    srv:close()
  end))

  it("returns connect_failed for a closed port", async(function()
    local res, err, code = request({ url = "http://127.0.0.1:" .. closed_port() .. "/",
      timeout = 5 })
    assert.is_nil(res)
    assert.equal("connect_failed", code)
    assert.matches("127.0.0.1", err)
  end))

  describe("malformed responses", function()
    -- Starts a raw TCP server that reads one request head and writes reply.
    local function raw_server(reply)
      return assert(core.tcp.listen({ port = 0, on_accept = function(sock)
        sock:settimeout(5)
        if sock:readuntil("\r\n\r\n") then
          sock:write(reply)
        end
        sock:close()
      end }))
    end

    it("returns protocol_error without a status line", async(function()
      local listener = raw_server("not http at all\r\n\r\n")
      local res, err, code = request({ url = "http://127.0.0.1:" .. listener:port() .. "/",
        timeout = 5 })
      assert.is_nil(res)
      assert.equal("protocol_error", code)
      assert.is_string(err)
      listener:close()
    end))

    it("returns too_large for oversized headers", async(function()
      local lines = {}
      for i = 1, 300 do
        lines[i] = "X-Filler-" .. i .. ": " .. string.rep("f", 1000) .. "\r\n"
      end
      local listener = raw_server("HTTP/1.1 200 OK\r\n" .. table.concat(lines)
        .. "Content-Length: 0\r\n\r\n")
      local res, err, code = request({ url = "http://127.0.0.1:" .. listener:port() .. "/",
        timeout = 5 })
      assert.is_nil(res)
      assert.equal("too_large", code)
      assert.matches("headers", err)
      listener:close()
    end))
  end)

  describe("max_body", function()
    it("rejects a Content-Length over the limit", async(function()
      local srv = serve(function()
        return 200, {}, string.rep("x", 1000)
      end)
      local res, err, code = request({ url = url(srv), max_body = 100, timeout = 5 })
      assert.is_nil(res)
      assert.equal("too_large", code)
      assert.matches("max_body", err)

      res = assert(request({ url = url(srv), max_body = 1000, timeout = 5 }))
      assert.equal(1000, #res.body)
      srv:close()
    end))

    it("aborts a chunked body over the limit", async(function()
      local srv = serve(function(req)
        req:send_head(200)
        for _ = 1, 50 do
          if not req:write(string.rep("y", 1000)) then
            return
          end
        end
      end)
      local res, err, code = request({ url = url(srv), max_body = 10000, timeout = 5 })
      assert.is_nil(res)
      assert.equal("too_large", code)
      assert.matches("max_body", err)

      res = assert(request({ url = url(srv), max_body = 50000, timeout = 5 }))
      assert.equal(50000, #res.body)
      assert.equal("chunked", res.headers["transfer-encoding"])
      srv:close()
    end))
  end)

  describe("schemes other than http and https", function()
    it("rejects file:// without reading the file", async(function()
      local secret = path("secret.txt")
      local f = assert(io.open(secret, "w"))
      f:write("do not read")
      f:close()
      local res, err, code = request({ url = "file://" .. secret })
      assert.is_nil(res)
      assert.equal("protocol_error", code)
      assert.matches("only http and https", err)
      assert.not_matches("do not read", err)
    end))

    it("rejects ftp:// without connecting", async(function()
      local accepted = 0
      local listener = assert(core.tcp.listen({ port = 0, on_accept = function(sock)
        accepted = accepted + 1
        sock:close()
      end }))
      local res, _, code = request({ url = "ftp://127.0.0.1:" .. listener:port() .. "/" })
      assert.is_nil(res)
      assert.equal("protocol_error", code)
      core.sleep(0.1)
      assert.equal(0, accepted)
      listener:close()
    end))

    it("rejects a URL without a scheme", async(function()
      local res, _, code = request({ url = "127.0.0.1/" })
      assert.is_nil(res)
      assert.equal("curl_error", code)
    end))
  end)

  describe("https", function()
    local function tls_server()
      local ctx = assert(core.tls.server_context({ cert = path("leaf.pem"),
        key = path("leaf.key") }))
      return serve(function(req)
        return 200, {}, "secure " .. req.path
      end, { tls = ctx })
    end

    it("succeeds with the generated CA", async(function()
      local srv = tls_server()
      local res, err, code = request({ url = url(srv, "/x", "https"),
        ca_file = path("ca.pem"), timeout = 5 })
      assert(res, tostring(err) .. " " .. tostring(code))
      assert.equal(200, res.status)
      assert.equal("secure /x", res.body)
      assert.is_true(res.timing.appconnect > 0)

      res = assert(request({ url = url(srv, "/y", "https", "localhost"),
        ca_file = path("ca.pem"), timeout = 5 }))
      assert.equal("secure /y", res.body)
      srv:close()
    end))

    it("fails verification without the CA", async(function()
      local srv = tls_server()
      local res, err, code = request({ url = url(srv, "/", "https"), timeout = 5 })
      assert.is_nil(res)
      assert.equal("tls_error", code)
      assert.is_string(err)
      srv:close()
    end))

    it("skips verification with verify=false", async(function()
      local srv = tls_server()
      local res = assert(request({ url = url(srv, "/", "https"), verify = false,
        timeout = 5 }))
      assert.equal("secure /", res.body)
      srv:close()
    end))

    it("returns tls_error for a missing ca_file", async(function()
      local srv = tls_server()
      local res, _, code = request({ url = url(srv, "/", "https"),
        ca_file = path("missing.pem"), timeout = 5 })
      assert.is_nil(res)
      assert.equal("tls_error", code)
      srv:close()
    end))
  end)

  it("completes 20 concurrent requests", async(function()
    local in_handler, max_in_handler = 0, 0
    local srv = serve(function(req)
      in_handler = in_handler + 1
      max_in_handler = math.max(max_in_handler, in_handler)
      core.sleep(0.05)
      in_handler = in_handler - 1
      return 200, {}, req.path
    end)

    local results, done = {}, 0
    local finished = core.waiter()
    for i = 1, 20 do
      core.spawn(function()
        local res, err = request({ url = url(srv, "/" .. i), timeout = 5 })
        results[i] = res and res.body or err
        done = done + 1
        if done == 20 then
          finished:wake()
        end
      end)
    end
    if done < 20 then
      finished:wait(5)
    end

    assert.equal(20, done)
    for i = 1, 20 do
      assert.equal("/" .. i, results[i])
    end
    assert.is_true(max_in_handler > 1)
    srv:close()
  end))

  it("resolves localhost", async(function()
    local srv = serve(function()
      return 200, {}, "local"
    end)
    local res, err, code = request({ url = url(srv, "/", "http", "localhost"), timeout = 5 })
    assert(res, tostring(err) .. " " .. tostring(code))
    assert.equal("local", res.body)
    assert.is_number(res.timing.namelookup)
    srv:close()
  end))

  it("exits cleanly with a transfer in flight", function()
    local script = path("in_flight.lua")
    local f = assert(io.open(script, "w"))
    f:write([[
local core = require("justavps.core")
local srv = assert(core.http.listen({ port = 0, access_log = false,
  handler = function()
    core.sleep(5)
    return 200, {}, "late"
  end }))
core.spawn(function()
  core.curl.request({ url = "http://127.0.0.1:" .. srv:port() .. "/" })
  print("request returned")
end)
core.timer(0.2, function()
  core.stop()
end)
core.run()
print("exiting")
]])
    f:close()
    local cpath = (os.getenv("JV_BUILD_DIR") or "build") .. "/lua/?.so"
    local set_cpath = "package.cpath = \"" .. cpath .. ";\" .. package.cpath"
    local child = assert(io.popen("luajit -e '" .. set_cpath .. "' " .. script
      .. " 2>&1; echo status=$?"))
    local output = child:read("*a")
    child:close()
    assert.matches("exiting\nstatus=0", output)
    assert.not_matches("request returned", output)
  end)

  describe("misuse", function()
    it("raises on CR or LF in a header value", async(function()
      local opts = { url = "http://127.0.0.1:1/", headers = { ["X-A"] = "a\r\nX-B: b" } }
      assert.has_error(function()
        request(opts)
      end)
      opts.headers = { ["X-A"] = { "ok", "bad\n" } }
      assert.has_error(function()
        request(opts)
      end)
    end))

    it("raises on a bad header name", async(function()
      assert.has_error(function()
        request({ url = "http://127.0.0.1:1/", headers = { ["X A"] = "1" } })
      end)
      assert.has_error(function()
        request({ url = "http://127.0.0.1:1/", headers = { ["Content-Length"] = "1" } })
      end)
    end))

    it("raises on unknown options and bad types", async(function()
      assert.has_error(function()
        request({ url = "http://127.0.0.1:1/", header = {} })
      end)
      assert.has_error(function()
        request({ url = "http://127.0.0.1:1/", timeout = "5" })
      end)
      assert.has_error(function()
        request({ url = "http://127.0.0.1:1/", timeout = -1 })
      end)
      assert.has_error(function()
        request({ url = "http://127.0.0.1:1/", verify = 0 })
      end)
      assert.has_error(function()
        request({ method = "GET" })
      end)
      assert.has_error(function()
        request({ url = "http://127.0.0.1:1/", method = "G T" })
      end)
    end))

    it("raises outside a core coroutine", function()
      assert.has_error(function()
        request({ url = "http://127.0.0.1:1/" })
      end)
    end)
  end)
end)
