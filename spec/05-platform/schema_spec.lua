-- The platform schema in sql/ and the justavps.db helpers, against the real
-- PostgreSQL of tools/pg.sh. The spec migrates a database of its own,
-- justavps_spec_<random>, and drops it at the end.
local core = require("justavps.core")
local helpers = require("support.helpers")
local json = require("justavps.json")
local log = require("justavps.log")
local migrate = require("justavps.db.migrate")
local db = require("justavps.db.db")

local async = helpers.async
local pg = core.pg


local function shell(command)
  local f = assert(io.popen(command .. " 2>&1"))
  local out = f:read("*a")
  local ok, _, status = f:close()
  if not ok then
    error("command failed (" .. tostring(status) .. "): " .. command .. "\n" .. out, 2)
  end
  return out
end


local function cluster_settings()
  local env = {
    PGHOST = os.getenv("PGHOST"),
    PGPORT = os.getenv("PGPORT"),
    PGUSER = os.getenv("PGUSER"),
    PGDATABASE = os.getenv("PGDATABASE"),
  }
  if not env.PGHOST then
    shell("tools/pg.sh start")
    for name, value in shell("tools/pg.sh env"):gmatch("export (PG%u+)=(%S+)") do
      env[name] = value
    end
  end
  assert(env.PGHOST and env.PGPORT, "no PostgreSQL for the spec: run "
    .. "`tools/pg.sh start` and `eval \"$(tools/pg.sh env)\"`, or tools/test.sh")
  return env
end

local settings = cluster_settings()

local DBNAME = string.format("justavps_spec_%d_%06d", os.time(), math.random(0, 999999))


local function conninfo(dbname)
  return {
    host = settings.PGHOST,
    port = settings.PGPORT,
    user = settings.PGUSER,
    dbname = dbname or DBNAME,
  }
end


local function connect(dbname)
  return assert(pg.connect(conninfo(dbname), { timeout = 30 }))
end


local function hex(n)
  return string.rep(string.format("%x", n % 16), 64)
end


local function random_hex()
  return core.crypto.hex_encode(core.crypto.random_bytes(32))
end


-- Asserts that a query failed with the SQLSTATE want.
local function assert_rejected(want, ok, err, code)
  assert.is_nil(ok, "expected SQLSTATE " .. want .. ", the statement succeeded")
  assert.equal(want, code, err)
end


describe("schema", function()
  local c
  local previous_logger

  setup(function()
    assert(DBNAME:match("^justavps_spec_[0-9_]+$"))
    previous_logger = log.set_default(log.new({ write = function() end }))
    helpers.run(function()
      local admin = connect(settings.PGDATABASE)
      assert(admin:query('CREATE DATABASE "' .. DBNAME .. '"'))
      admin:close()
      assert(migrate.run({ conninfo = conninfo(), dir = "sql" }))
      c = connect()
    end, 60)
  end)

  teardown(function()
    log.set_default(previous_logger)
    helpers.run(function()
      if c then
        c:close()
      end
      db.close()
      local admin = connect(settings.PGDATABASE)
      assert(admin:query('DROP DATABASE IF EXISTS "' .. DBNAME .. '" WITH (FORCE)'))
      admin:close()
    end, 60)
  end)

  -- Inserts an account and returns its id.
  local function new_account()
    return assert(c:query("INSERT INTO accounts (name) VALUES ('spec') RETURNING id"))[1].id
  end

  local function new_user(account, email)
    return c:query("INSERT INTO users (account_id, email) VALUES ($1, $2) RETURNING id",
      { account, email })
  end

  local slug_counter = 0

  -- Inserts a machine and returns its id and slug.
  local function new_machine(account)
    slug_counter = slug_counter + 1
    local slug = "spec-machine-" .. slug_counter
    local res = assert(c:query("INSERT INTO machines (slug, account_id, name, provider, "
      .. "region, server_type, token) VALUES ($1, $2, 'spec', 'local', 'here', 'small', $3) "
      .. "RETURNING id", { slug, account, random_hex() }))
    return res[1].id, slug
  end

  describe("users", function()
    it("rejects an email differing only in case", async(function()
      local account = new_account()
      assert(new_user(account, "Ada@Example.com"))
      assert_rejected("23505", new_user(account, "ada@example.COM"))
      assert_rejected("23505", new_user(new_account(), "ADA@EXAMPLE.COM"))
    end))

    it("finds a user by email in any case", async(function()
      local account = new_account()
      local id = assert(new_user(account, "Grace@Example.com"))[1].id
      local res = assert(c:query("SELECT id FROM users WHERE lower(email) = lower($1)",
        { "GRACE@example.com" }))
      assert.equal(1, #res)
      assert.equal(id, res[1].id)
    end))

    it("rejects an address without @", async(function()
      assert_rejected("23514", new_user(new_account(), "not-an-address"))
    end))

    it("rejects a duplicate github id", async(function()
      local account = new_account()
      assert(c:query("INSERT INTO users (account_id, email, github_id) VALUES ($1, $2, 42)",
        { account, "gh1@example.com" }))
      assert_rejected("23505", c:query("INSERT INTO users (account_id, email, github_id) "
        .. "VALUES ($1, $2, 42)", { account, "gh2@example.com" }))
    end))

    it("keeps updated_at current", async(function()
      local id = assert(new_user(new_account(), "time@example.com"))[1].id
      assert(c:query("UPDATE users SET updated_at = now() - interval '1 day' WHERE id = $1",
        { id }))
      assert(c:query("UPDATE users SET email_verified = true WHERE id = $1", { id }))
      local row = assert(c:query("SELECT updated_at > now() - interval '1 minute' AS fresh "
        .. "FROM users WHERE id = $1", { id }))[1]
      assert.is_true(row.fresh)
    end))

    it("deletes sessions with their user", async(function()
      local user = assert(new_user(new_account(), "sess@example.com"))[1].id
      assert(c:query("INSERT INTO sessions (token_hash, user_id, csrf_secret_hash, expires_at) "
        .. "VALUES ($1, $2, $3, now() + interval '1 day')", { random_hex(), user, random_hex() }))
      assert(c:query("DELETE FROM users WHERE id = $1", { user }))
      local res = assert(c:query("SELECT count(*)::int AS n FROM sessions WHERE user_id = $1",
        { user }))
      assert.equal(0, res[1].n)
    end))
  end)

  describe("api_keys", function()
    local function insert_key(scopes)
      return c:query("INSERT INTO api_keys (account_id, name, prefix, hash, scopes) "
        .. "VALUES ($1, 'spec', $2, $3, $4::text[]) RETURNING id",
        { new_account(), random_hex():sub(1, 12), random_hex(), scopes })
    end

    it("accepts the five scopes", async(function()
      assert(insert_key("{read,write,delete,exec,proxy}"))
      assert(insert_key("{read}"))
    end))

    it("rejects an unknown scope", async(function()
      assert_rejected("23514", insert_key("{read,admin}"))
    end))

    it("rejects an empty scope list", async(function()
      assert_rejected("23514", insert_key("{}"))
    end))

    it("rejects a NULL scope", async(function()
      assert_rejected("23514", insert_key("{read,NULL}"))
    end))

    it("rejects a duplicate prefix", async(function()
      local account = new_account()
      local sql = "INSERT INTO api_keys (account_id, name, prefix, hash, scopes) "
        .. "VALUES ($1, 'spec', 'abcdefgh12', $2, '{read}')"
      assert(c:query(sql, { account, random_hex() }))
      assert_rejected("23505", c:query(sql, { account, random_hex() }))
    end))
  end)

  describe("machines", function()
    it("rejects an unknown stage", async(function()
      local id = new_machine(new_account())
      assert(c:query("UPDATE machines SET stage = 'services_ready' WHERE id = $1", { id }))
      assert_rejected("23514", c:query("UPDATE machines SET stage = 'booting' WHERE id = $1",
        { id }))
    end))

    it("rejects an invalid slug", async(function()
      local account = new_account()
      for _, slug in ipairs({ "ab", "Upper-case", "under_score", string.rep("a", 41) }) do
        assert_rejected("23514", c:query("INSERT INTO machines (slug, account_id, name, "
          .. "provider, region, server_type, token) VALUES ($1, $2, 'x', 'local', 'r', 't', $3)",
          { slug, account, random_hex() }))
      end
    end))

    it("rejects a duplicate slug", async(function()
      local account = new_account()
      local _, slug = new_machine(account)
      assert_rejected("23505", c:query("INSERT INTO machines (slug, account_id, name, "
        .. "provider, region, server_type, token) VALUES ($1, $2, 'x', 'local', 'r', 't', $3)",
        { slug, account, random_hex() }))
    end))

    it("keeps an account with machines from deletion", async(function()
      local account = new_account()
      new_machine(account)
      assert_rejected("23503", c:query("DELETE FROM accounts WHERE id = $1", { account }))
    end))

    it("deletes events and tokens with the machine", async(function()
      local id = new_machine(new_account())
      assert(c:query("INSERT INTO machine_events (machine_id, stage) VALUES ($1, 'failed')",
        { id }))
      assert(c:query("INSERT INTO proxy_tokens (machine_id, port, token_hash, expires_at) "
        .. "VALUES ($1, 3000, $2, now() + interval '1 hour')", { id, random_hex() }))
      assert(c:query("DELETE FROM machines WHERE id = $1", { id }))
      local res = assert(c:query("SELECT (SELECT count(*) FROM machine_events WHERE "
        .. "machine_id = $1)::int AS events, (SELECT count(*) FROM proxy_tokens WHERE "
        .. "machine_id = $1)::int AS tokens", { id }))
      assert.equal(0, res[1].events)
      assert.equal(0, res[1].tokens)
    end))

    it("rejects a ticket valid for more than 60 s", async(function()
      local account = new_account()
      local machine = new_machine(account)
      local user = assert(new_user(account, "ticket@example.com"))[1].id
      local sql = "INSERT INTO machine_tickets (machine_id, user_id, ticket_hash, expires_at) "
        .. "VALUES ($1, $2, $3, now() + $4::interval)"
      assert(c:query(sql, { machine, user, random_hex(), "60 seconds" }))
      assert_rejected("23514", c:query(sql, { machine, user, random_hex(), "61 seconds" }))
    end))

    it("spends a ticket once", async(function()
      local account = new_account()
      local machine = new_machine(account)
      local user = assert(new_user(account, "once@example.com"))[1].id
      local hash = random_hex()
      assert(c:query("INSERT INTO machine_tickets (machine_id, user_id, ticket_hash) "
        .. "VALUES ($1, $2, $3)", { machine, user, hash }))
      local spend = "UPDATE machine_tickets SET used_at = now() WHERE ticket_hash = $1 "
        .. "AND used_at IS NULL AND expires_at > now() RETURNING machine_id"
      assert.equal(1, #assert(c:query(spend, { hash })))
      assert.equal(0, #assert(c:query(spend, { hash })))
    end))

    it("rejects a proxy token for port 0", async(function()
      local id = new_machine(new_account())
      assert_rejected("23514", c:query("INSERT INTO proxy_tokens (machine_id, port, "
        .. "token_hash, expires_at) VALUES ($1, 0, $2, now() + interval '1 hour')",
        { id, random_hex() }))
    end))
  end)

  describe("machine_events", function()
    it("rejects an unknown stage", async(function()
      local id = new_machine(new_account())
      assert_rejected("23514", c:query("INSERT INTO machine_events (machine_id, stage) "
        .. "VALUES ($1, 'rebooting')", { id }))
    end))

    it("notifies listeners with slug and id on commit", async(function()
      local id, slug = new_machine(new_account())
      local listener = connect()
      assert(listener:listen("machine_events"))

      local writer = connect()
      assert(writer:begin())
      local event = assert(writer:query("INSERT INTO machine_events (machine_id, stage, detail) "
        .. "VALUES ($1, 'server_created', '{\"ip\":\"192.0.2.1\"}') RETURNING id", { id }))[1].id
      assert.is_number(event)

      -- Nothing is delivered before the commit.
      local channel = listener:wait_notification(0.2)
      assert.is_nil(channel)

      assert(writer:commit())
      local payload
      channel, payload = listener:wait_notification(5)
      assert.equal("machine_events", channel)
      local decoded = assert(json.decode(payload))
      assert.equal(event, decoded.id)
      assert.equal(slug, decoded.slug)
      assert.equal("server_created", decoded.stage)

      writer:close()
      listener:close()
    end))

    it("sends nothing for a rolled back insert", async(function()
      local id = new_machine(new_account())
      local listener = connect()
      assert(listener:listen("machine_events"))
      local writer = connect()
      assert(writer:begin())
      assert(writer:query("INSERT INTO machine_events (machine_id, stage) VALUES ($1, 'failed')",
        { id }))
      assert(writer:rollback())
      assert.is_nil((listener:wait_notification(0.3)))
      writer:close()
      listener:close()
    end))

    it("numbers one machine's events in commit order", async(function()
      local id = new_machine(new_account())
      local first, second = connect(), connect()

      -- first locks the machine row, so second's insert waits in the
      -- trigger before it draws an id.
      assert(first:begin())
      assert(first:query("UPDATE machines SET last_seen_at = now() WHERE id = $1", { id }))

      local second_id
      local second_done = core.waiter()
      core.spawn(function()
        local res = assert(second:query("INSERT INTO machine_events (machine_id, stage) "
          .. "VALUES ($1, 'cloud_init_done') RETURNING id", { id }))
        second_id = res[1].id
        second_done:wake()
      end)
      core.sleep(0.2)
      assert.is_nil(second_id)

      local first_id = assert(first:query("INSERT INTO machine_events (machine_id, stage) "
        .. "VALUES ($1, 'cloud_init_running') RETURNING id", { id }))[1].id
      assert(first:commit())
      if not second_id then
        second_done:wait(5)
      end
      assert.is_number(second_id)
      assert.is_true(second_id > first_id)

      first:close()
      second:close()
    end))
  end)

  describe("jobs", function()
    it("enqueues one job per machine and kind", async(function()
      local id = new_machine(new_account())
      local sql = "INSERT INTO jobs (kind, machine_id) VALUES ('create_server', $1) "
        .. "ON CONFLICT (machine_id, kind) DO NOTHING RETURNING id"
      assert.equal(1, #assert(c:query(sql, { id })))
      assert.equal(0, #assert(c:query(sql, { id })))
    end))

    it("rejects an unknown state", async(function()
      assert_rejected("23514", c:query("INSERT INTO jobs (kind, state) VALUES ('x', 'paused')"))
    end))

    it("hands each job to one worker with SKIP LOCKED", async(function()
      assert(c:query("DELETE FROM jobs"))
      assert(c:query("INSERT INTO jobs (kind, run_at) VALUES ('a', now() - interval '2 s'), "
        .. "('b', now() - interval '1 s')"))
      local claim = "UPDATE jobs SET state = 'running', attempts = attempts + 1, "
        .. "locked_by = $1, locked_until = now() + interval '1 minute' "
        .. "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND run_at <= now() "
        .. "ORDER BY run_at LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING kind"
      local w1, w2 = connect(), connect()
      assert(w1:begin())
      assert(w2:begin())
      local a = assert(w1:query(claim, { "w1" }, { timeout = 5 }))
      local b = assert(w2:query(claim, { "w2" }, { timeout = 5 }))
      assert.equal("a", a[1].kind)
      assert.equal("b", b[1].kind)
      assert(w1:commit())
      assert(w2:commit())
      w1:close()
      w2:close()
    end))
  end)

  describe("releases", function()
    local function insert_release(version, sha)
      return c:query("INSERT INTO releases (version, url, sha256) "
        .. "VALUES ($1, 'https://releases.example/justavps', $2)", { version, sha })
    end

    it("accepts lowercase hex sha256", async(function()
      assert(insert_release("1.0.0", hex(10)))
    end))

    it("rejects a bad sha256", async(function()
      assert_rejected("23514", insert_release("1.0.1", hex(10):upper()))
      assert_rejected("23514", insert_release("1.0.2", hex(10):sub(2)))
      assert_rejected("23514", insert_release("1.0.3", hex(10) .. "0"))
      assert_rejected("23514", insert_release("1.0.4", ("g"):rep(64)))
    end))

    it("rejects a duplicate version", async(function()
      assert(insert_release("2.0.0", hex(11)))
      assert_rejected("23505", insert_release("2.0.0", hex(12)))
    end))
  end)

  describe("billing_events", function()
    it("records a Stripe event once", async(function()
      local sql = "INSERT INTO billing_events (stripe_event_id, type, payload) "
        .. "VALUES ($1, 'invoice.paid', '{}') ON CONFLICT (stripe_event_id) DO NOTHING "
        .. "RETURNING id"
      assert.equal(1, #assert(c:query(sql, { "evt_spec_1" })))
      assert.equal(0, #assert(c:query(sql, { "evt_spec_1" })))
    end))
  end)

  describe("justavps.db", function()
    setup(function()
      db.setup({ url = string.format("host='%s' port=%s user=%s dbname=%s",
        settings.PGHOST, settings.PGPORT, settings.PGUSER, DBNAME), pool_size = 2 })
    end)

    it("returns one row", async(function()
      local row = assert(db.one("SELECT $1::int + 1 AS n", { 41 }))
      assert.equal(42, row.n)
    end))

    it("returns not_found for no row", async(function()
      local row, err, code = db.one("SELECT 1 WHERE false")
      assert.is_nil(row)
      assert.equal("not_found", code)
      assert.is_string(err)
    end))

    it("returns too_many_rows for two rows", async(function()
      local row, _, code = db.one("SELECT generate_series(1, 2)")
      assert.is_nil(row)
      assert.equal("too_many_rows", code)
    end))

    it("returns rows that encode as a JSON array", async(function()
      local rows = assert(db.rows("SELECT 1 AS n WHERE false"))
      assert.equal("[]", json.encode(rows))
      rows = assert(db.rows("SELECT generate_series(1, 2) AS n"))
      assert.equal('[{"n":1},{"n":2}]', json.encode(rows))
    end))

    it("returns the SQLSTATE of a failed query", async(function()
      local res, _, code = db.query("INSERT INTO jobs (kind, state) VALUES ('x', 'paused')")
      assert.is_nil(res)
      assert.equal(db.sqlstate.check_violation, code)
    end))

    it("commits a transaction", async(function()
      local account = assert(db.tx(function(tx)
        local row = assert(tx:one("INSERT INTO accounts (name) VALUES ('tx') RETURNING id"))
        assert(tx:query("INSERT INTO users (account_id, email) VALUES ($1, 'tx@example.com')",
          { row.id }))
        return row.id
      end))
      assert.equal(1, #assert(db.rows("SELECT 1 FROM users WHERE account_id = $1",
        { account })))
    end))

    it("rolls back when fn returns an error", async(function()
      local ok, err, code = db.tx(function(tx)
        assert(tx:query("INSERT INTO accounts (name) VALUES ('rolled-back')"))
        return nil, "stop", "conflict"
      end)
      assert.is_nil(ok)
      assert.equal("stop", err)
      assert.equal("conflict", code)
      assert.equal(0, #assert(db.rows("SELECT 1 FROM accounts WHERE name = 'rolled-back'")))
    end))

    it("rolls back and raises again when fn raises", async(function()
      local ok = pcall(db.tx, function(tx)
        assert(tx:query("INSERT INTO accounts (name) VALUES ('raised')"))
        error("boom")
      end)
      assert.is_false(ok)
      assert.equal(0, #assert(db.rows("SELECT 1 FROM accounts WHERE name = 'raised'")))
    end))

    it("raises on a nested transaction", async(function()
      local ok, err = pcall(db.tx, function(tx)
        return tx:tx(function() end)
      end)
      assert.is_false(ok)
      assert.matches("already inside a transaction", err)
    end))
  end)
end)
