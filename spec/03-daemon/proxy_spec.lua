-- The daemon's public listener against a real backend: every path form,
-- streaming both ways, SSE event by event, WebSocket echo through the
-- proxy, the traversal forms and the broker-network check.
local core = require("justavps.core")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")
local websocket = require("justavps.websocket")
local json = require("justavps.json")

local async = helpers.async

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")


local function sh(cmd)
  assert(os.execute(cmd) == 0, "command failed: " .. cmd)
end


local function temp_dir()
  local dir = os.tmpname()
  os.remove(dir)
  sh("mkdir -p " .. dir)
  return dir
end


-- Starts a daemon with the given config table; returns the process and
-- the ports of its listeners.
local function start_daemon(conf)
  local dir = temp_dir()
  local path = dir .. "/config.json"
  local f = assert(io.open(path, "w"))
  local text = json.encode(conf)
  assert.is_string(text)
  f:write(text)
  f:close()

  local p = assert(core.proc.spawn{
    file = BIN,
    args = { "daemon", "--config", path, "--access-log=false" },
    env = helpers.child_env(),
    stdin = "null", stdout = "null", stderr = "pipe",
  })

  local ports, lines = {}, {}
  local ready = core.waiter()
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      lines[#lines + 1] = line
      local name, port = line:match("msg=listening .*listener=(%w+) .*port=(%d+)")
      if name then
        ports[name] = tonumber(port)
        if ports.public and ports.internal then
          ready:wake()
        end
      end
    end
  end)

  if not (ports.public and ports.internal) then
    ready:wait(10)
  end
  assert(ports.public, "daemon did not start; log:\n" .. table.concat(lines, "\n"))
  return p, ports, lines, dir
end


local function stop_daemon(p, dir)
  p:kill("SIGTERM")
  assert.equal(0, p:wait(10))
  os.execute("rm -rf " .. dir)
end


-- A backend that reports what it received.
local function backend()
  return assert(core.http.listen{
    port = 0,
    access_log = false,
    max_body = 2 * 1024 * 1024 * 1024,
    handler = function(req)
      if req.path == "/sse" then
        req:send_head(200, { ["Content-Type"] = "text/event-stream" })
        for i = 1, 3 do
          req:write("data: event " .. i .. "\n\n")
          core.sleep(0.05)
        end
        return
      end

      if req.path == "/ws" then
        local ok, key = websocket.check_request(req.method, function(name)
          return req:header(name)
        end)
        assert(ok)
        local sock = req:hijack()
        websocket.server_handshake(sock, key)
        local conn = websocket.wrap(sock, { role = "server" })
        while true do
          local data, kind = conn:recv()
          if not data or kind == "close" then
            break
          end
          conn:send(data, kind)
        end
        return
      end

      if req.path == "/count" then
        local total = 0
        while true do
          local data = req:read()
          if not data then
            break
          end
          total = total + #data
        end
        return 200, nil, tostring(total)
      end

      return 200, { ["Content-Type"] = "application/json",
        ["Connection"] = "X-Private", ["X-Private"] = "hop",
        ["X-Kept"] = "yes" },
        json.encode({
          target = req.target,
          prefix = req:header("x-forwarded-prefix") or json.null,
          custom = req:header("x-custom") or json.null,
          named = req:header("x-named") or json.null,
        })
    end,
  })
end


local function get(port, target, headers)
  local res = assert(core.http.request{ host = "127.0.0.1", port = port,
    path = target, headers = headers, timeout = 10 })
  local body = res:read_body()
  res:close()
  return res, body
end


describe("daemon proxy", function()
  local p, ports, dir, app

  setup(function()
    helpers.run(function()
      app = backend()
      local _
      p, ports, _, dir = start_daemon({
        slug = "spec-1", token = "0123456789abcdef0123",
        public = { host = "127.0.0.1", port = 0 },
        internal = { host = "127.0.0.1", port = 0 },
        broker_cidrs = { "127.0.0.0/8" },
        routing = { default_port = app:port(), denied_ports = { 1 } },
        toolbox_root = "/tmp", state_dir = "/tmp",
      })
    end)
  end)

  teardown(function()
    helpers.run(function()
      stop_daemon(p, dir)
      app:close()
    end)
  end)

  it("forwards /_port/PORT with the prefix stripped", async(function()
    local res, body = get(ports.public, "/_port/" .. app:port() .. "/a/b?x=1")
    assert.equal(200, res.status)
    local seen = json.decode(body)
    assert.equal("/a/b?x=1", seen.target)
    assert.equal("/_port/" .. app:port(), seen.prefix)
  end))

  it("omits the prefix for a port host", async(function()
    local port = app:port()
    local res, body = get(ports.public, "/_port/" .. port .. "/a", {
      ["X-Forwarded-Host"] = port .. "-box.example.test" })
    assert.equal(200, res.status)
    local seen = json.decode(body)
    assert.equal("/a", seen.target)
    assert.equal(json.null, seen.prefix)

    -- Another port's host keeps it.
    res, body = get(ports.public, "/_port/" .. port .. "/a", {
      ["X-Forwarded-Host"] = "1" .. port .. "-box.example.test" })
    assert.equal(200, res.status)
    assert.equal("/_port/" .. port, json.decode(body).prefix)
  end))

  it("forwards the numeric shortcut", async(function()
    local res, body = get(ports.public, "/" .. app:port() .. "/c/")
    assert.equal(200, res.status)
    local seen = json.decode(body)
    assert.equal("/c/", seen.target)
    assert.equal("/" .. app:port(), seen.prefix)
  end))

  it("sends other paths to the default port", async(function()
    local res, body = get(ports.public, "/index.html?q=2")
    assert.equal(200, res.status)
    local seen = json.decode(body)
    assert.equal("/index.html?q=2", seen.target)
    assert.equal(json.null, seen.prefix)
  end))

  it("strips hop-by-hop and Connection-named headers", async(function()
    local res, body = get(ports.public, "/_port/" .. app:port() .. "/h", {
      ["X-Custom"] = "kept", ["X-Named"] = "dropped",
      ["Connection"] = "X-Named", ["Keep-Alive"] = "timeout=5",
    })
    local seen = json.decode(body)
    assert.equal("kept", seen.custom)
    assert.equal(json.null, seen.named)
    assert.equal("yes", res:header("x-kept"))
    assert.is_nil(res:header("x-private"))
  end))

  local rejected = {
    { "/_port/" .. "99999/x", 400, "invalid_port" },
    { "/_port/0/x", 400, "invalid_port" },
    { "/_port/abc/x", 400, "invalid_port" },
    { "/_port/1/x", 403, "port_denied" },
    { "/_port/3000/../3001/x", 400, "bad_path" },
    { "/_port/3000/%2e%2e/3001", 400, "bad_path" },
    { "/_port/3000/%2E./x", 400, "bad_path" },
    { "/_port/3000/a%2fb", 400, "bad_path" },
    { "/_port/3000/a%5cb", 400, "bad_path" },
    { "/_pty/../_port/3000", 400, "bad_path" },
  }

  for _, case in ipairs(rejected) do
    it("rejects " .. case[1], async(function()
      -- A raw client: curl and most libraries would normalise the path.
      local sock = raw.connect(ports.public)
      sock:write("GET " .. case[1] .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      local res = assert(raw.read_response(sock))
      sock:close()
      assert.equal(case[2], res.status)
      assert.equal(case[3], json.decode(res.body).error.code)
    end))
  end

  it("names the closed port in a 502", async(function()
    local probe = assert(core.tcp.listen{ port = 0, on_accept = function() end })
    local closed = probe:port()
    probe:close()
    -- A port on another loopback address cannot be reached through the
    -- proxy, so the 502 does not list it.
    local elsewhere = assert(core.tcp.listen{ host = "127.0.0.2", port = 0,
      on_accept = function(s) s:close() end })
    local elsewhere_port = elsewhere:port()
    core.sleep(2.5)
    local res, body = get(ports.public, "/_port/" .. closed .. "/")
    elsewhere:close()
    assert.equal(502, res.status)
    local err = json.decode(body).error
    assert.equal("port_not_listening", err.code)
    assert.truthy(err.message:find(tostring(closed), 1, true))
    assert.equal(closed, err.port)
    local listed, other = false, false
    for _, listening_port in ipairs(err.listening) do
      listed = listed or listening_port == app:port()
      other = other or listening_port == elsewhere_port
    end
    assert.is_true(listed, "the backend's port is not among the listening")
    assert.is_false(other, "a port on 127.0.0.2 is listed")
  end, 20))

  it("tells an app that closed apart from a closed port", async(function()
    -- The app accepts, reads the request and closes without a response.
    -- It is asked at once, before the port watcher can have seen it: the
    -- accepted connection alone shows that something listens.
    local rude = assert(core.tcp.listen{ port = 0, on_accept = function(s)
      s:settimeout(5)
      s:readuntil("\r\n\r\n")
      s:close()
    end })
    local rude_port = rude:port()
    local res, body = get(ports.public, "/_port/" .. rude_port .. "/")
    rude:close()
    assert.equal(502, res.status)
    local err = json.decode(body).error
    assert.equal("app_closed_connection", err.code)
    assert.truthy(err.message:find(tostring(rude_port), 1, true),
      err.message)
  end, 20))

  -- On one keep-alive connection, the second request to a path takes
  -- the server's fast path (core/http_pass.c) with the decision the
  -- first one cached.
  it("keeps the prefix rule per forwarded host on one connection",
    async(function()
    local port = app:port()
    local sock = raw.connect(ports.public)
    local path = "/_port/" .. port .. "/same"
    local cases = { port .. "-box.example.test", false,
      port .. "-box.example.test", "box.example.test", false }
    for _, _ in ipairs({ 1, 2 }) do
      for _, host in ipairs(cases) do
        assert(sock:write("GET " .. path .. "?k=v HTTP/1.1\r\nHost: box\r\n"
          .. (host and "X-Forwarded-Host: " .. host .. "\r\n" or "")
          .. "\r\n"))
        local res = assert(raw.read_response(sock))
        assert.equal(200, res.status)
        local seen = json.decode(res.body)
        assert.equal("/same?k=v", seen.target)
        if host and host:find("^%d") then
          assert.equal(json.null, seen.prefix)
        else
          assert.equal("/_port/" .. port, seen.prefix)
        end
      end
    end
    sock:close()
  end))

  it("names a port that closed after serving on the same connection",
    async(function()
    local gone = assert(core.http.listen{ port = 0, access_log = false,
      handler = function()
        return 200, nil, "here"
      end })
    local port = gone:port()
    local sock = raw.connect(ports.public)
    for _ = 1, 3 do
      assert(sock:write("GET /_port/" .. port .. "/ HTTP/1.1\r\n"
        .. "Host: box\r\n\r\n"))
      assert.equal("here", assert(raw.read_response(sock)).body)
    end
    gone:close()
    gone:close_all()
    assert(sock:write("GET /_port/" .. port .. "/ HTTP/1.1\r\n"
      .. "Host: box\r\n\r\n"))
    local res = assert(raw.read_response(sock))
    assert.equal(502, res.status)
    local err = json.decode(res.body).error
    -- The pooled connection fails first; the new one is refused. The
    -- port watcher may have seen the port open within the last 2 s, and
    -- then the daemon reports that the app closed the connection.
    assert.truthy(err.code == "port_not_listening"
      or err.code == "app_closed_connection", err.code)
    assert.truthy(err.message:find(tostring(port), 1, true), err.message)
    sock:close()
  end, 20))

  it("delivers SSE event by event", async(function()
    local res = assert(core.http.request{ host = "127.0.0.1",
      port = ports.public, path = "/_port/" .. app:port() .. "/sse",
      timeout = 10 })
    assert.equal(200, res.status)
    local events = {}
    local buffer = ""
    while #events < 3 do
      local data = res:read()
      assert(data, "stream ended after " .. #events .. " events")
      buffer = buffer .. data
      for event in buffer:gmatch("data: (event %d)\n\n") do
        events[#events + 1] = event
      end
      buffer = buffer:gsub("data: event %d\n\n", "")
      -- Each read returns at most what was flushed so far: no event may
      -- arrive glued to the end of the stream.
      assert.truthy(#events <= 3)
    end
    assert.same({ "event 1", "event 2", "event 3" }, events)
    res:close()
  end))

  it("streams a 1 GiB upload with bounded memory", async(function()
    local size = 1024 * 1024 * 1024
    local chunk = string.rep("z", 1024 * 1024)
    local sent = 0
    local res = assert(core.http.request{
      method = "POST", host = "127.0.0.1", port = ports.public,
      path = "/_port/" .. app:port() .. "/count",
      headers = { ["Content-Length"] = tostring(size) },
      body_reader = function()
        if sent >= size then
          return nil
        end
        sent = sent + #chunk
        return chunk
      end,
      timeout = 60,
    })
    assert.equal(200, res.status)
    assert.equal(tostring(size), res:read_body())
    res:close()

    local f = assert(io.open("/proc/" .. p:pid() .. "/status"))
    local status = f:read("*a")
    f:close()
    local rss_kib = tonumber(status:match("VmRSS:%s*(%d+)"))
    -- The daemon held at most a few buffers of the 1 GiB body.
    assert.truthy(rss_kib < 64 * 1024, "daemon RSS " .. rss_kib .. " KiB")
  end), 120)

  it("pipes a WebSocket through", async(function()
    local sock = assert(core.tcp.connect("127.0.0.1", ports.public))
    sock:settimeout(10)
    assert(websocket.client_handshake(sock, { host = "127.0.0.1",
      path = "/_port/" .. app:port() .. "/ws" }))
    local conn = websocket.wrap(sock, { role = "client" })
    assert(conn:send("through the proxy", "text"))
    local data, kind = conn:recv()
    assert.equal("text", kind)
    assert.equal("through the proxy", data)
    local blob = string.rep("\0\1\2\255", 40000)
    assert(conn:send(blob, "binary"))
    data, kind = conn:recv()
    assert.equal("binary", kind)
    assert.equal(blob, data)
    conn:close(1000, "done")
  end))
end)


describe("daemon admission", function()
  it("rejects clients outside the broker networks", async(function()
    local p, ports, _, dir = start_daemon({
      slug = "spec-2", token = "0123456789abcdef0123",
      public = { host = "127.0.0.1", port = 0 },
      internal = { host = "127.0.0.1", port = 0 },
      broker_cidrs = { "192.0.2.0/24" },
      toolbox_root = "/tmp", state_dir = "/tmp",
    })
    local res, body = get(ports.public, "/")
    assert.equal(403, res.status)
    assert.equal("forbidden", json.decode(body).error.code)
    stop_daemon(p, dir)
  end))

  it("refuses to start with a bad config", async(function()
    local dir = temp_dir()
    local path = dir .. "/config.json"
    local f = assert(io.open(path, "w"))
    f:write('{"slug":"X","token":"short"}')
    f:close()
    local p = assert(core.proc.spawn{ file = BIN,
      args = { "daemon", "--config", path }, stderr = "pipe" })
    local log = {}
    while true do
      local line = p.stderr:readuntil("\n")
      if not line then
        break
      end
      log[#log + 1] = line
    end
    assert.equal(1, p:wait(10))
    local text = table.concat(log, "\n")
    assert.truthy(text:find("slug", 1, true))
    assert.truthy(text:find("token", 1, true))
    os.execute("rm -rf " .. dir)
  end))
end)
