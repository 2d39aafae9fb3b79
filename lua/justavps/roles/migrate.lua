-- justavps migrate: applies the pending SQL migrations, or lists them with
-- --status. The database comes from --dsn, else from libpq's PGHOST,
-- PGPORT, PGUSER, PGDATABASE, PGPASSWORD ... environment variables.
local core = require("justavps.core")
local log = require("justavps.log")
local migrate = require("justavps.db.migrate")

local format = string.format
local rawget = rawget
local ipairs = ipairs
local stdout = io.stdout

local _M = {}

_M.summary = "applies the SQL migrations in sql/"

_M.options = {
  { dsn = { type = "string", len_min = 1,
    description = "libpq connection string or postgresql:// URI; "
      .. "default: the PG* environment variables" } },
  { dir = { type = "string", len_min = 1,
    description = "directory of NNNN_name.sql files; default: sql/ in the "
      .. "JustAVPS tree" } },
  { status = { type = "boolean", default = false,
    description = "list applied and pending migrations, change nothing" } },
  { lock_timeout = { type = "duration",
    default = migrate.DEFAULT_LOCK_TIMEOUT, between = { 1, 86400 },
    description = "how long to wait for another migration run to finish" } },
}


local function default_dir()
  return (rawget(_G, "JUSTAVPS_ROOT") or ".") .. "/sql"
end


-- Prints one line per migration and returns the exit status: 1 when an
-- applied file changed or is missing, else 0 (pending ones are no error).
local function print_status(opts)
  local report, err, code = migrate.status(opts)
  if not report then
    log.err("migration status failed", { error = err, code = code })
    return 1
  end

  stdout:write(format("%-8s %-8s %-20s %s\n", "version", "state",
    "applied_at", "file"))
  for _, m in ipairs(report.migrations) do
    stdout:write(format("%-8d %-8s %-20s %s\n", m.version, m.state,
      m.applied_at or "-", m.name))
  end
  stdout:flush()

  for _, problem in ipairs(report.problems) do
    log.err("migration problem", { error = problem })
  end
  return #report.problems == 0 and 0 or 1
end


local function apply(opts)
  local result, err, code, applied = migrate.run(opts)
  if not result then
    log.err("migration failed", { error = err, code = code,
      applied = applied })
    return 1
  end
  log.info("migrations up to date", { applied = result.applied,
    total = result.total })
  return 0
end


function _M.run(opts)
  local settings = {
    conninfo = opts.dsn,
    dir = opts.dir or default_dir(),
    lock_timeout = opts.lock_timeout,
  }
  local status = 1

  core.spawn(function()
    if opts.status then
      status = print_status(settings)
    else
      status = apply(settings)
    end
  end)

  core.run()
  return status
end


return _M
