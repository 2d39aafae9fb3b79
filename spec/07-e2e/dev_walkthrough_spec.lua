-- The README walkthrough against a real `justavps dev` stack that this spec
-- starts in a temporary directory: its own PostgreSQL cluster, platform,
-- broker and edge processes and local machines on 127.0.0.x. Clients are
-- real: curl for HTTP and the SSE stream, tools/term.py (python3-websockets)
-- for the terminal. The tests run in order and share the stack.
local core = require("justavps.core")
local json = require("cjson.safe")
local helpers = require("support.helpers")
local machine_sig = require("justavps.machine_sig")

local async = helpers.async
local read_file = helpers.read_file
local free_port = helpers.free_port
local eventually = helpers.eventually
local process_alive = helpers.process_alive

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")
local TERM = "tools/term.py"
-- Debian's interpreter, which has python3-websockets; another python3
-- first in PATH may not.
local PYTHON = "/usr/bin/python3"


-- Runs a program and returns its exit status, stdout and stderr.
local function run(file, args, opts)
  opts = opts or {}
  local p = assert(core.proc.spawn({ file = file, args = args,
    env = helpers.child_env(opts.env), stdin = "null", stdout = "pipe",
    stderr = "pipe" }))
  local errs = {}
  local done = core.waiter()
  local finished = false
  core.spawn(function()
    while true do
      local chunk = p.stderr:read()
      if not chunk then
        break
      end
      errs[#errs + 1] = chunk
    end
    finished = true
    done:wake()
  end)
  local outs = {}
  while true do
    local chunk = p.stdout:read()
    if not chunk then
      break
    end
    outs[#outs + 1] = chunk
  end
  if not finished then
    done:wait(60)
  end
  local status = p:wait(60)
  p.stdout:close()
  p.stderr:close()
  return status, table.concat(outs), table.concat(errs)
end


local stack, dev, dev_log, tmp
local summary_text = {}


-- Sends one request with curl. opts: method, key, json (a table sent as
-- the body), headers, cookies (a cookie jar file), cacert (default: the
-- stack's CA). Returns status, lower-case headers of the last response,
-- body, the decoded body or nil.
local function curl(url, opts)
  opts = opts or {}
  local head_file = tmp .. "/head.txt"
  local body_file = tmp .. "/body.txt"
  local args = { "-sS", "-o", body_file, "-D", head_file,
    "-w", "%{http_code}", "--max-time", tostring(opts.max_time or 30) }
  if url:sub(1, 6) == "https:" then
    args[#args + 1] = "--cacert"
    args[#args + 1] = stack.ca_file
  end
  if opts.method then
    args[#args + 1] = "-X"
    args[#args + 1] = opts.method
  end
  if opts.key then
    args[#args + 1] = "-H"
    args[#args + 1] = "Authorization: Bearer " .. opts.key
  end
  if opts.json then
    args[#args + 1] = "-H"
    args[#args + 1] = "Content-Type: application/json"
    args[#args + 1] = "--data-binary"
    args[#args + 1] = json.encode(opts.json)
  end
  for _, h in ipairs(opts.headers or {}) do
    args[#args + 1] = "-H"
    args[#args + 1] = h
  end
  if opts.cookies then
    args[#args + 1] = "-b"
    args[#args + 1] = opts.cookies
    args[#args + 1] = "-c"
    args[#args + 1] = opts.cookies
  end
  if opts.follow then
    args[#args + 1] = "-L"
  end
  args[#args + 1] = url
  local status, out, err = run("curl", args)
  -- 28 is curl's timeout, expected when reading a stream for max_time.
  assert(status == 0 or (opts.stream and status == 28),
    "curl " .. url .. " failed: " .. err)
  local headers = {}
  local head = read_file(head_file) or ""
  -- With -L the file has one block per response; keep the last one's.
  for line in head:gmatch("[^\r\n]+") do
    if line:match("^HTTP/") then
      headers = {}
    else
      local name, value = line:match("^([^:]+):%s*(.*)$")
      if name then
        headers[name:lower()] = value
      end
    end
  end
  local body = read_file(body_file) or ""
  return tonumber(out), headers, body, json.decode(body)
end


local function api(method, path, opts)
  opts = opts or {}
  opts.method = method
  opts.key = opts.key or stack.api_key
  return curl(stack.platform_url .. "/api/v1" .. path, opts)
end


-- Returns the machine URL of slug, with "PORT-" before the slug for a port.
local function machine_url(slug, port, path)
  local host = (port and (port .. "-") or "") .. slug .. "." .. stack.domain
  return "https://" .. host .. ":" .. stack.edge_port .. (path or "/")
end


-- Starts `justavps dev` on free ports in dir and waits until it is ready.
-- Returns the process; the log lines collect in dev_log.
local function start_dev(dir, ports)
  dev_log = {}
  local p = assert(core.proc.spawn({ file = BIN, args = { "dev",
    "--dir", dir,
    "--platform-port", tostring(ports.platform),
    "--edge-port", tostring(ports.edge),
    "--broker-port", tostring(ports.broker),
    "--first-address", tostring(ports.first_address),
    "--heartbeat-interval", "1",
  }, env = helpers.child_env(), stdin = "null", stdout = "pipe",
    stderr = "pipe" }))
  local ready = false
  local ready_waiter = core.waiter()
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      dev_log[#dev_log + 1] = line
      if line:find("msg=\"justavps dev is ready\"", 1, true)
          or line:find("could not start", 1, true) then
        ready = true
        ready_waiter:wake()
      end
    end
    ready = true
    ready_waiter:wake()
  end)
  core.spawn(function()
    while true do
      local chunk = p.stdout:read()
      if not chunk then
        break
      end
      summary_text[#summary_text + 1] = chunk
    end
  end)
  if not ready then
    ready_waiter:wait(180)
  end
  return p
end


local function dev_log_text()
  return table.concat(dev_log, "\n")
end


-- Returns true when something accepts TCP connections on host:port.
local function listening(host, port)
  local sock = core.tcp.connect(host, port, { timeout = 1 })
  if sock then
    sock:close()
    return true
  end
  return false
end


describe("justavps dev walkthrough", function()
  local ports = {}
  local dir
  local slug, app_port, share, daemon_pid, machine_ip

  lazy_setup(function()
    helpers.run(function()
      tmp = os.tmpname()
      os.remove(tmp)
      assert(os.execute("mkdir -p " .. tmp) == 0)
      dir = tmp .. "/dev"
      ports.platform = free_port()
      ports.edge = free_port()
      ports.broker = free_port()
      ports.first_address = math.random(100, 180)
      app_port = free_port()
    end)
  end)

  lazy_teardown(function()
    helpers.run(function()
      if dev and not dev:exited() then
        dev:kill("SIGTERM")
        dev:wait(60)
      end
    end, 90)
    os.execute("rm -rf " .. tmp)
  end)

  it("starts the stack and writes stack.json", async(function()
    dev = start_dev(dir, ports)
    local text = read_file(dir .. "/stack.json")
    assert(text, "no stack.json; log:\n" .. dev_log_text())
    stack = assert(json.decode(text))
    stack.edge_port = ports.edge

    local st = assert(core.fs.stat(dir .. "/stack.json"))
    assert.equal(tonumber("600", 8), st.perm)
    assert.equal("http://127.0.0.1:" .. ports.platform, stack.platform_url)
    assert.equal("https://justavps.localhost:" .. ports.edge, stack.edge_url)
    assert.equal("justavps.localhost", stack.domain)
    assert.equal("https://127.0.0.1:" .. ports.broker, stack.broker_url)
    assert.equal("string", type(stack.broker_id))
    assert.is_true(#stack.broker_secret >= 32)
    assert.matches("^sk_live_", stack.api_key)
    assert.truthy(read_file(stack.ca_file):find("BEGIN CERTIFICATE", 1, true))

    local m = stack.machine
    assert.equal("table", type(m))
    assert.matches("^demo%-", m.slug)
    assert.matches("^127%.0%.0%.%d+$", m.ip)
    assert.equal(8000, m.daemon_port)
    assert.equal("http://" .. m.ip .. ":7777", m.internal_url)
    assert.is_true(#m.token >= 16)
    assert.is_true(listening(m.ip, m.daemon_port))

    local out = table.concat(summary_text)
    assert.truthy(out:find(stack.platform_url .. "/api/v1", 1, true), out)
    assert.truthy(out:find(m.url, 1, true), out)
    assert.truthy(out:find("stack.json", 1, true), out)
  end, 200))

  it("rejects a second stack on the same directory", async(function()
    local status, _, err = run(BIN, { "dev", "--dir", dir,
      "--platform-port", tostring(free_port()),
      "--edge-port", tostring(free_port()),
      "--broker-port", tostring(free_port()) })
    assert.equal(1, status)
    assert.truthy(err:find("another justavps dev is running", 1, true), err)
    -- The running stack is untouched.
    assert.equal(200, (api("GET", "/me")))
  end, 60))

  it("signs the internal API with the token", async(function()
    local url = stack.machine.internal_url .. "/v1/health"
    local status, _, _, body = curl(url)
    assert.equal(401, status)
    assert.equal("table", type(body.error))

    local headers = {}
    for name, value in pairs(machine_sig.sign(stack.machine.token, "GET",
        "/v1/health")) do
      headers[#headers + 1] = name .. ": " .. value
    end
    local signed_status, _, text = curl(url, { headers = headers })
    assert.equal(200, signed_status, text)
  end))

  it("lists the local regions and server types", async(function()
    local status, _, body, regions = api("GET", "/regions")
    assert.equal(200, status, body)
    assert.equal("local", regions.regions[1].id)
    local types_status, _, types_body, types = api("GET", "/server-types")
    assert.equal(200, types_status, types_body)
    assert.equal("local", types.server_types[1].id)
  end))

  it("creates a machine and streams its stages", async(function()
    local status, _, body, created = api("POST", "/machines", { json = {
      name = "walkthrough", provider = "local", region = "local",
      server_type = "local" } })
    assert.equal(202, status, body)
    slug = created.slug
    assert.matches("^walkthrough%-", slug)

    -- curl -N reads the SSE stream as it arrives.
    local p = assert(core.proc.spawn({ file = "curl", args = { "-sSN",
      "--max-time", "120", "-H", "Authorization: Bearer " .. stack.api_key,
      stack.platform_url .. "/api/v1/machines/" .. slug .. "/events/stream" },
      env = helpers.child_env(), stdout = "pipe", stderr = "null" }))
    p.stdout:settimeout(120)
    local events, last_id = {}, 0
    local current = {}
    while true do
      local line = p.stdout:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      line = line:gsub("\r$", "")
      if line == "" then
        if current.data then
          events[#events + 1] = current
          local id = tonumber(current.id)
          assert.is_true(id > last_id, "event ids must increase")
          last_id = id
          if json.decode(current.data).stage == "services_ready" then
            break
          end
        end
        current = {}
      else
        local field, value = line:match("^(%w+): ?(.*)$")
        if field then
          current[field] = value
        end
      end
    end
    p:kill("SIGTERM")
    p:wait(5)
    p.stdout:close()

    local stages = {}
    for _, e in ipairs(events) do
      stages[#stages + 1] = json.decode(e.data).stage
    end
    assert.equal("server_creating", stages[1])
    assert.equal("services_ready", stages[#stages])
    local seen = {}
    for _, s in ipairs(stages) do
      seen[s] = true
    end
    assert.is_true(seen.server_created)

    -- Resuming after the first event sends only the later ones.
    local code, _, replay = curl(stack.platform_url .. "/api/v1/machines/"
      .. slug .. "/events/stream", { key = stack.api_key, max_time = 2,
      stream = true, headers = { "Last-Event-ID: " .. events[1].id } })
    assert.equal(200, code)
    assert.falsy(replay:find("\nid: " .. events[1].id .. "\n", 1, true))
    assert.truthy(replay:find("id: " .. events[2].id, 1, true), replay)

    local _, _, _, machine = api("GET", "/machines/" .. slug)
    assert.equal("services_ready", machine.stage)
    machine_ip = machine.ip
    daemon_pid = tonumber((read_file(dir .. "/machines/" .. slug
      .. "/daemon.pid") or ""):match("^(%d+)"))
    assert.is_number(daemon_pid)
  end, 150))

  it("runs a command through the toolbox", async(function()
    local status, headers, body = curl(machine_url(slug, nil,
      "/_toolbox/exec"), { method = "POST", key = stack.api_key,
      json = { cmd = "sh", args = { "-c", "echo hello from $((6*7))" } } })
    assert.equal(200, status, body)
    assert.matches("application/x%-ndjson", headers["content-type"])
    assert.truthy(body:find('"data":"hello from 42\\n"', 1, true), body)
    assert.truthy(body:find('"exit_code":0', 1, true), body)
  end))

  it("kills a silent command when its client leaves the edge",
    async(function()
      local pid_file = tmp .. "/silent.pid"
      -- curl gives up after 1 s; the command would sleep for 40 and
      -- print nothing.
      curl(machine_url(slug, nil, "/_toolbox/exec"), { method = "POST",
        key = stack.api_key, max_time = 1, stream = true,
        json = { cmd = "sh", args = { "-c", 'echo $$ > "$1"; sleep 40',
          "sh", pid_file }, timeout = 120 } })
      local pid = tonumber((read_file(pid_file) or ""):match("^(%d+)"))
      assert.is_number(pid, "the command did not start")
      -- Each hop notices its client has gone within about a second.
      local gone = eventually(15, function()
        return not process_alive(pid)
      end)
      assert.truthy(gone, "the command outlived its client")
    end, 60))

  it("starts an app and reaches it with the key", async(function()
    local status, _, body, process = curl(machine_url(slug, nil,
      "/_toolbox/processes"), { method = "POST", key = stack.api_key,
      json = { name = "web", cmd = "python3", args = { "-m", "http.server",
        tostring(app_port), "--bind", "127.0.0.1" } } })
    assert.equal(201, status, body)
    assert.equal("running", process.status)

    local url = machine_url(slug, app_port)
    local got = eventually(20, function()
      local s, _, b = curl(url, { key = stack.api_key })
      return s == 200 and b
    end)
    assert.truthy(got, "the app never answered through the edge")
    assert.truthy(got:find("Directory listing", 1, true), got)

    -- Without credentials the edge replies itself and forwards nothing.
    local anonymous = curl(url)
    assert.equal(401, anonymous)
  end, 60))

  it("opens a share link without a key", async(function()
    local status, _, body, created = api("POST", "/machines/" .. slug
      .. "/proxy-tokens", { json = { port = app_port, ttl_s = 600 } })
    assert.equal(201, status, body)
    share = created
    assert.equal(machine_url(slug, app_port, "/?__justavps_token=")
      .. share.token, share.url)

    local jar = tmp .. "/jar.txt"
    local first, headers = curl(share.url, { cookies = jar })
    assert.equal(302, first)
    assert.matches("^__justavps_proxy=", headers["set-cookie"])
    assert.matches("HttpOnly", headers["set-cookie"])
    assert.matches("Secure", headers["set-cookie"])

    local final, _, page = curl(share.url, { cookies = jar, follow = true })
    assert.equal(200, final)
    assert.truthy(page:find("Directory listing", 1, true), page)
  end))

  it("keeps the share link away from /_pty", async(function()
    local status, _, _, body = curl(machine_url(slug, nil,
      "/_pty?__justavps_token=" .. share.token))
    assert.equal(403, status)
    assert.equal("ticket_required", body.error.code)

    local other = curl(machine_url(slug, nil,
      "/_toolbox/files/?__justavps_token=" .. share.token))
    assert.equal(403, other)
  end))

  it("runs a command in the terminal", async(function()
    local status, out, err = run(PYTHON, { TERM, "--cacert", stack.ca_file,
      "--key", stack.api_key, "--command", "echo term $((6*7)); stty size",
      "wss://" .. slug .. "." .. stack.domain .. ":" .. stack.edge_port
        .. "/_pty" })
    assert.equal(0, status, err)
    assert.truthy(out:find("term 42", 1, true), out)
    assert.matches("session %S+", err)
  end, 60))

  it("opens the terminal once with a ticket", async(function()
    local status, _, body, ticket = api("POST", "/machines/" .. slug
      .. "/tickets")
    assert.equal(201, status, body)
    local url = "wss://" .. slug .. "." .. stack.domain .. ":"
      .. stack.edge_port .. "/_pty?__justavps_ticket=" .. ticket.ticket
    local first, out = run(PYTHON, { TERM, "--cacert", stack.ca_file,
      "--command", "echo ticket ok", url })
    assert.equal(0, first)
    assert.truthy(out:find("ticket ok", 1, true), out)

    local second, _, err = run(PYTHON, { TERM, "--cacert", stack.ca_file,
      "--command", "echo again", url })
    assert.equal(1, second)
    assert.matches("40[13]", err)
  end, 60))

  it("lists the machine's ports and metrics", async(function()
    local found = eventually(20, function()
      local _, _, _, body = api("GET", "/machines/" .. slug .. "/ports")
      for _, p in ipairs(body and body.ports or {}) do
        if p.port == app_port then
          return p
        end
      end
      return nil
    end)
    assert.truthy(found, "port " .. app_port .. " never reached the catalogue")
    assert.equal("python3", found.process)

    local status, _, body, metrics = api("GET", "/machines/" .. slug
      .. "/metrics")
    assert.equal(200, status, body)
    assert.is_true(#metrics.items > 0)

    -- The daemon's real report fills the columns: memory at once, CPU from
    -- the second sample on.
    local filled = eventually(20, function()
      local _, _, _, m = api("GET", "/machines/" .. slug .. "/metrics")
      local last = m and m.items[#m.items]
      return last and type(last.cpu_percent) == "number" and last
    end)
    assert.truthy(filled, "cpu_percent stayed null")
    assert.is_true(filled.mem_total_bytes > 0)
    assert.is_true(filled.mem_used_bytes > 0)
    assert.is_true(filled.mem_used_bytes <= filled.mem_total_bytes)
    assert.is_true(filled.disk_total_bytes > 0)
  end, 40))

  it("restarts a role that crashed", async(function()
    for _, role in ipairs({ "broker", "edge", "platform" }) do
      local pid_file = dir .. "/run/" .. role .. ".pid"
      local old_pid = tonumber(read_file(pid_file))
      assert.is_number(old_pid)
      assert(core.proc.kill(old_pid, "SIGKILL"))
      local new_pid = eventually(20, function()
        local pid = tonumber(read_file(pid_file) or "")
        return pid ~= old_pid and pid or nil
      end)
      assert.truthy(new_pid, role .. " was not restarted")
      assert.truthy(eventually(20, function()
        for _, line in ipairs(dev_log) do
          if line:find("role exited; restarting it", 1, true)
              and line:find("role=" .. role, 1, true) then
            return true
          end
        end
        return false
      end), role .. ": no restart log line")
    end

    -- The whole chain works again.
    local ok = eventually(20, function()
      local s = curl(machine_url(slug, app_port), { key = stack.api_key })
      return s == 200
    end)
    assert.truthy(ok, "the chain did not recover")

    -- A request with a body right after an upstream restart: the edge's
    -- and the broker's pooled connections to the old processes are dead.
    for _, role in ipairs({ "broker" }) do
      local pid_file = dir .. "/run/" .. role .. ".pid"
      local old_pid = tonumber(read_file(pid_file))
      -- Warm the pools first.
      assert.equal(200, (curl(machine_url(slug, app_port),
        { key = stack.api_key })))
      assert(core.proc.kill(old_pid, "SIGTERM"))
      assert.truthy(eventually(20, function()
        local pid = tonumber(read_file(pid_file) or "")
        return pid ~= old_pid and listening("127.0.0.1", ports.broker)
      end), role .. " was not restarted")
      local status, _, body = curl(machine_url(slug, nil, "/_toolbox/exec"),
        { method = "POST", key = stack.api_key,
          json = { cmd = "true" } })
      assert.equal(200, status, body)
    end
  end, 90))

  it("restarts a stopped daemon and database", async(function()
    local demo = stack.machine
    local pid_file = dir .. "/machines/" .. demo.slug .. "/daemon.pid"
    local old_pid = tonumber((read_file(pid_file) or ""):match("^(%d+)"))
    assert(core.proc.kill(old_pid, "SIGKILL"))
    local new_pid = eventually(30, function()
      local pid = tonumber((read_file(pid_file) or ""):match("^(%d+)"))
      return pid ~= old_pid and listening(demo.ip, demo.daemon_port) and pid
    end)
    assert.truthy(new_pid, "the demo daemon was not started again")

    -- A killed postmaster leaves its socket file and pid file behind.
    local function postmaster_pid()
      return tonumber((read_file(dir .. "/pg/data/postmaster.pid") or "")
        :match("^(%d+)"))
    end
    local postmaster = postmaster_pid()
    assert(core.proc.kill(postmaster, "SIGKILL"))
    assert.truthy(eventually(60, function()
      local pid = postmaster_pid()
      return pid and pid ~= postmaster and process_alive(pid)
    end), "postgres was not started again")
    assert.truthy(eventually(30, function()
      return api("GET", "/me") == 200
    end), "the platform did not reconnect")
  end, 90))

  it("deletes the machine and leaves nothing behind", async(function()
    assert.is_true(process_alive(daemon_pid))
    local status, _, body = api("DELETE", "/machines/" .. slug)
    assert.equal(202, status, body)

    local gone = eventually(30, function()
      local s, _, _, m = api("GET", "/machines/" .. slug)
      return s == 404 or (m and m.stage == "deleted")
    end)
    assert.truthy(gone, "the machine was not deleted")
    assert.truthy(eventually(10, function()
      return not process_alive(daemon_pid)
    end), "the daemon is still running")
    assert.is_false(listening(machine_ip, 8000))
    assert.is_false(listening(machine_ip, 7777))
    assert.is_false(listening("127.0.0.1", app_port))
    assert.is_nil(core.fs.stat(dir .. "/machines/" .. slug))
  end, 60))

  it("stops cleanly and reuses the data on restart", async(function()
    local pids = {}
    for _, role in ipairs({ "platform", "edge", "broker" }) do
      pids[role] = tonumber(read_file(dir .. "/run/" .. role .. ".pid"))
      assert.is_number(pids[role])
    end
    local demo_pid = tonumber((read_file(dir .. "/machines/"
      .. stack.machine.slug .. "/daemon.pid") or ""):match("^(%d+)"))

    dev:kill("SIGTERM")
    assert.equal(0, dev:wait(60), dev_log_text())
    for role, pid in pairs(pids) do
      assert.is_false(process_alive(pid), role .. " still runs")
    end
    assert.is_false(process_alive(demo_pid))
    for _, port in ipairs({ ports.platform, ports.edge, ports.broker }) do
      assert.is_false(listening("127.0.0.1", port))
    end

    local first_key, first_slug = stack.api_key, stack.machine.slug
    summary_text = {}
    dev = start_dev(dir, ports)
    local again = assert(json.decode(read_file(dir .. "/stack.json") or ""),
      dev_log_text())
    assert.equal(first_key, again.api_key)
    assert.equal(first_slug, again.machine.slug)
    assert.is_true(listening(again.machine.ip, 8000))
    local status = curl(stack.platform_url .. "/api/v1/me",
      { key = first_key })
    assert.equal(200, status)

    dev:kill("SIGINT")
    assert.equal(0, dev:wait(60), dev_log_text())
    -- PostgreSQL stopped too: its socket is gone.
    assert.is_nil(core.fs.stat(dir .. "/pg/.s.PGSQL.5432"))
  end, 240))
end)
