-- Spec support for the edge: a fresh platform database with its
-- migrations, and real `justavps daemon` and `justavps edge` processes on
-- loopback. Brokers come from the broker specs' support module.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")

local _M = {}

_M.BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")


local function shell(command)
  local f = assert(io.popen(command .. " 2>&1"))
  local out = f:read("*a")
  local ok = f:close()
  assert(ok, "command failed: " .. command .. "\n" .. out)
  return out
end


-- Returns the PG* settings of the test server, starting it when the
-- environment names none.
function _M.pg_settings()
  local env = {
    PGHOST = os.getenv("PGHOST"), PGPORT = os.getenv("PGPORT"),
    PGUSER = os.getenv("PGUSER"), PGDATABASE = os.getenv("PGDATABASE"),
  }
  if not env.PGHOST then
    shell("tools/pg.sh start")
    for name, value in shell("tools/pg.sh env"):gmatch("export (PG%u+)=(%S+)") do
      env[name] = value
    end
  end
  return env
end


function _M.connect(settings, dbname)
  return assert(core.pg.connect({ host = settings.PGHOST,
    port = settings.PGPORT, user = settings.PGUSER,
    dbname = dbname or settings.PGDATABASE }, { timeout = 30 }))
end


-- Creates a database with a random name and runs `justavps migrate` on
-- it. Returns its name and the child environment that points at it.
function _M.create_database(settings)
  local dbname = string.format("justavps_edge_%d_%06d", os.time(),
    math.random(0, 999999))
  local c = _M.connect(settings)
  assert(c:query('CREATE DATABASE "' .. dbname .. '"'))
  c:close()

  local env = helpers.child_env({ PGHOST = settings.PGHOST,
    PGPORT = settings.PGPORT, PGUSER = settings.PGUSER,
    PGDATABASE = dbname })
  local m = assert(core.proc.spawn{ file = _M.BIN, args = { "migrate" },
    env = env, stdout = "null", stderr = "null" })
  local status = m:wait(60)
  assert(status == 0, "justavps migrate exited with " .. tostring(status))
  return dbname, env
end


function _M.drop_database(settings, dbname)
  if not dbname then
    return
  end
  local c = _M.connect(settings)
  c:query('DROP DATABASE IF EXISTS "' .. dbname .. '" WITH (FORCE)')
  c:close()
end


function _M.temp_dir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir) == 0)
  return dir
end


-- Starts `justavps ROLE --config FILE` with conf written to FILE and
-- waits for its listeners. Returns a handle with ports (by listener
-- name), lines (stderr so far), process and dir.
function _M.start(role, conf, env, wanted)
  local dir = _M.temp_dir()
  local path = dir .. "/" .. role .. ".json"
  local f = assert(io.open(path, "w"))
  f:write(assert(json.encode(conf)))
  f:close()

  local p = assert(core.proc.spawn{
    file = _M.BIN,
    args = { role, "--config", path, "--access-log=false" },
    env = env or helpers.child_env(),
    stdin = "null", stdout = "null", stderr = "pipe",
  })

  local handle = { process = p, lines = {}, dir = dir, ports = {} }
  local ready = core.waiter()
  local ended = false
  local function complete()
    for _, name in ipairs(wanted) do
      if not handle.ports[name] then
        return false
      end
    end
    return true
  end
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      handle.lines[#handle.lines + 1] = line
      local name, port = line:match("msg=listening .*listener=(%w+) .*port=(%d+)")
      if name then
        handle.ports[name] = tonumber(port)
        if complete() then
          ready:wake()
        end
      end
    end
    ended = true
    ready:wake()
  end)

  if not complete() and not ended then
    ready:wait(20)
  end
  assert(complete(), role .. " did not start; log:\n"
    .. table.concat(handle.lines, "\n"))
  return handle
end


function _M.stop(handle)
  handle.process:kill("SIGTERM")
  local status = handle.process:wait(15)
  os.execute("rm -rf " .. handle.dir)
  return status
end


-- Returns a free loopback port that nothing listens on afterwards.
function _M.closed_port()
  local probe = assert(core.tcp.listen{ host = "127.0.0.1", port = 0,
    on_accept = function() end })
  local port = probe:port()
  probe:close()
  return port
end


return _M
