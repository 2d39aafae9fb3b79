-- Group commit of heartbeats against a real platform process: bursts of
-- concurrent heartbeats, a stage change inside a burst, failures that
-- must stay with one heartbeat, a deleted machine, and the database going
-- away. The platform reaches PostgreSQL through a TCP relay in this
-- process, so a spec can cut the database off.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")
local spec_pg = require("support.pg")
local platform = require("support.platform")

local async = helpers.async

local TOKEN = "batch-token-0123456789abcdef0123456789ab"
-- Machines batch-01 .. batch-MACHINES start at services_ready.
local MACHINES = 8

local settings = spec_pg.settings()


-- Machine signatures from the wire contract.
local function sign(token, path, body)
  return platform.sign_machine(token, "POST", path, body)
end


local function slug_of(i)
  return string.format("batch-%02d", i)
end


-- A TCP relay from a loopback port to PostgreSQL's TCP port. cut() closes
-- the listener and every relayed connection, as a database that went
-- away; restore() listens again on the same port.
local function start_relay(target_port)
  local relay = { sockets = {} }

  local function on_accept(client)
    local server = core.tcp.connect("127.0.0.1", target_port,
      { timeout = 10 })
    if not server then
      client:close()
      return
    end
    server:settimeout(0)
    relay.sockets[client] = true
    relay.sockets[server] = true
    core.pipe(client, server)
    relay.sockets[client] = nil
    relay.sockets[server] = nil
    client:close()
    server:close()
  end

  function relay.listen(port)
    relay.listener = assert(core.tcp.listen({ host = "127.0.0.1",
      port = port or 0, on_accept = on_accept }))
    relay.port = relay.listener:port()
  end

  function relay.cut()
    relay.listener:close()
    for sock in pairs(relay.sockets) do
      relay.sockets[sock] = nil
      pcall(sock.close, sock)
    end
  end

  function relay.restore()
    relay.listen(relay.port)
  end

  relay.listen()
  return relay
end


describe("heartbeat group commit", function()
  local database, p, relay

  setup(function()
    helpers.run(function()
      database = platform.database()
      local db = database:connect()
      local acct = assert(db:query("INSERT INTO accounts (name) VALUES ($1) "
        .. "RETURNING id", { "spec" }))[1].id
      local function add_machine(slug, stage)
        assert(db:query("INSERT INTO machines (slug, account_id, name, "
          .. "provider, region, server_type, stage, token) VALUES ($1, $2, "
          .. "$3, $4, $5, $6, $7, $8)", { slug, acct, "batch", "local",
          "local", "local", stage, TOKEN }))
      end
      for i = 1, MACHINES do
        add_machine(slug_of(i), "services_ready")
      end
      add_machine("batch-stage", "cloud_init_running")
      add_machine("batch-gone", "services_ready")
      add_machine("batch-down", "services_ready")
      add_machine("batch-cold", "services_ready")
      add_machine("batch-behind", "server_created")
      db:close()

      -- PostgreSQL listens on 127.0.0.1 at the port of the socket.
      relay = start_relay(tonumber(settings.PGPORT))
      -- A long collect time, so that a burst lands in few batches.
      p = platform.start(database, { env = {
        PGHOST = "127.0.0.1", PGPORT = tostring(relay.port),
        JUSTAVPS_PLATFORM_PROVISION_ENABLED = "false",
        JUSTAVPS_PLATFORM_HEARTBEAT_BATCH_DELAY = "0.05" } })
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      if p then
        p:stop()
      end
      if relay then
        relay.cut()
      end
      if database then
        database:drop()
      end
    end, 60)
  end)

  -- Sends a heartbeat with body_table, signed with token (TOKEN by
  -- default). Returns the status and the decoded reply.
  local function heartbeat(slug, body_table, token)
    local path = "/api/v1/machines/" .. slug .. "/heartbeat"
    local body = json.encode(body_table)
    local status, text = p:raw("POST", path, sign(token or TOKEN, path, body),
      body)
    return status, text ~= "" and json.decode(text) or nil
  end

  -- Sends every heartbeat of calls ({ slug, body, token }) at once and
  -- returns the statuses and replies in the order of calls.
  local function burst(calls)
    local statuses, replies = {}, {}
    local left = #calls
    local done = core.waiter()
    for i, call in ipairs(calls) do
      core.spawn(function()
        statuses[i], replies[i] = heartbeat(call[1], call[2], call[3])
        left = left - 1
        if left == 0 then
          done:wake()
        end
      end)
    end
    if left > 0 then
      done:wait(30)
    end
    return statuses, replies
  end

  local function steady(version)
    return { version = version, stage = "services_ready",
      ports = { { port = 3000, address = "127.0.0.1" } },
      metrics = { cpu = { usage_percent = 5 }, load = { ["1"] = 0.25 } } }
  end

  local function query(sql, params)
    local db = database:connect()
    local rows = assert(db:query(sql, params))
    db:close()
    return rows
  end

  local function metrics_count(slug)
    return query("SELECT count(*)::int AS n FROM machine_metrics mm "
      .. "JOIN machines m ON m.id = mm.machine_id WHERE m.slug = $1",
      { slug })[1].n
  end

  it("records every heartbeat of a burst", async(function()
    local calls = {}
    for round = 1, 5 do
      for i = 1, MACHINES do
        calls[#calls + 1] = { slug_of(i), steady("2.0." .. round) }
      end
    end
    local statuses = burst(calls)
    for i = 1, #calls do
      assert.equal(200, statuses[i], "heartbeat " .. i)
    end

    local rows = query("SELECT count(*)::int AS n, "
      .. "count(DISTINCT at)::int AS commits FROM machine_metrics mm "
      .. "JOIN machines m ON m.id = mm.machine_id WHERE m.slug LIKE "
      .. "'batch-0%'")
    assert.equal(#calls, rows[1].n)
    -- Rows of one statement share its transaction's now(), so fewer
    -- distinct times than rows show that heartbeats shared commits.
    assert.is_true(rows[1].commits < #calls,
      rows[1].commits .. " commits for " .. #calls .. " heartbeats")

    local seen = query("SELECT count(*)::int AS n FROM machines "
      .. "WHERE slug LIKE 'batch-0%' AND last_seen_at IS NOT NULL "
      .. "AND version LIKE '2.0.%' AND ports @> '[{\"port\": 3000}]'")
    assert.equal(MACHINES, seen[1].n)
  end, 60))

  it("records a stage change inside a burst", async(function()
    local listener = database:connect()
    assert(listener:listen("machine_events"))

    local calls = {}
    for i = 1, MACHINES do
      calls[#calls + 1] = { slug_of(i), steady("2.1.0") }
    end
    table.insert(calls, 4, { "batch-stage", steady("2.1.0") })
    local statuses = burst(calls)
    for i = 1, #calls do
      assert.equal(200, statuses[i], "heartbeat " .. i)
    end

    local events = query("SELECT e.stage::text AS stage FROM machine_events "
      .. "e JOIN machines m ON m.id = e.machine_id WHERE m.slug = $1 "
      .. "ORDER BY e.id", { "batch-stage" })
    assert.equal(2, #events)
    assert.equal("cloud_init_done", events[1].stage)
    assert.equal("services_ready", events[2].stage)
    local machine = query("SELECT stage::text AS stage FROM machines "
      .. "WHERE slug = $1", { "batch-stage" })[1]
    assert.equal("services_ready", machine.stage)
    assert.equal(1, metrics_count("batch-stage"))

    local notified = {}
    for _ = 1, 2 do
      local channel, payload = listener:wait_notification(5)
      assert.equal("machine_events", channel)
      local note = json.decode(payload)
      assert.equal("batch-stage", note.slug)
      notified[#notified + 1] = note.stage
    end
    assert.same({ "cloud_init_done", "services_ready" }, notified)
    listener:close()

    -- The next heartbeat of that machine changes nothing more.
    assert.equal(200, (heartbeat("batch-stage", steady("2.1.0"))))
    local after = query("SELECT count(*)::int AS n FROM machine_events e "
      .. "JOIN machines m ON m.id = e.machine_id WHERE m.slug = $1",
      { "batch-stage" })
    assert.equal(2, after[1].n)
  end, 60))

  it("plans stage moves from the locked row", async(function()
    -- No stage in the report: the batch path, and the lookup cache keeps
    -- server_created.
    assert.equal(200, (heartbeat("batch-behind", { version = "2.6.0" })))
    -- Moved on behind this process's cache, as another process would.
    query("UPDATE machines SET stage = 'cloud_init_done' WHERE slug = $1",
      { "batch-behind" })

    assert.equal(200, (heartbeat("batch-behind", steady("2.6.1"))))
    local machine = query("SELECT stage::text AS stage FROM machines "
      .. "WHERE slug = $1", { "batch-behind" })[1]
    assert.equal("services_ready", machine.stage)
    local events = query("SELECT e.stage::text AS stage FROM machine_events "
      .. "e JOIN machines m ON m.id = e.machine_id WHERE m.slug = $1 "
      .. "ORDER BY e.id", { "batch-behind" })
    assert.equal(1, #events)
    assert.equal("services_ready", events[1].stage)
  end, 60))

  it("fails only the heartbeat with a bad signature", async(function()
    local before = metrics_count(slug_of(1))
    local calls = {}
    for i = 1, MACHINES do
      calls[i] = { slug_of(i), steady("2.2.0") }
    end
    calls[3][3] = "wrong-token-0123456789abcdef0123456789ab"
    local statuses, replies = burst(calls)
    for i = 1, MACHINES do
      if i == 3 then
        assert.equal(401, statuses[i])
        assert.equal("bad_signature", replies[i].error.code)
      else
        assert.equal(200, statuses[i], "heartbeat " .. i)
      end
    end
    assert.equal(before + 1, metrics_count(slug_of(1)))
    local version = query("SELECT version FROM machines WHERE slug = $1",
      { slug_of(3) })[1].version
    assert.is_not.equal("2.2.0", version)
  end, 60))

  it("fails only the heartbeat with invalid metrics", async(function()
    local before = metrics_count(slug_of(2))
    local calls = {}
    for i = 1, MACHINES do
      calls[i] = { slug_of(i), steady("2.3.0") }
    end
    -- The platform stores NULL for a metric outside its column's CHECK,
    -- so this spec's database gets a CHECK of its own that one heartbeat
    -- breaks: the batch fails on its data and is written row by row.
    query("ALTER TABLE machine_metrics ADD CONSTRAINT spec_no_42 "
      .. "CHECK (load_15 IS DISTINCT FROM 42)")
    calls[5][2].metrics.load = { ["1"] = 1, ["5"] = 1, ["15"] = 42 }
    local statuses, replies = burst(calls)
    query("ALTER TABLE machine_metrics DROP CONSTRAINT spec_no_42")
    for i = 1, MACHINES do
      if i == 5 then
        assert.equal(500, statuses[i])
        assert.equal("internal", replies[i].error.code)
      else
        assert.equal(200, statuses[i], "heartbeat " .. i)
      end
    end
    assert.equal(before + 1, metrics_count(slug_of(2)))
    local version = query("SELECT version FROM machines WHERE slug = $1",
      { slug_of(5) })[1].version
    assert.is_not.equal("2.3.0", version)
  end, 60))

  it("rejects a machine deleted after its lookup", async(function()
    assert.equal(200, (heartbeat("batch-gone", steady("2.4.0"))))
    -- Deleted behind the platform's back, as another platform process
    -- would, so the machine stays in this process's lookup cache.
    query("UPDATE machines SET stage = 'deleted', deleted_at = now() "
      .. "WHERE slug = $1", { "batch-gone" })
    local status, reply = heartbeat("batch-gone", steady("2.4.1"))
    assert.equal(401, status)
    assert.equal("unknown_machine", reply.error.code)
    assert.equal(1, metrics_count("batch-gone"))
    status, reply = heartbeat("batch-gone", steady("2.4.2"))
    assert.equal(401, status)
    assert.equal("unknown_machine", reply.error.code)
  end, 60))

  it("answers 503 while the database is away", async(function()
    -- The first heartbeat puts the machine in the lookup cache, so the
    -- next one reaches the batch write.
    assert.equal(200, (heartbeat("batch-down", steady("2.5.0"))))
    relay.cut()

    local status, reply = heartbeat("batch-down", steady("2.5.1"))
    assert.equal(503, status)
    assert.equal("database_unavailable", reply.error.code)
    -- A machine that is not cached fails at its lookup the same way.
    status, reply = heartbeat("batch-cold", steady("2.5.1"))
    assert.equal(503, status)
    assert.equal("database_unavailable", reply.error.code)

    relay.restore()
    -- The pool waits up to 2 s between connect attempts.
    local deadline = core.now() + 10
    repeat
      core.sleep(0.2)
      status = heartbeat("batch-down", steady("2.5.2"))
    until status == 200 or core.now() > deadline
    assert.equal(200, status)
    local version = query("SELECT version FROM machines WHERE slug = $1",
      { "batch-down" })[1].version
    assert.equal("2.5.2", version)
  end, 60))
end)
