-- core.pg against the real private PostgreSQL cluster of tools/pg.sh.
-- The connection comes from PGHOST, PGPORT, PGUSER and PGDATABASE, which
-- tools/test.sh exports; without them the spec starts the cluster itself.
local core = require("justavps.core")
local helpers = require("support.helpers")

local async = helpers.async
local pg = core.pg

-- Runs a shell command and returns its output, raising when it fails.
local function shell(command)
  local f = assert(io.popen(command .. " 2>&1"))
  local out = f:read("*a")
  local ok, _, status = f:close()
  if not ok then
    error("command failed (" .. tostring(status) .. "): " .. command .. "\n" .. out, 2)
  end
  return out
end

-- Returns { host=, port=, user=, dbname= } for the test cluster.
local function cluster_settings()
  local env = {
    PGHOST = os.getenv("PGHOST"),
    PGPORT = os.getenv("PGPORT"),
    PGUSER = os.getenv("PGUSER"),
    PGDATABASE = os.getenv("PGDATABASE"),
  }
  if not env.PGHOST then
    shell("tools/pg.sh start")
    local out = shell("tools/pg.sh env")
    for name, value in out:gmatch("export (PG%u+)=(%S+)") do
      env[name] = value
    end
  end
  assert(env.PGHOST and env.PGPORT, "no PostgreSQL for the spec: run "
    .. "`tools/pg.sh start` and `eval \"$(tools/pg.sh env)\"`, or tools/test.sh")
  return {
    host = env.PGHOST,
    port = env.PGPORT,
    user = env.PGUSER,
    dbname = env.PGDATABASE,
  }
end

local settings = cluster_settings()

-- Returns a copy of the cluster settings with the given keys replaced.
local function conninfo(extra)
  local t = {}
  for k, v in pairs(settings) do
    t[k] = v
  end
  for k, v in pairs(extra or {}) do
    t[k] = v
  end
  return t
end

local function connect()
  return assert(pg.connect(conninfo(), { timeout = 20 }))
end

-- Runs pg_ctl on the cluster as its owner, the way tools/pg.sh does. The
-- server's output goes to the cluster's log, because a server that kept
-- the popen pipe open would block the read of pg_ctl's output forever.
local function pg_ctl(args)
  local bindir = shell("ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1"):gsub("%s+$", "")
  local data = settings.host .. "/data"
  local command = string.format("%s/pg_ctl -D '%s' -l '%s/postgres.log' %s",
    bindir, data, settings.host, args)
  if shell("id -u"):match("^0") then
    command = "runuser -u postgres -- " .. command
  end
  return shell(command)
end

local schema = "spec_pg_" .. tostring(os.time()) .. "_" .. tostring(math.random(1e6))

describe("core.pg", function()
  setup(function()
    helpers.run(function()
      local c = connect()
      assert(c:query("CREATE SCHEMA " .. schema))
      c:close()
    end, 30)
  end)

  teardown(function()
    helpers.run(function()
      local c = connect()
      assert(c:query("DROP SCHEMA " .. schema .. " CASCADE"))
      c:close()
    end, 30)
  end)

  describe("connect", function()
    it("connects with a keyword table", async(function()
      local c, err = pg.connect(conninfo())
      assert.is_nil(err)
      assert.equal("ready", c:status())
      assert.is_number(c:backend_pid())
      local res = assert(c:query("SELECT 1 AS one"))
      assert.equal(1, res[1].one)
      c:close()
      assert.equal("closed", c:status())
    end))

    it("connects with a conninfo string", async(function()
      local s = string.format("host='%s' port=%s user=%s dbname=%s", settings.host,
        settings.port, settings.user, settings.dbname)
      local c = assert(pg.connect(s))
      assert.equal(1, assert(c:query("SELECT 1 AS one"))[1].one)
      c:close()
    end))

    it("returns 3D000 for an unknown database", async(function()
      local c, err, code = pg.connect(conninfo({ dbname = "no_such_db_for_spec" }))
      assert.is_nil(c)
      assert.equal("3D000", code)
      assert.matches("does not exist", err)
    end))

    it("returns 28000 for an unknown role", async(function()
      local c, err, code = pg.connect(conninfo({ user = "no_such_role_for_spec" }))
      assert.is_nil(c)
      assert.equal("28000", code)
      assert.matches("role", err)
    end))

    it("returns database_unavailable without a server", async(function()
      local c, err, code = pg.connect(conninfo({ host = "/nonexistent-pg-spec" }))
      assert.is_nil(c)
      assert.equal("database_unavailable", code)
      assert.is_string(err)
    end))

    it("raises outside a managed coroutine", function()
      assert.has_error(function()
        pg.connect(conninfo())
      end)
    end)
  end)

  describe("query", function()
    it("round-trips every supported type", async(function()
      local c = connect()
      local binary = "a\0b\255\0\\x00"
      local res = assert(c:query([[
        SELECT $1::int2 AS i2, $2::int4 AS i4, $3::int8 AS i8_small,
               $4::int8 AS i8_big, $5::float4 AS f4, $6::float8 AS f8,
               $7::numeric AS num, $8::bool AS yes, $9::bool AS no,
               $10::text AS txt, $11::varchar AS vc, $12::uuid AS id,
               $13::jsonb AS doc, $14::bytea AS bin, $15::text AS nothing,
               $16::int AS null_value, $17::timestamptz AS ts,
               $18::int8 AS i8_neg
      ]], {
        -32768, 2147483647, 9007199254740992, "9223372036854775807", 1.5, 0.1,
        "12345678901234567890.123456789012345678901", true, false,
        "unicode: żółw 🐢 日本", "varchar", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        '{"k": [1, 2]}', pg.bytea(binary), nil, pg.null,
        "2024-01-02 03:04:05+00", "-9223372036854775808",
        n = 18,
      }))
      local row = res[1]
      assert.equal(-32768, row.i2)
      assert.equal(2147483647, row.i4)
      assert.equal(9007199254740992, row.i8_small)
      assert.equal("9223372036854775807", row.i8_big)
      assert.equal("-9223372036854775808", row.i8_neg)
      assert.equal(1.5, row.f4)
      assert.equal(0.1, row.f8)
      assert.equal("12345678901234567890.123456789012345678901", row.num)
      assert.is_true(row.yes)
      assert.is_false(row.no)
      assert.equal("unicode: żółw 🐢 日本", row.txt)
      assert.equal("varchar", row.vc)
      assert.equal("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", row.id)
      assert.equal('{"k": [1, 2]}', row.doc)
      assert.equal(binary, row.bin)
      assert.equal(pg.null, row.nothing)
      assert.equal(pg.null, row.null_value)
      assert.is_string(row.ts)
      assert.matches("^2024%-01%-0", row.ts)
      assert.equal(18, #res.columns)
      assert.equal("i2", res.columns[1])
      assert.equal("i8_neg", res.columns[18])
      assert.equal(1, res.affected)
      c:close()
    end))

    it("equals json.null for NULL", async(function()
      local json = require("justavps.json")
      assert.equal(json.null, pg.null)
    end))

    it("reports affected rows and the command", async(function()
      local c = connect()
      local t = schema .. ".affected"
      assert(c:query("CREATE TABLE " .. t .. " (n int)"))
      local res = assert(c:query("INSERT INTO " .. t .. " SELECT generate_series(1, 3)"))
      assert.equal(3, res.affected)
      assert.equal("INSERT 0 3", res.command)
      res = assert(c:query("UPDATE " .. t .. " SET n = n + 1 WHERE n > $1", { 1 }))
      assert.equal(2, res.affected)
      c:close()
    end))

    it("keeps an injection attempt as data", async(function()
      local c = connect()
      local t = schema .. ".injection"
      assert(c:query("CREATE TABLE " .. t .. " (name text)"))
      local evil = "x'); DROP TABLE " .. t .. "; --"
      assert(c:query("INSERT INTO " .. t .. " (name) VALUES ($1)", { evil }))
      local res = assert(c:query("SELECT name FROM " .. t .. " WHERE name = $1", { evil }))
      assert.equal(1, #res)
      assert.equal(evil, res[1].name)
      res = assert(c:query("SELECT $1::text AS v", { "1; SELECT pg_sleep(100)" }))
      assert.equal("1; SELECT pg_sleep(100)", res[1].v)
      c:close()
    end))

    it("raises for a string with a NUL byte", async(function()
      local c = connect()
      local ok, err = pcall(c.query, c, "SELECT $1::text", { "a\0b" })
      assert.is_false(ok)
      assert.matches("pg.bytea", err)
      assert.equal(1, assert(c:query("SELECT 1 AS one"))[1].one)
      c:close()
    end))

    it("returns SQLSTATE 23505 for a unique violation", async(function()
      local c = connect()
      local t = schema .. ".uniq"
      assert(c:query("CREATE TABLE " .. t .. " (email text PRIMARY KEY)"))
      assert(c:query("INSERT INTO " .. t .. " VALUES ($1)", { "secret@example.test" }))
      local res, err, code = c:query("INSERT INTO " .. t .. " VALUES ($1)",
        { "secret@example.test" })
      assert.is_nil(res)
      assert.equal("23505", code)
      assert.matches("duplicate key", err)
      assert.is_nil(err:find("secret@example.test", 1, true))
      c:close()
    end))

    it("returns SQLSTATE 42601 for a syntax error", async(function()
      local c = connect()
      local res, err, code = c:query("SELEC 1")
      assert.is_nil(res)
      assert.equal("42601", code)
      assert.matches("syntax error", err)
      c:close()
    end))

    it("leaves parameter values out of messages", async(function()
      local c = connect()
      local res, err, code = c:query("SELECT $1::int", { "hunter2-secret" })
      assert.is_nil(res)
      assert.equal("22P02", code)
      assert.is_nil(err:find("hunter2", 1, true))
      c:close()
    end))

    it("queues concurrent queries in order", async(function()
      local c = connect()
      local t = schema .. ".queue"
      assert(c:query("CREATE TABLE " .. t .. " (seq serial, n int)"))
      local done, order = 0, {}
      local n = 6
      for i = 1, n do
        core.spawn(function()
          local res, err = c:query("INSERT INTO " .. t .. " (n) SELECT $1 FROM pg_sleep(0.02) "
            .. "RETURNING n", { i })
          assert(res, err)
          order[#order + 1] = res[1].n
          done = done + 1
        end)
      end
      while done < n do
        core.sleep(0.01)
      end
      for i = 1, n do
        assert.equal(i, order[i])
      end
      local res = assert(c:query("SELECT n FROM " .. t .. " ORDER BY seq"))
      for i = 1, n do
        assert.equal(i, res[i].n)
      end
      c:close()
    end, 30))

    it("fails a query in flight when closed", async(function()
      local c = connect()
      local result
      core.spawn(function()
        result = { c:query("SELECT pg_sleep(10)") }
      end)
      core.sleep(0.1)
      c:close()
      while not result do
        core.sleep(0.01)
      end
      assert.is_nil(result[1])
      assert.equal("closed", result[3])
      assert.has_error(function()
        c:query("SELECT 1")
      end)
    end))

    it("cancels a query that times out", async(function()
      local c = connect()
      local watcher = connect()
      local pid = c:backend_pid()
      local res, err, code = c:query("SELECT pg_sleep(10)", nil, { timeout = 0.3 })
      assert.is_nil(res)
      assert.equal("timeout", code)
      assert.matches("timed out", err)
      -- The connection is usable again once the cancel went through.
      assert.equal(2, assert(c:query("SELECT 2 AS two"))[1].two)
      local state = assert(watcher:query(
        "SELECT query FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", { pid }))
      assert.equal(0, #state)
      c:close()
      watcher:close()
    end, 30))
  end)

  describe("transaction", function()
    it("commits what fn did", async(function()
      local c = connect()
      local t = schema .. ".tx_commit"
      assert(c:query("CREATE TABLE " .. t .. " (n int)"))
      local a, b = c:transaction(function(conn)
        assert(conn:query("INSERT INTO " .. t .. " VALUES (1), (2)"))
        return "done", 2
      end)
      assert.equal("done", a)
      assert.equal(2, b)
      assert.equal("idle", c:transaction_status())
      assert.equal(2, #assert(c:query("SELECT n FROM " .. t)))
      c:close()
    end))

    it("rolls back and re-raises on error", async(function()
      local c = connect()
      local t = schema .. ".tx_raise"
      assert(c:query("CREATE TABLE " .. t .. " (n int)"))
      local ok, err = pcall(c.transaction, c, function(conn)
        assert(conn:query("INSERT INTO " .. t .. " VALUES (1)"))
        error("boom from fn")
      end)
      assert.is_false(ok)
      assert.matches("boom from fn", err)
      assert.equal("idle", c:transaction_status())
      assert.equal(0, #assert(c:query("SELECT n FROM " .. t)))
      c:close()
    end))

    it("rolls back when fn returns nil, err", async(function()
      local c = connect()
      local t = schema .. ".tx_nil"
      assert(c:query("CREATE TABLE " .. t .. " (n int PRIMARY KEY)"))
      local res, err, code = c:transaction(function(conn)
        assert(conn:query("INSERT INTO " .. t .. " VALUES (1)"))
        return conn:query("INSERT INTO " .. t .. " VALUES (1)")
      end)
      assert.is_nil(res)
      assert.equal("23505", code)
      assert.is_string(err)
      assert.equal(0, #assert(c:query("SELECT n FROM " .. t)))
      c:close()
    end))

    it("supports begin, commit and rollback", async(function()
      local c = connect()
      local t = schema .. ".tx_plain"
      assert(c:query("CREATE TABLE " .. t .. " (n int)"))
      assert(c:begin())
      assert(c:query("INSERT INTO " .. t .. " VALUES (1)"))
      assert.equal("intrans", c:transaction_status())
      assert(c:rollback())
      assert(c:begin())
      assert(c:query("INSERT INTO " .. t .. " VALUES (2)"))
      assert(c:commit())
      local res = assert(c:query("SELECT n FROM " .. t))
      assert.equal(1, #res)
      assert.equal(2, res[1].n)
      c:close()
    end))
  end)

  describe("listen and notify", function()
    it("delivers a notification to another connection", async(function()
      local listener, sender = connect(), connect()
      local channel = "spec channel \"quoted\""
      assert(listener:listen(channel))
      assert(sender:notify(channel, "hello"))
      local got_channel, payload, pid = listener:wait_notification(10)
      assert.equal(channel, got_channel)
      assert.equal("hello", payload)
      assert.equal(sender:backend_pid(), pid)
      listener:close()
      sender:close()
    end))

    it("keeps a notification that arrives during a query", async(function()
      local listener, sender = connect(), connect()
      assert(listener:listen("spec_during"))
      local finished = false
      core.spawn(function()
        core.sleep(0.1)
        assert(sender:query("NOTIFY spec_during, 'while busy'"))
        finished = true
      end)
      assert(listener:query("SELECT pg_sleep(0.5)"))
      assert.is_true(finished)
      local list = listener:notifications()
      assert.equal(1, #list)
      assert.equal("spec_during", list[1].channel)
      assert.equal("while busy", list[1].payload)
      assert.equal(sender:backend_pid(), list[1].pid)
      assert.equal(0, #listener:notifications())
      listener:close()
      sender:close()
    end))

    it("times out waiting for a notification", async(function()
      local listener = connect()
      assert(listener:listen("spec_silent"))
      local channel, err, code = listener:wait_notification(0.1)
      assert.is_nil(channel)
      assert.equal("timeout", code)
      assert.is_string(err)
      listener:close()
    end))
  end)

  describe("pool", function()
    it("serves more users than connections", async(function()
      local pool = pg.pool({ conninfo = conninfo(), size = 2, timeout = 20 })
      local users, done, pids, max_total = 8, 0, {}, 0
      for i = 1, users do
        core.spawn(function()
          local res, err = pool:query("SELECT pg_backend_pid() AS pid, $1::int AS i "
            .. "FROM pg_sleep(0.05)", { i })
          assert(res, err)
          assert.equal(i, res[1].i)
          pids[res[1].pid] = true
          max_total = math.max(max_total, pool:stats().total)
          done = done + 1
        end)
      end
      while done < users do
        core.sleep(0.01)
      end
      local distinct = 0
      for _ in pairs(pids) do
        distinct = distinct + 1
      end
      assert.is_true(distinct <= 2)
      assert.is_true(max_total <= 2)
      assert.equal(0, pool:stats().waiting)
      pool:close()
    end, 30))

    it("runs a transaction on one connection", async(function()
      local pool = pg.pool({ conninfo = conninfo(), size = 2 })
      local t = schema .. ".pool_tx"
      assert(pool:query("CREATE TABLE " .. t .. " (n int)"))
      assert(pool:transaction(function(conn)
        assert(conn:query("INSERT INTO " .. t .. " VALUES (1)"))
        return true
      end))
      assert.equal(1, #assert(pool:query("SELECT n FROM " .. t)))
      pool:close()
      local res, _, code = pool:query("SELECT 1")
      assert.is_nil(res)
      assert.equal("closed", code)
    end))

    it("times out waiting for a free connection", async(function()
      local pool = pg.pool({ conninfo = conninfo(), size = 1, timeout = 0.2 })
      local busy = true
      core.spawn(function()
        pool:query("SELECT pg_sleep(1)")
        busy = false
      end)
      local res, err, code = pool:query("SELECT 1")
      assert.is_nil(res)
      assert.equal("timeout", code)
      assert.is_string(err)
      while busy do
        core.sleep(0.05)
      end
      pool:close()
    end, 30))
  end)

  describe("server restart", function()
    it("fails in-flight queries and recovers", async(function()
      local pool = pg.pool({ conninfo = conninfo(), size = 2, timeout = 20 })
      local t = schema .. ".restart"
      assert(pool:query("CREATE TABLE " .. t .. " (n int)"))
      assert(pool:query("INSERT INTO " .. t .. " VALUES (1), (2)"))

      local inflight
      core.spawn(function()
        inflight = { pool:query("SELECT pg_sleep(30)") }
      end)
      core.sleep(0.2)
      pg_ctl("restart -m fast -w -t 60")
      while not inflight do
        core.sleep(0.05)
      end
      assert.is_nil(inflight[1])
      assert.equal("database_unavailable", inflight[3])

      local res, code
      for _ = 1, 200 do
        local err
        res, err, code = pool:query("SELECT count(*)::int AS n FROM " .. t)
        if res then
          break
        end
        assert.equal("database_unavailable", code, err)
        core.sleep(0.05)
      end
      assert.is_table(res)
      assert.equal(2, res[1].n)
      pool:close()
    end, 120))

    it("fails fast while the server is down", async(function()
      local pool = pg.pool({ conninfo = conninfo(), size = 2, timeout = 20 })
      assert(pool:query("SELECT 1"))
      local port = settings.port
      pg_ctl("stop -m fast -w -t 60")
      local ok, failure = pcall(function()
        for _ = 1, 5 do
          local res, err, code = pool:query("SELECT 1")
          assert.is_nil(res)
          assert.equal("database_unavailable", code)
          assert.is_string(err)
        end
      end)
      pg_ctl(string.format("start -w -t 60 -o '-p %s'", port))
      assert(ok, failure)

      local res
      for _ = 1, 200 do
        res = pool:query("SELECT 1 AS one")
        if res then
          break
        end
        core.sleep(0.05)
      end
      assert.is_table(res)
      assert.equal(1, res[1].one)
      pool:close()
    end, 120))
  end)
end)
