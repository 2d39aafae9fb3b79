-- Measures provisioning with a real platform process, as
-- spec/05-platform/provision_spec.lua runs it, and prints Markdown tables:
--   1. create -> server_created and -> services_ready with the local
--      provider, machines created one after another;
--   2. create -> server_created with the Hetzner driver against
--      tools/fake_hetzner.lua, machines created one after another;
--   3. a burst of machines queued in one transaction with the local
--      provider: time until all reach server_created and services_ready.
--
--   luajit tools/bench/provision_run.lua BUILD TMP HETZNER_PORT SEQUENTIAL
--     BURST CONCURRENCY POLL_INTERVAL
--
-- "Create" is the INSERT of the machine, its server_creating event and its
-- provision job, which is what POST /api/v1/machines stores. Times are
-- PostgreSQL clock_timestamp() at that INSERT and created_at of the first
-- event of each stage, so the polling of this script adds nothing. The
-- script creates and drops its own database (PG* from the environment),
-- deletes every machine it created and stops the platform it started.
local build_dir, tmp, hetzner_port, sequential, burst, concurrency,
  poll_interval = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4]),
  tonumber(arg[5]), tonumber(arg[6]), tonumber(arg[7])
if not (build_dir and tmp and hetzner_port and sequential and burst
    and concurrency and poll_interval) then
  io.stderr:write("usage: luajit tools/bench/provision_run.lua BUILD TMP "
    .. "HETZNER_PORT SEQUENTIAL BURST CONCURRENCY POLL_INTERVAL\n")
  os.exit(2)
end

package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
package.cpath = build_dir .. "/lua/?.so;" .. package.cpath

local core = require("justavps.core")
local json = require("justavps.json")
local local_provider = require("providers.local")

local BIN = build_dir .. "/justavps"
local PG = { host = os.getenv("PGHOST"), port = os.getenv("PGPORT"),
  user = os.getenv("PGUSER") }

math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16))
-- A random slice of the loopback pool and random ports, so that a run
-- rarely meets the addresses of specs running in other checkouts.
local LOCAL = {
  root_dir = tmp .. "/machines",
  binary = BIN,
  address_first = math.random(20, 200),
  address_count = sequential + burst + 4,
  public_port = math.random(20000, 29999),
  stop_timeout = 5,
}
LOCAL.internal_port = LOCAL.public_port + 10000


local function log(...)
  io.stderr:write("provision_run.lua: ", string.format(...), "\n")
end


local function connect(dbname)
  return assert(core.pg.connect({ host = PG.host, port = PG.port,
    user = PG.user, dbname = dbname or os.getenv("PGDATABASE") },
    { timeout = 30 }))
end


local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("*a")
  f:close()
  return text
end


local function median(values)
  local sorted = {}
  for i, v in ipairs(values) do
    sorted[i] = v
  end
  table.sort(sorted)
  local n = #sorted
  if n % 2 == 1 then
    return sorted[(n + 1) / 2]
  end
  return (sorted[n / 2] + sorted[n / 2 + 1]) / 2
end


local function ms(seconds)
  return string.format("%.0f ms", seconds * 1000)
end


local state = { machines = {} }


local function start_platform(dbname)
  local sha = io.popen("sha256sum " .. BIN):read("*l"):match("^(%x+)")
  local providers = { ["local"] = {}, hetzner = {
    base_url = "http://127.0.0.1:" .. hetzner_port .. "/v1",
    token = "fake-token" } }
  for k, v in pairs(LOCAL) do
    providers["local"][k] = v
  end
  local path = tmp .. "/platform.json"
  local f = assert(io.open(path, "w"))
  -- daemon_sha256 only has to be a real checksum for the Hetzner driver's
  -- cloud-init: the fake server never boots, so nothing downloads it.
  f:write(json.encode({ listen = { host = "127.0.0.1", port = 0 },
    provision = { concurrency = concurrency, poll_interval = poll_interval,
      daemon_sha256 = sha, providers = providers } }))
  f:close()

  local env = { PATH = os.getenv("PATH"), HOME = os.getenv("HOME"),
    JUSTAVPS_ROOT = os.getenv("JUSTAVPS_ROOT"), PGHOST = PG.host,
    PGPORT = PG.port, PGUSER = PG.user, PGDATABASE = dbname }
  local m = assert(core.proc.spawn{ file = BIN, args = { "migrate" },
    env = env, stdout = "null", stderr = "null" })
  assert(m:wait(60) == 0, "justavps migrate failed")

  local logf = assert(io.open(tmp .. "/platform.log", "w"))
  local p = { port = nil }
  p.proc = assert(core.proc.spawn{ file = BIN,
    args = { "platform", "--config", path, "--access-log=false" },
    env = env, stdout = "null", stderr = "pipe" })
  state.platform = p
  local ready = core.waiter()
  core.spawn(function()
    while true do
      local line = p.proc.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      logf:write(line, "\n")
      logf:flush()
      local n = line:match("msg=listening .*port=(%d+)")
      if n and not p.port then
        p.port = tonumber(n)
        ready:wake()
      end
    end
    logf:close()
  end)
  if not p.port then
    ready:wait(20)
  end
  assert(p.port, "the platform did not log a listening port; see "
    .. tmp .. "/platform.log")
end


-- Inserts machines (each { slug, provider, region, server_type }) with
-- their first event and provision job in one transaction. Returns the
-- clock_timestamp() of the last INSERT in Unix seconds.
local function create_machines(db, account_id, list)
  assert(db:query("BEGIN"))
  local t0
  for _, m in ipairs(list) do
    local row = assert(db:query("INSERT INTO machines (slug, account_id, "
      .. "name, provider, region, server_type, token) VALUES ($1, $2, $1, "
      .. "$3, $4, $5, $6) RETURNING id, "
      .. "extract(epoch FROM clock_timestamp())::float8 AS t0",
      { m.slug, account_id, m.provider, m.region, m.server_type,
        "token-" .. m.slug .. "-0123456789abcdef0123456789" }))[1]
    m.id = row.id
    t0 = tonumber(row.t0)
    assert(db:query("INSERT INTO machine_events (machine_id, stage) "
      .. "VALUES ($1, 'server_creating')", { m.id }))
    assert(db:query("INSERT INTO jobs (kind, machine_id) "
      .. "VALUES ('provision', $1)", { m.id }))
    state.machines[#state.machines + 1] = m
  end
  assert(db:query("COMMIT"))
  return t0
end


-- Waits until every machine in list has an event of stage, polling every
-- 20 ms for at most seconds. Raises on a failed machine or on timeout.
local function wait_stage(db, list, stage, seconds)
  local deadline = core.now() + seconds
  for _, m in ipairs(list) do
    while true do
      local row = assert(db:query("SELECT stage::text AS stage, "
        .. "(SELECT extract(epoch FROM min(created_at))::float8 FROM "
        .. "machine_events WHERE machine_id = $1 AND stage = $2) AS t "
        .. "FROM machines WHERE id = $1", { m.id, stage }))[1]
      if row.t ~= nil and row.t ~= json.null then
        m[stage] = tonumber(row.t)
        break
      end
      if row.stage == "failed" then
        local job = assert(db:query("SELECT last_error FROM jobs WHERE "
          .. "machine_id = $1", { m.id }))[1]
        error(string.format("machine %s failed: %s", m.slug,
          tostring(job and job.last_error)), 0)
      end
      core.update_time()
      if core.now() >= deadline then
        error(string.format("timed out after %g s waiting for %s to reach "
          .. "%s (stage %s)", seconds, m.slug, stage, row.stage), 0)
      end
      core.sleep(0.02)
    end
  end
end


-- Creates count machines one after another, each after the previous one
-- reached stage, and returns the per-machine seconds from create to each
-- stage in stages.
local function run_sequential(db, account_id, prefix, spec, stages)
  local times = {}
  for _, stage in ipairs(stages) do
    times[stage] = {}
  end
  for i = 1, sequential do
    local m = { slug = string.format("%s-%02d", prefix, i),
      provider = spec.provider, region = spec.region,
      server_type = spec.server_type }
    local t0 = create_machines(db, account_id, { m })
    for _, stage in ipairs(stages) do
      wait_stage(db, { m }, stage, 60)
      times[stage][i] = m[stage] - t0
    end
    log("%s: %s", m.slug, ms(m[stages[#stages]] - t0))
  end
  return times
end


local function print_sequential(title, times, stages)
  print(title)
  print()
  local head = "| machine |"
  local rule = "| ---: |"
  for _, stage in ipairs(stages) do
    head = head .. " create -> " .. stage .. " |"
    rule = rule .. " ---: |"
  end
  print(head)
  print(rule)
  for i = 1, sequential do
    local line = "| " .. i .. " |"
    for _, stage in ipairs(stages) do
      line = line .. " " .. ms(times[stage][i]) .. " |"
    end
    print(line)
  end
  local line = "| median |"
  for _, stage in ipairs(stages) do
    line = line .. " " .. ms(median(times[stage])) .. " |"
  end
  print(line)
  line = "| min / max |"
  for _, stage in ipairs(stages) do
    line = line .. " " .. ms(math.min(unpack(times[stage]))) .. " / "
      .. ms(math.max(unpack(times[stage]))) .. " |"
  end
  print(line)
  print()
end


local function run_burst(db, account_id)
  local list = {}
  for i = 1, burst do
    list[i] = { slug = string.format("burst-%02d", i), provider = "local",
      region = "local", server_type = "local" }
  end
  local t0 = create_machines(db, account_id, list)
  wait_stage(db, list, "server_created", 120)
  wait_stage(db, list, "services_ready", 120)
  local created, ready = 0, 0
  for _, m in ipairs(list) do
    created = math.max(created, m.server_created - t0)
    ready = math.max(ready, m.services_ready - t0)
  end
  print(string.format("%d local machines inserted in one transaction, "
    .. "provision.concurrency %d, poll_interval %g s:", burst, concurrency,
    poll_interval))
  print()
  print("| until | seconds | machines per second |")
  print("| --- | ---: | ---: |")
  print(string.format("| all in server_created | %.2f | %.1f |", created,
    burst / created))
  print(string.format("| all in services_ready | %.2f | %.1f |", ready,
    burst / ready))
  print()
end


-- Queues a delete job for every machine created and waits until all are
-- deleted; then stops any local daemon the provider still lists.
local function delete_machines(db)
  for _, m in ipairs(state.machines) do
    if m.id then
      db:query("UPDATE machines SET stage = 'deleting' WHERE id = $1 AND "
        .. "stage <> 'deleted'", { m.id })
      db:query("INSERT INTO jobs (kind, machine_id) VALUES ('delete', $1)",
        { m.id })
    end
  end
  local deadline = core.now() + 90
  while core.now() < deadline do
    local row = assert(db:query("SELECT count(*)::int AS n FROM machines "
      .. "WHERE stage <> 'deleted'"))[1]
    if tonumber(row.n) == 0 then
      break
    end
    core.sleep(0.1)
    core.update_time()
  end
  local left = assert(db:query("SELECT count(*)::int AS n FROM machines "
    .. "WHERE stage <> 'deleted'"))[1].n
  if tonumber(left) > 0 then
    log("%s machines were not deleted within 90 s", tostring(left))
  end
end


local function sweep_local()
  local driver = assert(local_provider.new(LOCAL))
  for _, slug in ipairs(driver:list_machines()) do
    log("stopping the leftover local machine %s", slug)
    driver:delete_server(slug)
  end
end


local function main()
  local dbname = string.format("justavps_bench_%d_%06d", os.time(),
    math.random(0, 999999))
  local admin = connect()
  assert(admin:query('CREATE DATABASE "' .. dbname .. '"'))
  admin:close()
  state.dbname = dbname

  start_platform(dbname)
  local db = connect(dbname)
  state.db = db
  local account_id = assert(db:query("INSERT INTO accounts (name) VALUES "
    .. "($1) RETURNING id", { "provision-bench" }))[1].id

  log("local provider, %d machines one after another", sequential)
  local stages = { "server_created", "services_ready" }
  local local_times = run_sequential(db, account_id, "seq-local",
    { provider = "local", region = "local", server_type = "local" }, stages)

  log("Hetzner driver against the fake API, %d machines", sequential)
  local hetzner_times = run_sequential(db, account_id, "seq-hetzner",
    { provider = "hetzner", region = "fsn1", server_type = "cx23" },
    { "server_created" })

  log("burst of %d local machines", burst)
  print_sequential(string.format("Local provider, %d machines created one "
    .. "after another:", sequential), local_times, stages)
  print_sequential(string.format("Hetzner driver against "
    .. "tools/fake_hetzner.lua --ready-polls 0, %d machines created one "
    .. "after another:", sequential), hetzner_times, { "server_created" })
  run_burst(db, account_id)
end


local function teardown()
  if state.db then
    local ok, err = pcall(delete_machines, state.db)
    if not ok then
      log("deleting the machines failed: %s", tostring(err))
    end
    state.db:close()
  end
  local ok, err = pcall(sweep_local)
  if not ok then
    log("stopping the local machines failed: %s", tostring(err))
  end
  local p = state.platform
  if p and not p.proc:exited() then
    p.proc:kill("SIGTERM")
    p.proc:wait(15)
  end
  if state.dbname then
    local admin = connect()
    admin:query('DROP DATABASE IF EXISTS "' .. state.dbname
      .. '" WITH (FORCE)')
    admin:close()
  end
end


local status = 0
core.spawn(function()
  local ok, err = xpcall(main, debug.traceback)
  if not ok then
    log("failed: %s", tostring(err))
    status = 1
  end
  teardown()
  core.stop()
end)
core.run()
os.exit(status)
