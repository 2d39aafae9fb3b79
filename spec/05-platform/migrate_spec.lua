-- The migration runner and the `justavps migrate` role against the real
-- PostgreSQL of tools/pg.sh (PGHOST, PGPORT, PGUSER, PGDATABASE from
-- tools/test.sh, or the spec starts the cluster). Every test that applies
-- migrations gets a database of its own, justavps_spec_<random>, which is
-- dropped afterwards, so the shared database stays clean.
local core = require("justavps.core")
local helpers = require("support.helpers")
local log = require("justavps.log")
local migrate = require("justavps.db.migrate")

local async = helpers.async
local pg = core.pg

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

local SQL_DIR = "sql"


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


-- Returns a libpq keyword table for dbname (default: the shared database).
local function conninfo(dbname)
  return {
    host = settings.PGHOST,
    port = settings.PGPORT,
    user = settings.PGUSER,
    dbname = dbname or settings.PGDATABASE,
  }
end


local function connect(dbname)
  return assert(pg.connect(conninfo(dbname), { timeout = 30 }))
end


-- Creates an empty database and returns its name. The name is checked
-- against a strict pattern before it is quoted into the statement, because
-- CREATE DATABASE takes no parameters.
local function create_database()
  local name = string.format("justavps_spec_%d_%06d", os.time(), math.random(0, 999999))
  assert(name:match("^justavps_spec_[0-9_]+$"))
  local c = connect()
  assert(c:query('CREATE DATABASE "' .. name .. '"'))
  c:close()
  return name
end


local function drop_database(name)
  assert(name:match("^justavps_spec_[0-9_]+$"))
  local c = connect()
  assert(c:query('DROP DATABASE IF EXISTS "' .. name .. '" WITH (FORCE)'))
  c:close()
end


-- Runs body(dbname) with a fresh database and drops it afterwards, also
-- when body fails.
local function with_database(body)
  return async(function()
    local name = create_database()
    local ok, err = xpcall(body, debug.traceback, name)
    drop_database(name)
    if not ok then
      error(err, 0)
    end
  end, 60)
end


local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end


local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end


local temp_dirs = {}

-- Makes a temporary migrations directory holding files (name -> SQL).
local function temp_dir(files)
  local dir = os.tmpname()
  os.remove(dir)
  shell("mkdir -p " .. dir)
  temp_dirs[#temp_dirs + 1] = dir
  for name, sql in pairs(files or {}) do
    write_file(dir .. "/" .. name, sql)
  end
  return dir
end


-- Copies the project's migrations into a temporary directory.
local function copy_of_sql_dir()
  local dir = temp_dir()
  shell("cp " .. SQL_DIR .. "/*.sql " .. dir .. "/")
  return dir
end


local function sql_files()
  local names = {}
  for name in shell("ls " .. SQL_DIR):gmatch("[^\n]+") do
    if name:match("%.sql$") then
      names[#names + 1] = name
    end
  end
  table.sort(names)
  return names
end


-- Runs the justavps binary with args and the PG* variables pointing at
-- dbname. Returns { process = p, collect = fn } where collect() waits for the exit and
-- returns status, stdout, stderr.
local function start_migrate(dbname, args)
  local env = {
    PATH = os.getenv("PATH"),
    PGHOST = settings.PGHOST,
    PGPORT = settings.PGPORT,
    PGUSER = settings.PGUSER,
    PGDATABASE = dbname,
  }
  local p = assert(core.proc.spawn{
    file = BIN, args = args, env = env,
    stdin = "null", stdout = "pipe", stderr = "pipe",
  })
  local out, err = {}, {}
  local done = 0
  local finished = core.waiter()

  local function drain(stream, into)
    core.spawn(function()
      while true do
        local chunk = stream:read()
        if not chunk then
          break
        end
        into[#into + 1] = chunk
      end
      stream:close()
      done = done + 1
      if done == 2 then
        finished:wake()
      end
    end)
  end
  drain(p.stdout, out)
  drain(p.stderr, err)

  local run = { process = p }
  function run.collect()
    local status = assert(p:wait(60))
    if done < 2 then
      finished:wait(10)
    end
    return status, table.concat(out), table.concat(err)
  end
  return run
end


local function run_migrate(dbname, args)
  return start_migrate(dbname, args).collect()
end


local function applied_rows(dbname)
  local c = connect(dbname)
  local res = assert(c:query("SELECT version, name, sha256, applied_at::text AS applied_at "
    .. "FROM schema_migrations ORDER BY version"))
  c:close()
  return res
end


local function table_exists(dbname, name)
  local c = connect(dbname)
  local res = assert(c:query("SELECT to_regclass($1) IS NOT NULL AS present", { name }))
  c:close()
  return res[1].present
end


describe("migrate", function()
  teardown(function()
    for _, dir in ipairs(temp_dirs) do
      shell("rm -rf " .. dir)
    end
  end)

  describe("split", function()
    it("splits at semicolons", function()
      local s = assert(migrate.split("SELECT 1;\nSELECT 2;\n\nSELECT 3"))
      assert.equal(3, #s)
      assert.equal("SELECT 1", s[1].sql)
      assert.equal(1, s[1].line)
      assert.equal("SELECT 2", s[2].sql)
      assert.equal(2, s[2].line)
      assert.equal("SELECT 3", s[3].sql)
      assert.equal(4, s[3].line)
    end)

    it("keeps semicolons in quotes and comments", function()
      local sql = "SELECT 'a;b', \"c;d\" -- e;f\n/* g; /* nested; */ h; */;"
        .. "SELECT E'it\\'s;', 'x''y;'"
      local s = assert(migrate.split(sql))
      assert.equal(2, #s)
      assert.matches("/%* g; /%* nested; %*/ h; %*/$", s[1].sql)
      assert.equal("SELECT E'it\\'s;', 'x''y;'", s[2].sql)
    end)

    it("keeps dollar-quoted bodies whole", function()
      local sql = "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\n"
        .. "BEGIN RETURN 1; END $$;\n"
        .. "CREATE FUNCTION g() RETURNS text LANGUAGE sql AS $body$ SELECT '$$;' $body$;\n"
        .. "SELECT $1::int, a$b FROM t"
      local s = assert(migrate.split(sql))
      assert.equal(3, #s)
      assert.matches("RETURN 1; END %$%$$", s[1].sql)
      assert.matches("SELECT '%$%$;' %$body%$$", s[2].sql)
      assert.equal("SELECT $1::int, a$b FROM t", s[3].sql)
    end)

    it("drops empty and comment-only statements", function()
      local s = assert(migrate.split(";; -- only a comment\n;\n/* x */;"))
      assert.equal(0, #s)
    end)

    it("rejects unterminated quotes and comments", function()
      for _, sql in ipairs({ "SELECT 'a", "SELECT \"a", "SELECT 1 /* x",
        "SELECT $$ a", "SELECT $t$ a $$" }) do
        local s, err = migrate.split(sql)
        assert.is_nil(s, sql)
        assert.matches("^line 1: unterminated", err)
      end
    end)
  end)

  describe("scan", function()
    it("lists the project's migrations", function()
      local list = assert(migrate.scan(SQL_DIR))
      local names = sql_files()
      assert.equal(#names, #list)
      for i, m in ipairs(list) do
        assert.equal(i, m.version)
        assert.equal(names[i], m.name)
        assert.matches("^[0-9a-f]+$", m.sha256)
        assert.equal(64, #m.sha256)
      end
    end)

    it("ignores files that are not .sql", function()
      local dir = temp_dir({ ["0001_a.sql"] = "SELECT 1", ["README.md"] = "x" })
      local list = assert(migrate.scan(dir))
      assert.equal(1, #list)
    end)

    it("rejects duplicate versions", function()
      local dir = temp_dir({ ["0001_a.sql"] = "SELECT 1", ["001_b.sql"] = "SELECT 1" })
      local list, err, code = migrate.scan(dir)
      assert.is_nil(list)
      assert.equal("invalid_migrations", code)
      assert.matches("0001_a.sql and 001_b.sql: duplicate version 1", err, 1, true)
    end)

    it("rejects a gap in the versions", function()
      local dir = temp_dir({ ["0001_a.sql"] = "SELECT 1", ["0003_c.sql"] = "SELECT 1" })
      local list, err, code = migrate.scan(dir)
      assert.is_nil(list)
      assert.equal("invalid_migrations", code)
      assert.matches("0003_c.sql: version 3 follows 0001_a.sql, expected version 2", err, 1, true)
    end)

    it("rejects versions that do not start at 1", function()
      local dir = temp_dir({ ["0002_b.sql"] = "SELECT 1" })
      local _, err = migrate.scan(dir)
      assert.matches("0002_b.sql: version 2 follows nothing, expected version 1", err, 1, true)
    end)

    it("rejects a badly named file", function()
      local dir = temp_dir({ ["0001_a.sql"] = "SELECT 1", ["two words.sql"] = "SELECT 1" })
      local _, err = migrate.scan(dir)
      assert.matches("two words.sql: invalid file name", err, 1, true)
    end)

    it("rejects a missing directory", function()
      local _, err, code = migrate.scan("/nonexistent-migrations-dir")
      assert.equal("invalid_migrations", code)
      assert.matches("not found", err)
    end)
  end)

  describe("run", function()
    -- The runner logs each applied migration; the spec keeps those lines.
    local previous_logger
    local logged = {}

    setup(function()
      previous_logger = log.set_default(log.new({
        write = function(level, msg, fields)
          logged[#logged + 1] = { level = level, msg = msg, fields = fields }
        end,
      }))
    end)

    teardown(function()
      log.set_default(previous_logger)
    end)

    it("applies every migration to an empty database", with_database(function(db)
      local first_log = #logged + 1
      local result = assert(migrate.run({ conninfo = conninfo(db), dir = SQL_DIR }))
      local names = sql_files()
      assert.equal(#names, result.applied)
      for i, name in ipairs(names) do
        local line = logged[first_log + i - 1]
        assert.equal("migration applied", line.msg)
        assert.equal(name, line.fields.file)
      end
      assert.equal(#names, result.total)

      local rows = applied_rows(db)
      assert.equal(#names, #rows)
      for i, row in ipairs(rows) do
        assert.equal(i, row.version)
        assert.equal(names[i], row.name)
        local content = read_file(SQL_DIR .. "/" .. names[i])
        local sha = core.crypto.hex_encode(core.crypto.sha256(content))
        assert.equal(sha, row.sha256)
      end
      for _, name in ipairs({ "accounts", "users", "sessions", "api_keys", "machines",
        "machine_events", "machine_metrics", "proxy_tokens", "machine_tickets", "jobs",
        "releases", "billing_customers", "billing_events" }) do
        assert.is_true(table_exists(db, name), name)
      end
    end))

    it("does nothing on a second run", with_database(function(db)
      assert(migrate.run({ conninfo = conninfo(db), dir = SQL_DIR }))
      local before = applied_rows(db)
      local result = assert(migrate.run({ conninfo = conninfo(db), dir = SQL_DIR }))
      assert.equal(0, result.applied)
      assert.same(before, applied_rows(db))
    end))

    it("applies only the new migration", with_database(function(db)
      local dir = temp_dir({ ["0001_a.sql"] = "CREATE TABLE a (x int)" })
      assert.equal(1, assert(migrate.run({ conninfo = conninfo(db), dir = dir })).applied)
      write_file(dir .. "/0002_b.sql", "CREATE TABLE b (x int);\nINSERT INTO b VALUES (1);")
      assert.equal(1, assert(migrate.run({ conninfo = conninfo(db), dir = dir })).applied)
      assert.is_true(table_exists(db, "b"))
      assert.equal(2, #applied_rows(db))
    end))

    it("rolls back a failing migration and keeps earlier ones", with_database(function(db)
      local dir = temp_dir({
        ["0001_a.sql"] = "CREATE TABLE a (x int);",
        ["0002_b.sql"] = "CREATE TABLE b (x int);\nINSERT INTO b VALUES (1);\n"
          .. "CREATE TABLE c (x int);\nSELEC oops;\n",
      })
      local ok, err, code, applied = migrate.run({ conninfo = conninfo(db), dir = dir })
      assert.is_nil(ok)
      assert.equal("42601", code)
      assert.matches("0002_b.sql:4: syntax error", err, 1, true)
      assert.equal(1, applied)
      assert.is_true(table_exists(db, "a"))
      assert.is_false(table_exists(db, "b"))
      assert.is_false(table_exists(db, "c"))
      local rows = applied_rows(db)
      assert.equal(1, #rows)
      assert.equal("0001_a.sql", rows[1].name)
    end))

    it("rejects transaction control before applying anything", with_database(function(db)
      local dir = temp_dir({
        ["0001_a.sql"] = "CREATE TABLE a (x int);",
        ["0002_b.sql"] = "CREATE TABLE b (x int);\n-- note\ncommit;\n",
      })
      local ok, err, code = migrate.run({ conninfo = conninfo(db), dir = dir })
      assert.is_nil(ok)
      assert.equal("invalid_migrations", code)
      assert.matches("0002_b.sql:3: transaction control (COMMIT) is not allowed", err, 1, true)
      assert.is_false(table_exists(db, "a"))
      assert.is_false(table_exists(db, "b"))
      assert.equal(0, #applied_rows(db))
    end))

    it("rejects a renamed applied file", with_database(function(db)
      local dir = temp_dir({ ["0001_a.sql"] = "CREATE TABLE a (x int)" })
      assert(migrate.run({ conninfo = conninfo(db), dir = dir }))
      assert(os.rename(dir .. "/0001_a.sql", dir .. "/0001_renamed.sql"))
      local ok, err, code = migrate.run({ conninfo = conninfo(db), dir = dir })
      assert.is_nil(ok)
      assert.equal("invalid_migrations", code)
      assert.matches("0001_renamed.sql: migration 1 was applied as 0001_a.sql", err, 1, true)
    end))

    it("returns database_unavailable without a server", function()
      helpers.run(function()
        local ok, _, code = migrate.run({ conninfo = { host = "/nonexistent-pg-spec" },
          dir = SQL_DIR })
        assert.is_nil(ok)
        assert.equal("database_unavailable", code)
      end)
    end)
  end)

  describe("justavps migrate", function()
    it("applies and reports with --status", with_database(function(db)
      local dir = copy_of_sql_dir()
      local names = sql_files()

      local status, out = run_migrate(db, { "migrate", "--dir", dir, "--status" })
      assert.equal(0, status)
      assert.matches("1%s+pending%s+%-%s+" .. names[1]:gsub("%p", "%%%0"), out)

      local _, err
      status, _, err = run_migrate(db, { "migrate", "--dir", dir })
      assert.equal(0, status, err)
      assert.matches('msg="migrations up to date" applied=' .. #names, err, 1, true)

      status, out = run_migrate(db, { "migrate", "--dir", dir, "--status" })
      assert.equal(0, status)
      assert.not_matches("pending", out)
      assert.matches(#names .. "%s+applied%s+%d%d%d%d%-", out)
    end))

    it("takes the database from --dsn", with_database(function(db)
      local dsn = string.format("host='%s' port=%s user=%s dbname=%s", settings.PGHOST,
        settings.PGPORT, settings.PGUSER, db)
      local status, _, err = run_migrate("no_such_database_for_spec",
        { "migrate", "--dsn", dsn, "--dir", SQL_DIR })
      assert.equal(0, status, err)
      assert.equal(#sql_files(), #applied_rows(db))
    end))

    it("applies each migration once from two processes", with_database(function(db)
      -- The spec holds the runner's lock until both processes wait for it,
      -- so the two runs really overlap.
      local holder = connect(db)
      assert(holder:query("SELECT pg_advisory_lock($1::bigint)", { migrate.LOCK_KEY }))
      local a = start_migrate(db, { "migrate", "--dir", SQL_DIR })
      local b = start_migrate(db, { "migrate", "--dir", SQL_DIR })

      local waiting = 0
      local deadline = core.now() + 20
      while waiting < 2 and core.now() < deadline do
        core.sleep(0.05)
        waiting = assert(holder:query("SELECT count(*)::int AS n FROM pg_locks l "
          .. "JOIN pg_database d ON d.oid = l.database "
          .. "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = $1",
          { db }))[1].n
      end
      assert.equal(2, waiting)
      assert(holder:query("SELECT pg_advisory_unlock($1::bigint)", { migrate.LOCK_KEY }))
      holder:close()

      local status_a, _, err_a = a.collect()
      local status_b, _, err_b = b.collect()
      assert.equal(0, status_a, err_a)
      assert.equal(0, status_b, err_b)

      local applied = 0
      for _, err in ipairs({ err_a, err_b }) do
        applied = applied + select(2, err:gsub('msg="migration applied"', ""))
      end
      local names = sql_files()
      assert.equal(#names, applied)
      assert.equal(#names, #applied_rows(db))
    end))

    it("rejects a changed applied file", with_database(function(db)
      local dir = copy_of_sql_dir()
      local status = run_migrate(db, { "migrate", "--dir", dir })
      assert.equal(0, status)

      local first = sql_files()[1]
      write_file(dir .. "/" .. first, read_file(dir .. "/" .. first) .. "\n-- edited\n")
      local _, err
      status, _, err = run_migrate(db, { "migrate", "--dir", dir })
      assert.equal(1, status)
      assert.matches(first .. ": file changed after it was applied", err, 1, true)

      status, _, err = run_migrate(db, { "migrate", "--dir", dir, "--status" })
      assert.equal(1, status)
      assert.matches(first .. ": file changed after it was applied", err, 1, true)
    end))

    it("rejects a missing applied file", with_database(function(db)
      local dir = copy_of_sql_dir()
      assert.equal(0, (run_migrate(db, { "migrate", "--dir", dir })))

      local names = sql_files()
      local last = names[#names]
      assert(os.remove(dir .. "/" .. last))
      local status, _, err = run_migrate(db, { "migrate", "--dir", dir })
      assert.equal(1, status)
      assert.matches(last .. ": applied migration " .. #names .. " is missing", err, 1, true)
    end))

    it("exits 1 on a failing migration", with_database(function(db)
      local dir = temp_dir({
        ["0001_a.sql"] = "CREATE TABLE a (x int);",
        ["0002_b.sql"] = "CREATE TABLE b (x int);\nSELECT * FROM no_such_table;",
      })
      local status, _, err = run_migrate(db, { "migrate", "--dir", dir })
      assert.equal(1, status)
      assert.matches("0002_b.sql:2:", err, 1, true)
      assert.matches("code=42P01", err, 1, true)
      assert.is_false(table_exists(db, "b"))
      assert.equal(1, #applied_rows(db))
    end))

    it("exits 1 on duplicate versions", with_database(function(db)
      local dir = temp_dir({ ["0001_a.sql"] = "SELECT 1", ["0001_b.sql"] = "SELECT 1" })
      local status, _, err = run_migrate(db, { "migrate", "--dir", dir })
      assert.equal(1, status)
      assert.matches("duplicate version 1", err, 1, true)
      assert.is_false(table_exists(db, "schema_migrations"))
    end))

    it("exits 2 on an unknown option", function()
      helpers.run(function()
        local status, _, err = run_migrate(settings.PGDATABASE, { "migrate", "--bogus" })
        assert.equal(2, status)
        assert.matches("unknown option %-%-bogus", err)
      end)
    end)
  end)
end)
