-- Keeps the parts of a running `justavps dev` stack that the supervisor
-- does not own alive: the PostgreSQL server and the daemons of local
-- machines. A check every few seconds logs what it finds stopped and
-- starts it again.
local core = require("justavps.core")
local log = require("justavps.log")
local files = require("justavps.dev.files")

local ipairs = ipairs
local pairs = pairs

local _M = {}

-- Seconds between checks.
_M.INTERVAL = 2
-- Checks in a row that must find a daemon stopped before it is started
-- again. Deleting a machine stops its daemon and then removes its
-- directory within a second, so a daemon is never restarted in the
-- middle of a delete.
_M.MISSES = 2


local function check_postgres(pg)
  if pg:alive() then
    return
  end
  log.err("postgres is not running; starting it again",
    { dir = pg.cluster })
  local conninfo, err = pg:start()
  if not conninfo then
    log.err("postgres did not start", { dir = pg.cluster, error = err })
  end
end


local function check_machines(driver, misses)
  local seen = {}
  for _, slug in ipairs(driver:list_machines()) do
    seen[slug] = true
    local _, alive = driver:daemon_pid(slug)
    if alive then
      misses[slug] = nil
    else
      misses[slug] = (misses[slug] or 0) + 1
      if misses[slug] >= _M.MISSES and files.exists(driver:dir(slug)
          .. "/config.json") then
        misses[slug] = nil
        log.err("machine daemon is not running; starting it again",
          { slug = slug })
        local pid, err = driver:start_daemon(slug)
        if pid then
          log.info("machine daemon started again", { slug = slug,
            pid = pid })
        else
          log.err("cannot start a machine daemon", { slug = slug,
            error = err })
        end
      end
    end
  end
  for slug in pairs(misses) do
    if not seen[slug] then
      misses[slug] = nil
    end
  end
end


-- Starts the checks of pg (a dev.postgres cluster) and driver (the local
-- provider driver of the stack). Returns a handle with stop().
function _M.start(pg, driver)
  local misses = {}
  local busy = false
  local timer = core.timer(_M.INTERVAL, function()
    -- A slow check may still run when the timer fires again.
    if busy then
      return
    end
    busy = true
    local ok, err = pcall(function()
      check_postgres(pg)
      check_machines(driver, misses)
    end)
    busy = false
    if not ok then
      log.err("stack check failed", { error = err })
    end
  end, _M.INTERVAL)
  return {
    stop = function()
      timer:stop()
    end,
  }
end


return _M
