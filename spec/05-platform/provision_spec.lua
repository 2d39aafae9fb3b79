-- Provisioning end to end against a fresh database: real platform
-- processes run the worker with the local provider, and the real
-- `justavps daemon` is the machine that sends heartbeats back.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")
local local_provider = require("providers.local")

local async = helpers.async

local platform = require("support.platform")
local shell = require("support.pg").shell

math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16))
-- A random slice of the loopback pool and random ports, so that runs in
-- other checkouts on this host rarely meet the same addresses.
local LOCAL = {
  root_dir = nil,
  binary = platform.BIN,
  address_first = math.random(20, 230),
  address_count = 20,
  public_port = math.random(20000, 29999),
  internal_port = nil,
  stop_timeout = 5,
}
LOCAL.internal_port = LOCAL.public_port + 10000


local function wait_for(fn, what, seconds)
  local deadline = core.now() + (seconds or 30)
  while core.now() < deadline do
    local value = fn()
    if value then
      return value
    end
    core.sleep(0.1)
    core.update_time()
  end
  error("timed out waiting for " .. what)
end


local function accepts(host, port)
  local sock = core.tcp.connect(host, port, { timeout = 2 })
  if sock then
    sock:close()
    return true
  end
  return false
end


describe("provisioning", function()
  local database, account_id, root
  local platforms = {}
  local config_count = 0

  setup(function()
    root = shell("mktemp -d /tmp/justavps-provision-spec.XXXXXX"):match("%S+")
    LOCAL.root_dir = root
    helpers.run(function()
      database = platform.database()
      local db = database:connect()
      account_id = assert(db:query("INSERT INTO accounts (name) VALUES ($1) "
        .. "RETURNING id", { "provision-spec" }))[1].id
      db:close()
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      for _, p in ipairs(platforms) do
        if not p.proc:exited() then
          p.proc:kill("SIGTERM")
          p.proc:wait(15)
        end
      end
      -- Daemons outlive the platforms by design: stop what is left.
      local driver = assert(local_provider.new(LOCAL))
      for _, slug in ipairs(driver:list_machines()) do
        driver:delete_server(slug)
      end
      if database then
        database:drop()
      end
    end, 90)
    shell("rm -rf " .. root)
  end)

  -- Starts a platform process with the provision settings of overrides
  -- on top of the spec's. Returns { proc, port, lines }.
  local function start_platform(overrides)
    local provision = {
      poll_interval = 0.1, lease = 2, backoff_base = 0.2, backoff_max = 1,
      heartbeat_deadline = 60, daemon_heartbeat_interval = 1,
      providers = { ["local"] = {} },
    }
    for k, v in pairs(LOCAL) do
      provision.providers["local"][k] = v
    end
    for k, v in pairs(overrides or {}) do
      if k == "local" then
        for lk, lv in pairs(v) do
          provision.providers["local"][lk] = lv
        end
      else
        provision[k] = v
      end
    end
    config_count = config_count + 1
    local path = root .. "/platform-" .. config_count .. ".json"
    local f = assert(io.open(path, "w"))
    f:write(json.encode({ listen = { host = "127.0.0.1", port = 0 },
      provision = provision }))
    f:close()

    local p = platform.start(database, { args = { "--config", path } })
    platforms[#platforms + 1] = p
    return p
  end

  local function stop_platform(p)
    p.proc:kill("SIGTERM")
    assert(p.proc:wait(15))
  end

  -- Inserts a local machine with its first event and provision job, as
  -- POST /api/v1/machines does. Returns the machine id.
  local function insert_machine(slug)
    local db = database:connect()
    local id = assert(db:query("INSERT INTO machines (slug, account_id, "
      .. "name, provider, region, server_type, token) VALUES ($1, $2, $3, "
      .. "'local', 'local', 'local', $4) RETURNING id", { slug, account_id,
      slug, "token-" .. slug .. "-0123456789abcdef0123456789" }))[1].id
    assert(db:query("INSERT INTO machine_events (machine_id, stage) "
      .. "VALUES ($1, 'server_creating')", { id }))
    assert(db:query("INSERT INTO jobs (kind, machine_id) "
      .. "VALUES ('provision', $1)", { id }))
    db:close()
    return id
  end

  -- Moves a machine to deleting and queues its delete job, as
  -- DELETE /api/v1/machines/{slug} does.
  local function request_delete(id)
    local db = database:connect()
    assert(db:query("UPDATE machines SET stage = 'deleting' WHERE id = $1",
      { id }))
    assert(db:query("INSERT INTO machine_events (machine_id, stage) "
      .. "VALUES ($1, 'deleting')", { id }))
    assert(db:query("INSERT INTO jobs (kind, machine_id) "
      .. "VALUES ('delete', $1)", { id }))
    db:close()
  end

  local function machine_row(id)
    local db = database:connect()
    local row = assert(db:query("SELECT stage::text AS stage, "
      .. "provider_server_id, host(ip) AS ip, last_seen_at IS NOT NULL "
      .. "AS seen FROM machines WHERE id = $1", { id }))[1]
    db:close()
    return row
  end

  local function job_row(id, kind)
    local db = database:connect()
    local row = assert(db:query("SELECT state, attempts, last_error "
      .. "FROM jobs WHERE machine_id = $1 AND kind = $2", { id, kind }))[1]
    db:close()
    return row
  end

  -- Waits for the machine to reach stage. The error names the stage it
  -- is in and its jobs' last errors.
  local function wait_stage(id, stage, seconds)
    local ok, err = pcall(wait_for, function()
      return machine_row(id).stage == stage
    end, "stage " .. stage, seconds)
    if not ok then
      local db = database:connect()
      local jobs = assert(db:query("SELECT kind, state, attempts, "
        .. "last_error FROM jobs WHERE machine_id = $1", { id }))
      db:close()
      local text = {}
      for i, job in ipairs(jobs) do
        text[i] = string.format("%s %s after %d attempts: %s", job.kind,
          job.state, job.attempts, tostring(job.last_error))
      end
      error(tostring(err) .. ", machine is in "
        .. tostring(machine_row(id).stage) .. ", jobs: "
        .. table.concat(text, "; "), 0)
    end
  end

  local function event_details(id, stage)
    local db = database:connect()
    local rows = assert(db:query("SELECT detail::text AS detail FROM "
      .. "machine_events WHERE machine_id = $1 AND stage = $2 ORDER BY id",
      { id, stage }))
    db:close()
    local out = {}
    for i, row in ipairs(rows) do
      out[i] = json.decode(row.detail)
    end
    return out
  end

  local function read_pid(slug)
    local f = io.open(root .. "/" .. slug .. "/daemon.pid")
    if not f then
      return nil
    end
    local pid = tonumber(f:read("*l"):match("^(%d+)"))
    f:close()
    return pid
  end

  local function count_lines(p, pattern)
    local n = 0
    for _, line in ipairs(p.lines) do
      if line:find(pattern) then
        n = n + 1
      end
    end
    return n
  end

  -- Deletes machine id and checks that its daemon and ports are gone.
  local function delete_and_check(id, slug)
    local row = machine_row(id)
    local pid = read_pid(slug)
    request_delete(id)
    wait_stage(id, "deleted", 30)
    assert.equal("done", job_row(id, "delete").state)
    if pid then
      assert.is_nil((core.proc.kill(pid, 0)))
    end
    if row.ip then
      assert.is_false(accepts(row.ip, LOCAL.internal_port))
      assert.is_false(accepts(row.ip, LOCAL.public_port))
    end
    assert.is_nil(io.open(root .. "/" .. slug .. "/config.json"))
  end

  it("provisions a machine to services_ready", async(function()
    local p = start_platform()
    local id = insert_machine("prov-one")
    wait_stage(id, "services_ready", 60)

    local row = machine_row(id)
    assert.equal("prov-one", row.provider_server_id)
    assert.truthy(row.ip:match("^127%.0%.0%.%d+$"))
    assert.is_true(row.seen)
    assert.equal(1, #event_details(id, "server_created"))
    local job = job_row(id, "provision")
    assert.equal("done", job.state)
    assert.equal(1, job.attempts)
    assert.is_true(accepts(row.ip, LOCAL.internal_port))

    -- The provider's progress is part of the history.
    local attempts = 0
    for _, detail in ipairs(event_details(id, "server_creating")) do
      if detail.source == "provider" and detail.kind == "create_attempt" then
        attempts = attempts + 1
        assert.equal("local", detail.region)
      end
    end
    assert.equal(1, attempts)

    delete_and_check(id, "prov-one")
    stop_platform(p)
  end, 120))

  it("runs a job in one of two platforms", async(function()
    local a = start_platform()
    local b = start_platform()
    local id = insert_machine("prov-two")
    wait_stage(id, "services_ready", 60)

    assert.equal(1, job_row(id, "provision").attempts)
    local driver = assert(local_provider.new(LOCAL))
    local count = 0
    for _, slug in ipairs(driver:list_machines()) do
      if slug == "prov-two" then
        count = count + 1
      end
    end
    assert.equal(1, count)
    local created = count_lines(a, "msg=\"?server created.*slug=prov%-two")
      + count_lines(b, "msg=\"?server created.*slug=prov%-two")
    assert.equal(1, created)

    delete_and_check(id, "prov-two")
    stop_platform(a)
    stop_platform(b)
  end, 120))

  it("resumes a job after SIGKILL", async(function()
    -- The boot delay keeps the first platform inside create_server.
    local first = start_platform({ ["local"] = { boot_delay = 30 } })
    local id = insert_machine("prov-kill")
    wait_for(function()
      return job_row(id, "provision").state == "running"
    end, "the job to be claimed")
    assert(first.proc:kill("SIGKILL"))
    first.proc:wait(10)
    assert.equal("running", job_row(id, "provision").state)
    assert.equal("server_creating", machine_row(id).stage)

    local second = start_platform()
    wait_stage(id, "services_ready", 60)
    local job = job_row(id, "provision")
    assert.equal("done", job.state)
    assert.equal(2, job.attempts)
    assert.equal(1, count_lines(second, "job lease expired"))

    delete_and_check(id, "prov-kill")
    stop_platform(second)
  end, 120))

  it("fails a machine without a heartbeat", async(function()
    -- Nothing listens on port 1, so the daemon's heartbeats never arrive.
    local p = start_platform({ platform_url = "http://127.0.0.1:1",
      heartbeat_deadline = 2 })
    local id = insert_machine("prov-silent")
    wait_stage(id, "failed", 60)

    local details = event_details(id, "failed")
    assert.equal(1, #details)
    assert.truthy(details[1].reason:find("no heartbeat within 2 seconds",
      1, true))
    assert.equal(2, details[1].heartbeat_deadline)
    assert.is_false(machine_row(id).seen)

    delete_and_check(id, "prov-silent")
    stop_platform(p)
  end, 120))

  it("fails a machine the provider rejects", async(function()
    local p = start_platform()
    local db = database:connect()
    local id = assert(db:query("INSERT INTO machines (slug, account_id, "
      .. "name, provider, region, server_type, token) VALUES ($1, $2, $3, "
      .. "'local', 'mars', 'local', $4) RETURNING id", { "prov-mars",
      account_id, "mars", "token-prov-mars-0123456789abcdef0123456789" }))[1].id
    assert(db:query("INSERT INTO jobs (kind, machine_id) "
      .. "VALUES ('provision', $1)", { id }))
    db:close()
    wait_stage(id, "failed", 30)

    local job = job_row(id, "provision")
    assert.equal("dead", job.state)
    assert.equal(1, job.attempts)
    assert.truthy(job.last_error:find("unknown region mars", 1, true))
    local details = event_details(id, "failed")
    assert.truthy(details[1].reason:find("unknown region mars", 1, true))
    assert.equal("invalid_request", details[1].code)

    -- The server was never created, so it has no provider_server_id and
    -- the delete goes by slug.
    request_delete(id)
    wait_stage(id, "deleted", 30)
    assert.equal("done", job_row(id, "delete").state)
    stop_platform(p)
  end, 60))
end)
