-- The private PostgreSQL that specs run against: the libpq settings from
-- the environment (tools/test.sh exports them), or a cluster started with
-- tools/pg.sh when a spec runs on its own.
local _M = {}

local cached


-- Runs a shell command and returns its output (stdout and stderr),
-- raising with the output when it fails.
function _M.shell(command)
  local f = assert(io.popen(command .. " 2>&1"))
  local out = f:read("*a")
  local ok = f:close()
  assert(ok, "command failed: " .. command .. "\n" .. out)
  return out
end


-- Returns { PGHOST, PGPORT, PGUSER, PGDATABASE }, starting the cluster
-- first when PGHOST is unset.
function _M.settings()
  if cached then
    return cached
  end
  local env = {
    PGHOST = os.getenv("PGHOST"), PGPORT = os.getenv("PGPORT"),
    PGUSER = os.getenv("PGUSER"), PGDATABASE = os.getenv("PGDATABASE"),
  }
  if not env.PGHOST then
    _M.shell("tools/pg.sh start")
    for name, value in _M.shell("tools/pg.sh env"):gmatch(
        "export (PG%u+)=(%S+)") do
      env[name] = value
    end
  end
  cached = env
  return env
end


return _M
