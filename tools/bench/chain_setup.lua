-- Prepares or removes the platform database of tools/bench/chain.sh.
--
--   luajit tools/bench/chain_setup.lua create build-dir slug
--   luajit tools/bench/chain_setup.lua drop build-dir dbname
--
-- create makes a database with a random name, runs `justavps migrate` on
-- it, and inserts one account, one machine (slug, stage services_ready,
-- address 127.0.0.1) and one API key with the proxy scope. It prints
-- "dbname=NAME" and "key=KEY" on stdout. Both commands read the server
-- from the libpq variables PGHOST, PGPORT and PGUSER (eval "$(tools/pg.sh
-- env)"). Run it from the repository root.
local command, build_dir, name = arg[1], arg[2], arg[3]
if (command ~= "create" and command ~= "drop") or not build_dir
    or not name then
  io.stderr:write("usage: luajit tools/bench/chain_setup.lua ",
    "create|drop build-dir slug|dbname\n")
  os.exit(2)
end

package.cpath = build_dir .. "/lua/?.so;" .. package.cpath
package.path = "lua/?.lua;" .. package.path

local core = require("justavps.core")
local apikey = require("justavps.auth.apikey")

local MACHINE_TOKEN = "chain-bench-machine-token-0123456789"
local status = 1


local function connect(dbname)
  return assert(core.pg.connect({ host = os.getenv("PGHOST"),
    port = os.getenv("PGPORT"), user = os.getenv("PGUSER"),
    dbname = dbname or os.getenv("PGDATABASE") }, { timeout = 30 }))
end


local function create(slug)
  local dbname = string.format("justavps_chain_%d_%06d", os.time(),
    core.proc.getpid())
  local admin = connect()
  assert(admin:query('CREATE DATABASE "' .. dbname .. '"'))
  admin:close()

  local migrate = assert(core.proc.spawn{ file = build_dir .. "/justavps",
    args = { "migrate" },
    env = { PATH = os.getenv("PATH"), PGHOST = os.getenv("PGHOST"),
      PGPORT = os.getenv("PGPORT"), PGUSER = os.getenv("PGUSER"),
      PGDATABASE = dbname, JUSTAVPS_ROOT = os.getenv("JUSTAVPS_ROOT") },
    stdout = "null", stderr = "null" })
  local code = migrate:wait(60)
  assert(code == 0, "justavps migrate exited with " .. tostring(code))

  local db = connect(dbname)
  local account = assert(db:query("INSERT INTO accounts (name) VALUES ($1) "
    .. "RETURNING id", { "chain bench" }))[1].id
  assert(db:query("INSERT INTO machines (slug, account_id, name, provider, "
    .. "region, server_type, stage, ip, token) VALUES ($1, $2, $1, 'local', "
    .. "'local', 'local', 'services_ready', '127.0.0.1', $3)",
    { slug, account, MACHINE_TOKEN }))
  local k = assert(apikey.generate())
  assert(db:query("INSERT INTO api_keys (account_id, name, prefix, hash, "
    .. "scopes) VALUES ($1, 'chain bench', $2, $3, '{proxy}'::text[])",
    { account, k.prefix, k.hash }))
  db:close()
  io.stdout:write("dbname=", dbname, "\nkey=", k.key, "\n")
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
    io.stderr:write("chain_setup: ", command, " failed: ", tostring(err),
      "\n")
  end
  core.stop()
end)
core.run()
os.exit(status)
