-- The daemon's /_pty terminal, end to end: a real `justavps daemon`
-- process with /bin/sh as the shell, and WebSocket clients driving it
-- over loopback. Output is matched by content, never by timing; waits
-- have generous limits.
local core = require("justavps.core")
local json = require("justavps.json")
local websocket = require("justavps.websocket")
local ring = require("justavps.daemon.terminal_ring")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")

local async = helpers.async

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

-- Seconds a spec waits for output or a frame before it fails.
local WAIT = 15


local function sh(cmd)
  assert(os.execute(cmd) == 0, "command failed: " .. cmd)
end


local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end


-- Starts the daemon with a config in a new temporary directory, with
-- terminal as its "terminal" record when given. Returns a table with
-- proc, port, dir and lines (its stderr so far).
local function start_daemon(terminal)
  local dir = os.tmpname()
  os.remove(dir)
  sh("mkdir -p " .. dir)

  write_file(dir .. "/config.json", json.encode({
    slug = "spec-1",
    token = "0123456789abcdef0123",
    public = { host = "127.0.0.1", port = 0 },
    internal = { host = "127.0.0.1", port = 0 },
    broker_cidrs = json.array({ "127.0.0.0/8" }),
    toolbox_root = dir,
    state_dir = dir,
    shell = "/bin/sh",
    terminal = terminal,
  }))

  local p = assert(core.proc.spawn({
    file = BIN,
    args = { "daemon", "--config", dir .. "/config.json" },
    env = { PATH = os.getenv("PATH"), HOME = dir, LANG = "C.UTF-8",
      JUSTAVPS_ROOT = os.getenv("PWD") },
    stdin = "null", stdout = "null", stderr = "pipe",
  }))

  local d = { proc = p, dir = dir, lines = {} }
  local got_port = core.waiter()
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      d.lines[#d.lines + 1] = line
      local n = line:match("msg=listening .*listener=public .*port=(%d+)")
      if n and not d.port then
        d.port = tonumber(n)
        got_port:wake()
      end
    end
  end)

  if not d.port then
    got_port:wait(WAIT)
  end
  assert(d.port, "daemon reported no public port; log:\n"
    .. table.concat(d.lines, "\n"))
  return d
end


local function stop_daemon(d)
  assert(d.proc:kill("SIGTERM"))
  local status = d.proc:wait(WAIT)
  sh("rm -rf " .. d.dir)
  return status
end


local function log_has(d, pattern)
  for _, line in ipairs(d.lines) do
    if line:find(pattern) then
      return true
    end
  end
  return false
end


-- A terminal client: out collects the binary output, controls the
-- decoded text frames, close the close frame's code and reason.
local Client = {}
Client.__index = Client


local function attach(d, query)
  local sock = assert(core.tcp.connect("127.0.0.1", d.port))
  sock:settimeout(WAIT)
  local path = "/_pty" .. (query and "?" .. query or "")
  assert(websocket.client_handshake(sock, { host = "127.0.0.1", path = path }))
  local conn = websocket.wrap(sock, { role = "client" })
  conn:settimeout(1)
  return setmetatable({ conn = conn, out = "", controls = {}, frames = {} },
    Client)
end


-- Receives one message. Returns false on a read timeout or when the
-- connection has ended.
function Client:pump()
  if self.close then
    return false
  end
  local data, kind, code, reason = self.conn:recv()
  if data == nil then
    if kind and code ~= "timeout" then
      self.close = { code = "none", reason = kind }
    end
    return false
  end
  if kind == "binary" then
    self.out = self.out .. data
    self.frames[#self.frames + 1] = "binary"
  elseif kind == "text" then
    local msg = assert(json.decode(data))
    self.controls[#self.controls + 1] = msg
    self.frames[#self.frames + 1] = msg.type
  elseif kind == "close" then
    self.close = { code = code, reason = reason }
  end
  return true
end


-- Pumps until pred(self) is true; fails after WAIT seconds.
function Client:wait_for(pred, what)
  core.update_time()
  local deadline = core.now() + WAIT
  while not pred(self) do
    core.update_time()
    if core.now() > deadline or (self.close and not pred(self)) then
      error("timed out waiting for " .. what .. "; output so far: "
        .. ("%q"):format(self.out), 2)
    end
    self:pump()
  end
end


function Client:wait_output(needle)
  self:wait_for(function(c)
    return c.out:find(needle, 1, true) ~= nil
  end, ("%q"):format(needle))
end


function Client:wait_control(kind)
  local found
  self:wait_for(function(c)
    for _, msg in ipairs(c.controls) do
      if msg.type == kind then
        found = msg
        return true
      end
    end
    return false
  end, "a " .. kind .. " frame")
  return found
end


function Client:wait_close()
  self:wait_for(function(c)
    return c.close ~= nil
  end, "the close frame")
  return self.close
end


-- The session frame; it must be the first frame received.
function Client:session()
  self:wait_for(function(c)
    return #c.frames > 0
  end, "the first frame")
  assert.equal("session", self.frames[1])
  return self.controls[1]
end


function Client:type(text)
  assert(self.conn:send(text, "binary"))
end


function Client:control(msg)
  assert(self.conn:send(json.encode(msg), "text"))
end


function Client:bye()
  self.conn:close(1000, "done")
end


-- Sends a raw upgrade request for target and returns the response.
local function raw_upgrade(d, target)
  local sock = raw.connect(d.port)
  sock:write("GET " .. target .. " HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    .. "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    .. "Sec-WebSocket-Version: 13\r\n\r\n")
  local res = assert(raw.read_response(sock))
  sock:close()
  res.json = json.decode(res.body)
  return res
end


describe("daemon terminal", function()
  local d

  setup(function()
    helpers.run(function()
      d = start_daemon()
    end)
  end)

  teardown(function()
    if os.getenv("TERMINAL_SPEC_LOG") then
      io.stderr:write(table.concat(d.lines, "\n"), "\n")
    end
    helpers.run(function()
      assert.equal(0, stop_daemon(d))
    end, 30)
  end)

  it("sends the session frame first", async(function()
    local c = attach(d)
    local s = c:session()
    assert.equal(0, s.seq)
    assert.is_string(s.id)
    assert.truthy(s.id:match("^[A-Za-z0-9_-]+$"))
    assert.equal(32, #s.id)
    c:bye()
    -- The log allows 10 lines of one message per 10 s, so this check
    -- sits in the first spec that starts a session.
    local id = s.id:gsub("%p", "%%%0")
    local deadline = core.now() + WAIT
    while not log_has(d, "terminal session started.*session=" .. id)
      and core.now() < deadline do
      core.sleep(0.05)
    end
    assert.is_true(log_has(d, "terminal session started.*session=" .. id))
  end, 30))

  it("runs echo through the shell", async(function()
    local c = attach(d)
    c:session()
    c:type("echo hi$((40 + 2))\n")
    c:wait_output("hi42")
    c:control({ type = "input", data = "echo json$((1 + 2))\n" })
    c:wait_output("json3")
    for _, kind in ipairs(c.frames) do
      if kind ~= "session" then
        assert.equal("binary", kind)
      end
    end
    c:bye()
  end, 30))

  it("applies a resize that stty reports", async(function()
    local c = attach(d, "cols=100&rows=30")
    c:session()
    c:type("stty size\n")
    c:wait_output("30 100")
    c:control({ type = "resize", cols = 123, rows = 45 })
    c:type("stty size\n")
    c:wait_output("45 123")
    c:bye()
  end, 30))

  it("keeps multibyte input split across frames", async(function()
    local c = attach(d)
    c:session()
    local line = "printf '%s%s\\n' A é€😀\n"
    -- Cut inside each of the three characters: é is 2 bytes, € 3, the
    -- emoji 4.
    local e = line:find("é", 1, true)
    local cuts = { e, e + 3, e + 6, #line }
    local from = 1
    for _, to in ipairs(cuts) do
      c:type(line:sub(from, to))
      from = to + 1
    end
    c:wait_output("Aé€😀")
    c:bye()
  end, 30))

  it("holds output between pause and resume", async(function()
    local c = attach(d)
    c:session()
    c:type("echo ready$((1))\n")
    c:wait_output("ready1")
    c:control({ type = "pause" })
    c:type("echo held$((2))\n")
    -- While paused nothing may arrive, however long we wait.
    core.update_time()
    local until_t = core.now() + 1
    while core.now() < until_t do
      c:pump()
      core.update_time()
    end
    assert.is_nil(c.out:find("held2", 1, true))
    c:control({ type = "resume" })
    c:wait_output("held2")
    c:bye()
  end, 30))

  it("answers a bad control message", async(function()
    local c = attach(d)
    c:session()
    assert(c.conn:send("{not json", "text"))
    local e = c:wait_control("error")
    assert.equal("bad_message", e.code)
    c:control({ type = "resize", cols = 0, rows = 10 })
    c:control({ type = "no-such-type" })
    c:type("echo still$((1 + 1))\n")
    c:wait_output("still2")
    local errors = 0
    for _, msg in ipairs(c.controls) do
      if msg.type == "error" then
        errors = errors + 1
      end
    end
    assert.equal(2, errors)
    assert.is_nil(c.close)
    c:bye()
  end, 30))

  it("replays exactly the bytes missed while detached", async(function()
    local c1 = attach(d)
    local s = c1:session()
    c1:type("echo one$((1))\n")
    c1:wait_output("one1")
    -- The shell prints while no client is attached.
    c1:type("sleep 1; echo det$((40 + 2))\n")
    local seen = c1.out
    c1:bye()
    core.sleep(2)

    local c2 = attach(d, "session=" .. s.id .. "&since=" .. #seen)
    local s2 = c2:session()
    assert.equal(s.id, s2.id)
    assert.equal(#seen, s2.seq)
    c2:wait_output("det42")
    for _, msg in ipairs(c2.controls) do
      assert.are_not.equal("reset", msg.type)
    end

    -- A third client takes over with the whole buffer.
    local c3 = attach(d, "session=" .. s.id .. "&replay=full")
    local s3 = c3:session()
    assert.equal(0, s3.seq)
    assert.equal("reset", c3:wait_control("reset").type)
    assert.equal("reset", c3.frames[2])
    c3:wait_output("det42")

    local closed = c2:wait_close()
    assert.equal(4000, closed.code)
    assert.equal("taken over", closed.reason)

    -- No gap and no duplicate: the first client's bytes and the
    -- second's are the start of the whole buffer.
    assert.equal(seen, c3.out:sub(1, #seen))
    assert.equal(c2.out, c3.out:sub(#seen + 1, #seen + #c2.out))
    c3:bye()
  end, 40))

  it("delivers a megabyte of output intact", async(function()
    local c = attach(d)
    c:session()
    c:type("head -c 1000000 /dev/zero | tr '\\0' a; echo; echo end$((1 + 1))\n")
    c:wait_output("end2")
    local run = c.out:match("(a+)\r\nend2")
    assert.is_not_nil(run, ("%q"):format(c.out:sub(1, 300)))
    assert.equal(1000000, #run)
    c:bye()
  end, 60))

  it("replays the newest bytes when since is too old", async(function()
    local c1 = attach(d)
    local s = c1:session()
    c1:type("echo start$((1))\n")
    c1:wait_output("start1")
    local seen = #c1.out
    -- 3 MB while detached: more than the 2 MiB the ring keeps.
    c1:type("head -c 3000000 /dev/zero | tr '\\0' b; echo; "
      .. "echo big$((1 + 1))\n")
    c1:bye()

    local c2
    repeat
      core.sleep(0.5)
      if c2 then
        c2:bye()
      end
      c2 = attach(d, "session=" .. s.id .. "&since=" .. seen)
      local s2 = c2:session()
      -- Until the ring has dropped bytes, since is still in it.
    until s2.seq > seen
    c2:wait_for(function(c)
      return #c.frames >= 2
    end, "a second frame")
    assert.equal("reset", c2.frames[2])
    c2:wait_output("big2")
    local bytes = 0
    for _ in c2.out:gmatch("b") do
      bytes = bytes + 1
    end
    assert.is_true(bytes < 3000000)
    assert.is_true(bytes > 1000000)
    c2:bye()
  end, 60))

  it("sends reset before a full replay", async(function()
    local c1 = attach(d)
    local s = c1:session()
    c1:type("echo full$((2 + 2))\n")
    c1:wait_output("full4")
    c1:bye()

    local c2 = attach(d, "session=" .. s.id .. "&replay=full")
    assert.equal(0, c2:session().seq)
    c2:wait_for(function(c)
      return #c.frames >= 2
    end, "a second frame")
    assert.equal("reset", c2.frames[2])
    c2:wait_output("full4")
    c2:bye()
  end, 30))

  it("reports exit 3 and closes with 4001", async(function()
    local c = attach(d)
    local s = c:session()
    c:type("exit 3\n")
    local e = c:wait_control("exit")
    assert.equal(3, e.code)
    local closed = c:wait_close()
    assert.equal(4001, closed.code)
    assert.equal("shell exited with 3", closed.reason)
    assert.equal("exit", c.frames[#c.frames])

    local res = raw_upgrade(d, "/_pty?session=" .. s.id)
    assert.equal(404, res.status)
  end, 30))

  it("ends a session a background job outlives", async(function()
    local c = attach(d)
    c:session()
    c:type("sleep 8 &\n")
    c:type("exit 5\n")
    assert.equal(5, c:wait_control("exit").code)
    assert.equal(4001, c:wait_close().code)
  end, 30))

  it("closes with 1000 after exit 0", async(function()
    local c = attach(d)
    c:session()
    c:type("exit\n")
    assert.equal(0, c:wait_control("exit").code)
    assert.equal(1000, c:wait_close().code)
  end, 30))

  it("keeps two sessions independent", async(function()
    local a = attach(d)
    local b = attach(d)
    local sa, sb = a:session(), b:session()
    assert.are_not.equal(sa.id, sb.id)
    a:type("X=alpha\n")
    b:type("X=beta\n")
    a:type("echo val-$X-end\n")
    b:type("echo val-$X-end\n")
    a:wait_output("val-alpha-end")
    b:wait_output("val-beta-end")
    assert.is_nil(a.out:find("val-beta-end", 1, true))
    assert.is_nil(b.out:find("val-alpha-end", 1, true))
    a:bye()
    b:bye()
  end, 30))

  it("lists, shows and ends sessions", async(function()
    local function call(method, path)
      local res = assert(core.http.request({ method = method,
        host = "127.0.0.1", port = d.port, path = path, timeout = WAIT }))
      local body = res:read_body()
      res:close()
      return res.status, body ~= "" and json.decode(body) or nil, res
    end

    local c = attach(d)
    local s = c:session()
    local status, list = call("GET", "/_pty/sessions")
    assert.equal(200, status)
    local found
    for _, entry in ipairs(list.sessions) do
      if entry.id == s.id then
        found = entry
      end
    end
    assert.truthy(found, "the session is not listed")
    assert.is_true(found.attached)
    assert.is_number(found.pid)

    local one_status, one = call("GET", "/_pty/sessions/" .. s.id)
    assert.equal(200, one_status)
    assert.equal(s.id, one.id)

    assert.equal(405, (call("POST", "/_pty/sessions")))
    assert.equal(404, (call("DELETE", "/_pty/sessions/" .. ("B"):rep(32))))
    assert.equal(404, (call("GET", "/_pty/other")))

    -- Ending it hangs up the shell; the client gets the exit and close.
    assert.equal(204, (call("DELETE", "/_pty/sessions/" .. s.id)))
    c:wait_control("exit")
    c:wait_close()
    local gone = false
    for _ = 1, 100 do
      if call("GET", "/_pty/sessions/" .. s.id) == 404 then
        gone = true
        break
      end
      core.sleep(0.1)
    end
    assert.is_true(gone, "the session was not freed")
  end, 30))

  it("answers an unknown session with 404", async(function()
    local res = raw_upgrade(d, "/_pty?session=" .. ("A"):rep(32))
    assert.equal(404, res.status)
    assert.equal("application/json", res.headers["content-type"])
    assert.equal("session_not_found", res.json.error.code)
  end, 30))

  it("answers bad query values with 400", async(function()
    local cases = {
      { "/_pty?session=abc&since=x1", "bad_since" },
      { "/_pty?session=abc&since=-1", "bad_since" },
      { "/_pty?since=5", "bad_since" },
      { "/_pty?session=a%2Fb", "bad_session" },
      { "/_pty?session=abc&replay=some", "bad_replay" },
      { "/_pty?cols=0", "bad_size" },
      { "/_pty?rows=1001", "bad_size" },
      { "/_pty?session=%zz", "bad_query" },
      { "/_pty?session=a&session=b", "bad_query" },
    }
    for _, case in ipairs(cases) do
      local res = raw_upgrade(d, case[1])
      assert.equal(400, res.status, case[1])
      assert.equal(case[2], res.json.error.code, case[1])
    end
  end, 30))

  it("answers since past the output with 400", async(function()
    local c = attach(d)
    local s = c:session()
    local res = raw_upgrade(d, "/_pty?session=" .. s.id
      .. "&since=999999999")
    assert.equal(400, res.status)
    assert.equal("bad_since", res.json.error.code)
    c:bye()
  end, 30))

  it("answers a plain GET with 400", async(function()
    local sock = raw.connect(d.port)
    sock:write("GET /_pty HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    local res = assert(raw.read_response(sock))
    sock:close()
    assert.equal(400, res.status)
    assert.equal("bad_upgrade", json.decode(res.body).error.code)
  end, 30))

  it("logs no terminal content", async(function()
    local c = attach(d)
    c:session()
    c:type("echo secret-out$((6 * 7))\n")
    c:wait_output("secret-out42")
    c:bye()
    core.sleep(0.5)
    assert.is_false(log_has(d, "secret%-out"))
  end, 30))
end)


-- Waits until pred() is true, pumping nothing; fails after limit seconds.
local function wait_until(limit, pred, what)
  core.update_time()
  local deadline = core.now() + limit
  while not pred() do
    core.update_time()
    if core.now() > deadline then
      error("timed out waiting for " .. what, 2)
    end
    core.sleep(0.05)
  end
end


describe("daemon terminal limits", function()
  local d

  setup(function()
    helpers.run(function()
      d = start_daemon({ reattach_window = 1, idle_timeout = 2,
        ping_interval = 1, max_sessions = 2, kill_grace = 1 })
    end)
  end)

  teardown(function()
    helpers.run(function()
      assert.equal(0, stop_daemon(d))
    end, 30)
  end)

  it("ends a detached session after the window", async(function()
    local c = attach(d)
    local s = c:session()
    c:bye()
    wait_until(WAIT, function()
      return log_has(d, "reason=reattach_window")
    end, "the reattach window to expire")
    wait_until(WAIT, function()
      return raw_upgrade(d, "/_pty?session=" .. s.id).status == 404
    end, "the session to be freed")
  end, 30))

  it("ends an idle attached session", async(function()
    local c = attach(d)
    c:session()
    local closed = c:wait_close()
    assert.is_true(closed.code == 4001 or closed.code == 1000,
      "close code " .. tostring(closed.code))
    -- The daemon buffers its log when stderr is a pipe, so the line may
    -- come a little after the close.
    wait_until(WAIT, function()
      return log_has(d, "reason=idle_timeout")
    end, "the idle_timeout log line")
  end, 30))

  it("rejects a session past the maximum", async(function()
    local a = attach(d)
    local b = attach(d)
    a:session()
    b:session()
    local res = raw_upgrade(d, "/_pty")
    assert.equal(503, res.status)
    assert.equal("too_many_sessions", res.json.error.code)
    a:type("exit\n")
    b:type("exit\n")
    a:wait_close()
    b:wait_close()
  end, 30))

  it("pings an attached client", async(function()
    local c = attach(d)
    c:session()
    local kinds = {}
    wait_until(WAIT, function()
      local _, kind = c.conn:recv()
      if kind then
        kinds[kind] = true
      end
      return kinds.ping == true
    end, "a ping")
    c:type("exit\n")
    c:wait_close()
  end, 30))

  it("drops a client that stops answering pings", async(function()
    local sock = assert(core.tcp.connect("127.0.0.1", d.port))
    sock:settimeout(WAIT)
    assert(websocket.client_handshake(sock, { host = "127.0.0.1",
      path = "/_pty" }))
    -- Nothing is read, so no pong goes back; after three ping intervals
    -- the daemon closes its side.
    wait_until(WAIT, function()
      return log_has(d, "stopped responding to pings")
    end, "the ping check")
    sock:close()
  end, 30))
end)


describe("terminal ring", function()
  it("returns appended bytes by sequence number", function()
    local r = ring.new(100)
    r:append("hello ")
    r:append("world")
    assert.equal(0, r.start)
    assert.equal(11, r.finish)
    assert.equal("hello world", r:slice(0, 100))
    assert.equal("world", r:slice(6, 100))
    assert.equal("lo w", r:slice(3, 4))
    assert.equal("", r:slice(11, 100))
  end)

  it("drops the oldest bytes past capacity", function()
    local r = ring.new(10)
    for i = 1, 4 do
      r:append(("%d"):format(i):rep(5))
    end
    assert.equal(20, r.finish)
    assert.equal(10, r.start)
    assert.equal("3333344444", r:slice(r.start, 100))
  end)

  it("keeps bytes a reader still needs", function()
    local r = ring.new(10)
    r:append(("a"):rep(40000), 0)
    r:append(("b"):rep(40000), 0)
    assert.equal(0, r.start)
    assert.equal(80000, #r:slice(0, 100000))
    r:trim()
    assert.equal(10, r.finish - r.start)
  end)

  it("cuts after a newline when it can", function()
    local r = ring.new(8)
    r:append("abc\ndefghij\nklm")
    assert.equal(12, r.start)
    assert.equal("klm", r:slice(r.start, 100))
  end)

  it("slices across merged and separate chunks", function()
    local r = ring.new(1024 * 1024)
    local parts = {}
    for i = 1, 200 do
      local piece = ("%03d"):format(i):rep(i * 10)
      parts[#parts + 1] = piece
      r:append(piece)
    end
    local all = table.concat(parts)
    assert.equal(#all, r.finish)
    for _, pos in ipairs({ 0, 1, 5000, 16383, 16384, 40000, #all - 1 }) do
      assert.equal(all:sub(pos + 1, pos + 20000), r:slice(pos, 20000))
    end
  end)
end)
