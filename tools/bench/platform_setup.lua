-- Prepares or removes the database of tools/bench/platform.sh.
--
--   luajit tools/bench/platform_setup.lua create build-dir machines-file
--   luajit tools/bench/platform_setup.lua drop build-dir dbname
--
-- create makes a database with a random name and runs `justavps migrate`
-- on it. It inserts a "list" account with 50 machines and an API key with
-- the read scope, and a "fleet" account with 200 machines at stage
-- services_ready, each with its own random token. It writes one
-- "slug token" line per fleet machine to machines-file and prints
-- "dbname=NAME" and "key=KEY" on stdout. Both commands read the server
-- from PGHOST, PGPORT and PGUSER (eval "$(tools/pg.sh env)"). Run it from
-- the repository root.
local command, build_dir, name = arg[1], arg[2], arg[3]
if (command ~= "create" and command ~= "drop") or not build_dir
    or not name then
  io.stderr:write("usage: luajit tools/bench/platform_setup.lua ",
    "create|drop build-dir machines-file|dbname\n")
  os.exit(2)
end

package.cpath = build_dir .. "/lua/?.so;" .. package.cpath
package.path = "lua/?.lua;" .. package.path

local core = require("justavps.core")
local apikey = require("justavps.auth.apikey")

local LIST_MACHINES = 50
local FLEET_MACHINES = 200
local status = 1


local function connect(dbname)
  return assert(core.pg.connect({ host = os.getenv("PGHOST"),
    port = os.getenv("PGPORT"), user = os.getenv("PGUSER"),
    dbname = dbname or os.getenv("PGDATABASE") }, { timeout = 30 }))
end


local function insert_machine(db, account, slug, stage, token)
  assert(db:query("INSERT INTO machines (slug, account_id, name, provider, "
    .. "region, server_type, stage, ip, token) VALUES ($1, $2, $1, "
    .. "'local', 'local', 'local', $3, '127.0.0.1', $4)",
    { slug, account, stage, token }))
end


local function create(machines_file)
  local dbname = string.format("justavps_platform_bench_%d_%06d",
    os.time(), core.proc.getpid())
  local admin = connect()
  assert(admin:query('CREATE DATABASE "' .. dbname .. '"'))
  admin:close()
  -- Printed before the migration so that the caller can drop the
  -- database even when a later step fails.
  io.stdout:write("dbname=", dbname, "\n")
  io.stdout:flush()

  local migrate = assert(core.proc.spawn{ file = build_dir .. "/justavps",
    args = { "migrate" },
    env = { PATH = os.getenv("PATH"), PGHOST = os.getenv("PGHOST"),
      PGPORT = os.getenv("PGPORT"), PGUSER = os.getenv("PGUSER"),
      PGDATABASE = dbname, JUSTAVPS_ROOT = os.getenv("JUSTAVPS_ROOT") },
    stdout = "null", stderr = "null" })
  local code = migrate:wait(60)
  assert(code == 0, "justavps migrate exited with " .. tostring(code))

  local db = connect(dbname)
  local list_account = assert(db:query("INSERT INTO accounts (name) "
    .. "VALUES ($1) RETURNING id", { "list bench" }))[1].id
  for i = 1, LIST_MACHINES do
    insert_machine(db, list_account, string.format("list-%03d", i),
      "services_ready", core.crypto.random_token(36))
  end
  local k = assert(apikey.generate())
  -- The platform looks keys up by their first #KEY_PREFIX + 8 characters
  -- (auth_user.KEY_PREFIX_LENGTH), not by the display prefix.
  local lookup_prefix = k.key:sub(1, #apikey.KEY_PREFIX + 8)
  assert(db:query("INSERT INTO api_keys (account_id, name, prefix, hash, "
    .. "scopes) VALUES ($1, 'platform bench', $2, $3, '{read}'::text[])",
    { list_account, lookup_prefix, k.hash }))

  local fleet_account = assert(db:query("INSERT INTO accounts (name) "
    .. "VALUES ($1) RETURNING id", { "fleet bench" }))[1].id
  local out = assert(io.open(machines_file, "w"))
  for i = 1, FLEET_MACHINES do
    local slug = string.format("fleet-%03d", i)
    local token = core.crypto.random_token(36)
    insert_machine(db, fleet_account, slug, "services_ready", token)
    out:write(slug, " ", token, "\n")
  end
  out:close()
  db:close()
  io.stdout:write("key=", k.key, "\n")
end


local function drop(dbname)
  local admin = connect()
  assert(admin:query('DROP DATABASE IF EXISTS "' .. dbname
    .. '" WITH (FORCE)'))
  admin:close()
end


core.spawn(function()
  local ok, err = pcall(command == "create" and create or drop, name)
  if ok then
    status = 0
  else
    io.stderr:write("platform_setup: ", command, " failed: ",
      tostring(err), "\n")
  end
  core.stop()
end)
core.run()
os.exit(status)
