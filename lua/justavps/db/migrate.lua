-- The migration runner behind `justavps migrate`.
--
-- Migrations are the files NNNN_name.sql in one directory, numbered from 1
-- without gaps. Each pending file runs in a transaction of its own,
-- together with the insert of its row in schema_migrations (version, name,
-- sha256 of the file, applied_at), so a migration is either applied and
-- recorded or left no trace. The whole run holds a PostgreSQL advisory
-- lock on one connection, so two runners on one database take turns and
-- the second finds nothing left to do.
--
-- Before it changes anything, the runner rejects these problems: a file
-- that is not NNNN_name.sql, two files with one version, a gap in the
-- numbers, an applied migration whose file is missing, renamed or changed.
-- It also rejects a pending file with an unclosed quote or comment, or
-- with transaction control.
--
-- NOTE: directories are read with LuaFileSystem (Debian lua-filesystem),
-- which tools/setup.sh gets only as a dependency of busted.
local core = require("justavps.core")
local log = require("justavps.log")
local lfs = require("lfs")

local pg = core.pg
local crypto = core.crypto

local type = type
local error = error
local ipairs = ipairs
local pairs = pairs
local floor = math.floor
local tonumber = tonumber
local tostring = tostring
local format = string.format
local sfind = string.find
local ssub = string.sub
local smatch = string.match
local sbyte = string.byte
local slower = string.lower
local concat = table.concat
local sort = table.sort
local io_open = io.open

local _M = {}

-- Key of the advisory lock held during a run. Any fixed bigint works. This
-- one is the first 8 bytes of SHA-256("justavps.migrate") read as a signed
-- big-endian integer, so it is unlikely to collide with another
-- application's key.
_M.LOCK_KEY = "-8678208551614558999"

-- Seconds to wait for the advisory lock before giving up.
_M.DEFAULT_LOCK_TIMEOUT = 300

local FILE_PATTERN = "^(%d+)_([%w_%-]+)%.sql$"

local CREATE_TABLE = [[
CREATE TABLE IF NOT EXISTS schema_migrations (
  version integer PRIMARY KEY,
  name text NOT NULL,
  sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
  applied_at timestamptz NOT NULL DEFAULT now()
)]]


-- Statement splitting ------------------------------------------------------

-- core.pg sends every query with the extended protocol, which takes one
-- statement at a time, so a migration file is cut into statements here.


local function is_identifier_byte(b)
  return b ~= nil and (b == 95 or b == 36 -- _ $
    or (b >= 48 and b <= 57) or (b >= 65 and b <= 90)
    or (b >= 97 and b <= 122) or b >= 128)
end


local function count_lines(sql, from, to)
  local n = 0
  local i = sfind(sql, "\n", from, true)
  while i and i < to do
    n = n + 1
    i = sfind(sql, "\n", i + 1, true)
  end
  return n
end


-- Returns the position just after the quoted text that starts at i (the
-- opening quote q), or nil when it is not closed. A doubled quote inside
-- is part of the text; with backslashes true (an E'' string) so is a
-- backslash followed by any byte.
local function skip_quoted(sql, i, q, backslashes)
  local j = i + 1
  local len = #sql
  while j <= len do
    local c = ssub(sql, j, j)
    if backslashes and c == "\\" then
      j = j + 2
    elseif c == q then
      if ssub(sql, j + 1, j + 1) == q then
        j = j + 2
      else
        return j + 1
      end
    else
      j = j + 1
    end
  end
  return nil
end


-- Returns the position after the /* */ comment at i; comments nest as in
-- PostgreSQL. nil when it is not closed.
local function skip_block_comment(sql, i)
  local depth = 0
  local j = i
  local len = #sql
  while j <= len do
    local two = ssub(sql, j, j + 1)
    if two == "/*" then
      depth = depth + 1
      j = j + 2
    elseif two == "*/" then
      depth = depth - 1
      j = j + 2
      if depth == 0 then
        return j
      end
    else
      j = j + 1
    end
  end
  return nil
end


-- Splits sql into statements at the semicolons outside quotes, comments
-- and dollar-quoted bodies. Returns an array of { sql = text, line = N },
-- where line is the line the statement starts on. Statements that are
-- empty or only comments are dropped. Returns nil, message when a quote,
-- dollar quote or comment is not closed.
-- NOTE: the splitter also cuts at the semicolons inside a SQL-standard
-- function body (BEGIN ATOMIC ... END), so write such bodies in $$ quotes.
function _M.split(sql)
  if type(sql) ~= "string" then
    error("migrate.split: sql must be a string", 2)
  end

  local statements = {}
  local len = #sql
  local has_code = false
  local code_start
  local i = 1

  local function finish(stop)
    if has_code then
      statements[#statements + 1] = {
        sql = ssub(sql, code_start, stop),
        line = 1 + count_lines(sql, 1, code_start),
      }
    end
    has_code = false
    code_start = nil
  end

  local function mark(pos)
    if not has_code then
      has_code = true
      code_start = pos
    end
  end

  while i <= len do
    local c = ssub(sql, i, i)
    local two = ssub(sql, i, i + 1)

    if two == "--" then
      local nl = sfind(sql, "\n", i, true)
      i = nl and nl + 1 or len + 1
    elseif two == "/*" then
      local after = skip_block_comment(sql, i)
      if not after then
        return nil, format("line %d: unterminated /* comment",
          1 + count_lines(sql, 1, i))
      end
      i = after
    elseif c == "'" or c == '"' then
      mark(i)
      local prev = sbyte(sql, i - 1)
      local escaped = c == "'" and (prev == 69 or prev == 101) -- E or e
        and not is_identifier_byte(sbyte(sql, i - 2))
      local after = skip_quoted(sql, i, c, escaped)
      if not after then
        return nil, format("line %d: unterminated %s quote",
          1 + count_lines(sql, 1, i), c == "'" and "'" or '"')
      end
      i = after
    elseif c == "$" and not is_identifier_byte(sbyte(sql, i - 1)) then
      mark(i)
      local tag = smatch(sql, "^%$[A-Za-z_\128-\255][%w_\128-\255]*%$", i)
        or (ssub(sql, i, i + 1) == "$$" and "$$")
      if tag then
        local close = sfind(sql, tag, i + #tag, true)
        if not close then
          return nil, format("line %d: unterminated dollar quote %s",
            1 + count_lines(sql, 1, i), tag)
        end
        i = close + #tag
      else
        i = i + 1 -- a parameter such as $1
      end
    elseif c == ";" then
      finish(i - 1)
      i = i + 1
    elseif sfind(c, "^%s") then
      i = i + 1
    else
      mark(i)
      i = i + 1
    end
  end

  finish(len)
  return statements
end


-- Statements that would end or nest the transaction the runner wraps
-- around each file, so a half-applied file could stay behind.
local TRANSACTION_WORDS = {
  begin = true, start = true, commit = true, ["end"] = true,
  rollback = true, abort = true,
}


local function first_word(statement)
  local sql = statement.sql
  local i = 1
  -- Skip leading comments that split kept inside the statement.
  while true do
    local s = smatch(sql, "^%s*()", i)
    if ssub(sql, s, s + 1) == "--" then
      i = (sfind(sql, "\n", s, true) or #sql) + 1
    elseif ssub(sql, s, s + 1) == "/*" then
      i = skip_block_comment(sql, s) or #sql + 1
    else
      return slower(smatch(sql, "^[%a_]*", s))
    end
  end
end


-- Migration files ------------------------------------------------------------


local function read_file(path)
  local f, err = io_open(path, "rb")
  if not f then
    return nil, err
  end
  local data = f:read("*a")
  f:close()
  if not data then
    return nil, "read failed: " .. path
  end
  return data
end


-- Reads the migrations in dir. Returns an array sorted by version of
-- { version, name, path, sql, sha256 } where name is the file name; or
-- nil, message, "invalid_migrations" listing every problem found.
function _M.scan(dir)
  if type(dir) ~= "string" then
    error("migrate.scan: dir must be a string", 2)
  end

  local attr = lfs.attributes(dir)
  if not attr or attr.mode ~= "directory" then
    return nil, format("migrations directory %s not found", dir),
      "invalid_migrations"
  end

  local problems = {}
  local by_version = {}
  local list = {}

  for entry in lfs.dir(dir) do
    if ssub(entry, -4) == ".sql" then
      local digits = smatch(entry, FILE_PATTERN)
      if not digits then
        problems[#problems + 1] = format("%s: invalid file name, expected "
          .. "NNNN_name.sql with letters, digits, _ or - in the name", entry)
      else
        local version = tonumber(digits)
        local other = by_version[version]
        if other then
          problems[#problems + 1] = format("%s and %s: duplicate version %d",
            other.name < entry and other.name or entry,
            other.name < entry and entry or other.name, version)
        else
          local m = { version = version, name = entry,
            path = dir .. "/" .. entry }
          by_version[version] = m
          list[#list + 1] = m
        end
      end
    end
  end

  sort(list, function(a, b) return a.version < b.version end)

  for i, m in ipairs(list) do
    if m.version ~= i then
      problems[#problems + 1] = format("%s: version %d follows %s, "
        .. "expected version %d (versions start at 1 and have no gaps)",
        m.name, m.version, i > 1 and list[i - 1].name or "nothing", i)
      break
    end
  end

  for _, m in ipairs(list) do
    local data, err = read_file(m.path)
    if not data then
      problems[#problems + 1] = format("%s: %s", m.name, tostring(err))
    else
      m.sql = data
      m.sha256 = crypto.hex_encode(crypto.sha256(data))
    end
  end

  if #problems > 0 then
    sort(problems)
    return nil, "invalid migrations in " .. dir .. ": "
      .. concat(problems, "; "), "invalid_migrations"
  end
  return list
end


-- Database side --------------------------------------------------------------


-- Returns the applied migrations as a map version -> row, or nil, message,
-- code. A database without schema_migrations has none applied.
local function read_applied(conn)
  local res, err, code = conn:query(
    "SELECT to_regclass('schema_migrations') IS NOT NULL AS present")
  if not res then
    return nil, err, code
  end
  local applied = {}
  if not res[1].present then
    return applied
  end

  res, err, code = conn:query("SELECT version, name, sha256, "
    .. "to_char(applied_at AT TIME ZONE 'UTC', "
    .. "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS applied_at "
    .. "FROM schema_migrations ORDER BY version")
  if not res then
    return nil, err, code
  end
  for _, row in ipairs(res) do
    applied[row.version] = row
  end
  return applied
end


-- Compares the applied rows with the files. Returns an array of problem
-- texts, each naming the file, and the pending migrations in order.
local function compare(migrations, applied)
  local problems = {}
  local pending = {}
  local by_version = {}

  for _, m in ipairs(migrations) do
    by_version[m.version] = m
    local row = applied[m.version]
    if not row then
      pending[#pending + 1] = m
    elseif row.name ~= m.name then
      problems[#problems + 1] = format("%s: migration %d was applied as %s; "
        .. "restore the original file name", m.name, m.version, row.name)
    elseif row.sha256 ~= m.sha256 then
      problems[#problems + 1] = format("%s: file changed after it was "
        .. "applied (sha256 %s, applied %s); restore it and put the change "
        .. "in a new migration", m.name, m.sha256, row.sha256)
    end
  end

  local missing = {}
  for version, row in pairs(applied) do
    if not by_version[version] then
      missing[#missing + 1] = row
    end
  end
  sort(missing, function(a, b) return a.version < b.version end)
  for _, row in ipairs(missing) do
    problems[#problems + 1] = format("%s: applied migration %d is missing "
      .. "from the migrations directory", row.name, row.version)
  end

  if #pending > 0 and #problems == 0 then
    -- A pending migration numbered below an applied one would run out of
    -- order. Contiguous numbering and the missing check make this rare,
    -- but a database migrated from another branch can get here.
    for version in pairs(applied) do
      if version > pending[1].version then
        problems[#problems + 1] = format("%s: pending, but migration %d "
          .. "after it is already applied", pending[1].name, version)
        break
      end
    end
  end

  return problems, pending
end


-- Splits m.sql into m.statements. Returns true, or nil and a problem text
-- naming the file and line.
local function prepare(m)
  local statements, err = _M.split(m.sql)
  if not statements then
    return nil, m.name .. ": " .. err
  end
  for _, s in ipairs(statements) do
    local word = first_word(s)
    if TRANSACTION_WORDS[word] then
      return nil, format("%s:%d: transaction control (%s) is not allowed; "
        .. "the runner wraps each file in a transaction", m.name, s.line,
        word:upper())
    end
  end
  m.statements = statements
  return true
end


-- Runs one prepared migration and records it, in one transaction.
local function apply(conn, m)
  return conn:transaction(function(c)
    for _, s in ipairs(m.statements) do
      local res, qerr, code = c:query(s.sql, nil, { timeout = 0 })
      if not res then
        return nil, format("%s:%d: %s", m.name, s.line, qerr),
          code or "migration_failed"
      end
    end
    local res, qerr, code = c:query("INSERT INTO schema_migrations "
      .. "(version, name, sha256) VALUES ($1, $2, $3)",
      { m.version, m.name, m.sha256 })
    if not res then
      return nil, m.name .. ": recording failed: " .. qerr, code
    end
    return true
  end)
end


local function connect(conninfo)
  local conn, err, code = pg.connect(conninfo, { timeout = 30 })
  if not conn then
    return nil, "cannot connect to PostgreSQL: " .. tostring(err), code
  end
  return conn
end


-- Returns the status of every migration: { migrations = { { version,
-- name, state = "applied"|"pending", applied_at } ... }, problems =
-- { text ... } }; or nil, message, code. Takes no lock and changes nothing.
-- opts: conninfo (nil for the PG* environment variables), dir.
function _M.status(opts)
  local migrations, err, code = _M.scan(opts.dir)
  if not migrations then
    return nil, err, code
  end
  local conn
  conn, err, code = connect(opts.conninfo)
  if not conn then
    return nil, err, code
  end

  local applied
  applied, err, code = read_applied(conn)
  conn:close()
  if not applied then
    return nil, err, code
  end

  local problems = compare(migrations, applied)
  local out = {}
  for _, m in ipairs(migrations) do
    local row = applied[m.version]
    out[#out + 1] = {
      version = m.version,
      name = m.name,
      state = row and "applied" or "pending",
      applied_at = row and row.applied_at or nil,
    }
  end
  local on_disk = {}
  for _, m in ipairs(migrations) do
    on_disk[m.version] = true
  end
  for version, row in pairs(applied) do
    if not on_disk[version] then
      out[#out + 1] = { version = version, name = row.name,
        state = "missing", applied_at = row.applied_at }
    end
  end
  sort(out, function(a, b) return a.version < b.version end)
  return { migrations = out, problems = problems }
end


local function run_locked(conn, migrations)
  local res, err, code = conn:query(CREATE_TABLE)
  if not res then
    return nil, "cannot create schema_migrations: " .. err, code
  end

  local applied
  applied, err, code = read_applied(conn)
  if not applied then
    return nil, err, code
  end

  local problems, pending = compare(migrations, applied)
  for _, m in ipairs(pending) do
    local ok, problem = prepare(m)
    if not ok then
      problems[#problems + 1] = problem
    end
  end
  if #problems > 0 then
    return nil, "migrations rejected, nothing applied: "
      .. concat(problems, "; "), "invalid_migrations"
  end

  local count = 0
  for _, m in ipairs(pending) do
    local started = core.now()
    local ok
    ok, err, code = apply(conn, m)
    if not ok then
      return nil, err, code, count
    end
    count = count + 1
    log.info("migration applied", { version = m.version, file = m.name,
      ms = floor((core.now() - started) * 1000 + 0.5) })
  end
  return count
end


-- Applies the pending migrations. opts: conninfo (a libpq string, URI or
-- keyword table; nil for the PG* environment variables), dir,
-- lock_timeout (seconds, default DEFAULT_LOCK_TIMEOUT). Returns
-- { applied = N, total = M }; or nil, message, code, applied_count.
-- Codes: invalid_migrations, lock_timeout, an SQLSTATE of the statement
-- that failed, database_unavailable.
function _M.run(opts)
  if type(opts) ~= "table" or type(opts.dir) ~= "string" then
    error("migrate.run: opts.dir must be a string", 2)
  end

  local migrations, err, code = _M.scan(opts.dir)
  if not migrations then
    return nil, err, code
  end

  local conn
  conn, err, code = connect(opts.conninfo)
  if not conn then
    return nil, err, code
  end

  local lock_timeout = opts.lock_timeout or _M.DEFAULT_LOCK_TIMEOUT
  local res
  res, err, code = conn:query("SELECT pg_advisory_lock($1::bigint)",
    { _M.LOCK_KEY }, { timeout = lock_timeout })
  if not res then
    conn:close()
    if code == "timeout" then
      return nil, format("another migration run held the lock for more "
        .. "than %g s", lock_timeout), "lock_timeout"
    end
    return nil, "cannot take the migration lock: " .. tostring(err), code
  end

  local count, applied_before_failure
  count, err, code, applied_before_failure = run_locked(conn, migrations)

  -- Closing the session releases the advisory lock as well; the explicit
  -- unlock is for a connection that stays in a pool.
  conn:query("SELECT pg_advisory_unlock($1::bigint)", { _M.LOCK_KEY })
  conn:close()

  if not count then
    return nil, err, code, applied_before_failure or 0
  end
  return { applied = count, total = #migrations }
end


return _M
