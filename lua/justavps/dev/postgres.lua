-- The private PostgreSQL cluster of `justavps dev`: created with initdb on
-- first use, started with pg_ctl, reused on the next start and stopped on
-- exit.
--
-- The server listens only on a Unix socket in the cluster directory
-- (listen_addresses is empty), and authentication is `trust`, so nothing
-- outside this host can reach it. initdb and postgres refuse to run as
-- root: as root the cluster belongs to the `postgres` system user that
-- Debian's postgresql package creates. When that user cannot reach the
-- directory (a checkout under /root, say), or the socket path would pass
-- Linux's 107-byte limit, the cluster lives under /tmp and DIR/pg is a
-- symlink to it.
local core = require("justavps.core")
local log = require("justavps.log")
local files = require("justavps.dev.files")

local format = string.format
local tostring = tostring

local _M = {}

_M.USER = "justavps"
_M.DATABASE = "justavps"
-- The port only names the socket file (.s.PGSQL.5432), because the server
-- opens no TCP listener.
_M.PORT = 5432

-- ".s.PGSQL.5432" adds 14 bytes to the directory, and sun_path has room
-- for 107.
local MAX_SOCKET_DIR = 90


-- Returns the newest server's bin directory under /usr/lib/postgresql, or
-- nil, message.
local function find_bindir()
  local res = files.run("/bin/sh", { "-c", "ls -d "
    .. "/usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1" })
  local initdb = res and res.stdout:match("^(%S+)/initdb")
  if not initdb then
    return nil, "initdb not found under /usr/lib/postgresql; install the "
      .. "postgresql package (tools/setup.sh does)"
  end
  return initdb
end


-- Runs file with args as the cluster's owner. Returns the run result (see
-- files.run) or nil, message.
function _M:as_owner(file, args, opts)
  if self.root_user then
    local full = { "-u", "postgres", "--", file }
    for i = 1, #args do
      full[#full + 1] = args[i]
    end
    return files.run("/usr/sbin/runuser", full, opts)
  end
  return files.run(file, args, opts)
end


-- Returns the directory the cluster lives in, creating it (or the /tmp
-- directory DIR/pg links to) on first use. Returns nil, message on failure.
function _M:cluster_dir()
  local link = self.dir .. "/pg"
  local target = files.readlink(link)
  if target then
    return target
  end
  if files.is_dir(link) then
    return link
  end

  local reachable = true
  if self.root_user then
    local res = files.run("/usr/sbin/runuser",
      { "-u", "postgres", "--", "test", "-x", self.dir })
    reachable = res ~= nil and res.status == 0
  end
  local dir = link
  if not reachable or #link > MAX_SOCKET_DIR then
    local res = files.run("mktemp", { "-d", "/tmp/justavps-dev-pg.XXXXXX" })
    if not res or res.status ~= 0 then
      return nil, "mktemp failed: " .. (res and res.stderr or "")
    end
    dir = res.stdout:match("^(%S+)")
    local ok, err = files.symlink(dir, link)
    if not ok then
      return nil, err
    end
    log.info("postgres cluster placed under /tmp", { dir = dir,
      reason = reachable and "socket path too long"
        or "the postgres user cannot reach " .. self.dir })
  else
    local ok, err = files.mkdir(dir)
    if not ok then
      return nil, err
    end
  end
  if self.root_user then
    local res = files.run("chown", { "postgres:", dir })
    if not res or res.status ~= 0 then
      return nil, "chown postgres " .. dir .. " failed: "
        .. (res and res.stderr or "")
    end
  end
  files.chmod(dir, "700")
  return dir
end


-- Creates the cluster when DIR/pg has none.
function _M:init()
  local data = self.cluster .. "/data"
  if files.exists(data .. "/PG_VERSION") then
    return true
  end
  log.info("creating the postgres cluster", { dir = data })
  files.run("rm", { "-rf", "--", data })
  local res = self:as_owner(self.bindir .. "/initdb", { "-D", data,
    "-U", _M.USER, "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
    "--no-instructions" }, { timeout = 120 })
  if not res or res.status ~= 0 then
    return nil, "initdb failed: " .. (res and (res.stdout .. res.stderr)
      or "cannot start it")
  end
  -- Durability is kept on (this is a developer's data); a socket-only
  -- listener keeps the trust authentication local.
  local conf = format("listen_addresses = ''\n"
    .. "unix_socket_directories = '%s'\n"
    .. "port = %d\n"
    .. "synchronous_commit = off\n", self.cluster, _M.PORT)
  local ok, err = self:as_owner("/bin/sh", { "-c",
    'cat >> "$0"', data .. "/postgresql.conf" }, { stdin = conf })
  if not ok or ok.status ~= 0 then
    return nil, "cannot write postgresql.conf: " .. tostring(err)
  end
  return true
end


function _M:running()
  local res = self:as_owner(self.bindir .. "/pg_ctl",
    { "-D", self.cluster .. "/data", "status" })
  return res ~= nil and res.status == 0
end


-- Returns true when the postmaster named by the cluster's pid file is a
-- live process. Cheap enough for a check every few seconds, unlike
-- pg_ctl status; the socket file alone outlives a killed server.
function _M:alive()
  local text = files.read(self.cluster .. "/data/postmaster.pid")
  local pid = text and tonumber(text:match("^%s*(%d+)"))
  return pid ~= nil and files.exists("/proc/" .. pid)
end


-- Starts the server unless it runs, then creates the database when it is
-- missing. Returns the libpq connection string, or nil, message.
function _M:start()
  if not self:running() then
    local res = self:as_owner(self.bindir .. "/pg_ctl",
      { "-D", self.cluster .. "/data", "-l", self.cluster .. "/postgres.log",
        "-w", "-t", "60", "start" }, { timeout = 90 })
    if not res or res.status ~= 0 then
      return nil, "pg_ctl start failed; see " .. self.cluster
        .. "/postgres.log: " .. (res and (res.stdout .. res.stderr) or "")
    end
    self.started = true
  else
    log.info("postgres already running", { dir = self.cluster })
  end

  local conn, err = core.pg.connect(self:conninfo("postgres"))
  if not conn then
    return nil, "cannot connect to postgres: " .. tostring(err)
  end
  local found, qerr = conn:query(
    "SELECT 1 FROM pg_database WHERE datname = $1", { _M.DATABASE })
  if found and #found == 0 then
    -- CREATE DATABASE takes no parameters; the name is a constant.
    found, qerr = conn:query("CREATE DATABASE " .. _M.DATABASE)
  end
  conn:close()
  if not found then
    return nil, "cannot create database " .. _M.DATABASE .. ": "
      .. tostring(qerr)
  end
  return self:conninfo(_M.DATABASE)
end


-- Quotes a libpq connection string value: inside single quotes, a
-- backslash and a quote are escaped with a backslash.
local function quote(value)
  return "'" .. value:gsub("[\\']", "\\%0") .. "'"
end


function _M:conninfo(database)
  return format("host=%s port=%d user=%s dbname=%s", quote(self.cluster),
    _M.PORT, _M.USER, database)
end


-- Stops the server with the fast mode: sessions are cut, data is kept.
function _M:stop()
  local res = self:as_owner(self.bindir .. "/pg_ctl",
    { "-D", self.cluster .. "/data", "-m", "fast", "-w", "-t", "60",
      "stop" }, { timeout = 90 })
  if not res or res.status ~= 0 then
    log.err("pg_ctl stop failed", { dir = self.cluster,
      output = res and (res.stdout .. res.stderr) })
    return false
  end
  log.info("postgres stopped", { dir = self.cluster })
  return true
end


-- Prepares the cluster under dir, running initdb on first use. Returns
-- the cluster object, which start() then starts, or nil, message.
function _M.new(dir)
  local bindir, err = find_bindir()
  if not bindir then
    return nil, err
  end
  local self = setmetatable({ dir = dir, bindir = bindir,
    root_user = files.getuid() == 0 }, { __index = _M })
  self.cluster, err = self:cluster_dir()
  if not self.cluster then
    return nil, err
  end
  local ok
  ok, err = self:init()
  if not ok then
    return nil, err
  end
  return self
end


return _M
