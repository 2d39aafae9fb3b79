-- The daemon's background work: the port watcher and the heartbeat loop,
-- plus the update probation check, and the process-wide nonce cache of the
-- internal API.
--
-- Loading this module marks it and the modules that hold long-lived state
-- (the watcher, the heartbeat loop, the updater) as stable, so a reload of
-- the app keeps one watcher, one loop and one nonce cache.
local core = require("justavps.core")
local log = require("justavps.log")
local reload = require("justavps.reload")
local machine_sig = require("justavps.machine_sig")

local assert = assert
local pairs = pairs
local ipairs = ipairs
local pcall = pcall

reload.configure({ stable = {
  "justavps.machine_sig",
  "justavps.daemon.background",
  "justavps.daemon.heartbeat",
  "justavps.daemon.metrics",
  "justavps.daemon.ports",
  "justavps.daemon.updater",
} })

local heartbeat = require("justavps.daemon.heartbeat")
local ports = require("justavps.daemon.ports")
local updater = require("justavps.daemon.updater")

local _M = {}

local nonce_cache = nil
local started = false


-- Returns the nonce cache that the internal API verifies calls against,
-- created on first use.
function _M.nonce_cache()
  if not nonce_cache then
    nonce_cache = assert(core.nonce.new({ ttl = machine_sig.NONCE_TTL }))
  end
  return nonce_cache
end


-- Starts the background work for the daemon config conf. opts:
-- internal_port (the bound internal port, needed when conf.internal.port
-- is 0), ports_interval (seconds, default 2), heartbeat (options of
-- heartbeat.start), update (options of updater.apply and
-- updater.check_probation). Runs updater.check_probation first. Returns
-- nothing. Must run in a core coroutine.
function _M.start(conf, opts)
  opts = opts or {}
  if started then
    _M.stop()
  end
  started = true

  local update = {}
  for k, v in pairs(opts.update or {}) do
    update[k] = v
  end
  update.state_dir = update.state_dir or conf.state_dir
  update.internal_port = update.internal_port or opts.internal_port

  local ok, err = pcall(updater.check_probation, conf, update)
  if not ok then
    log.err("update probation check failed", { error = err })
  end

  ports.start({
    interval = opts.ports_interval,
    on_change = function(added, removed)
      for _, e in ipairs(added) do
        log.info("port opened", { port = e.port, address = e.address,
          pid = e.pid, process = e.process })
      end
      for _, e in ipairs(removed) do
        log.info("port closed", { port = e.port, address = e.address })
      end
    end,
  })

  local hb = {}
  for k, v in pairs(opts.heartbeat or {}) do
    hb[k] = v
  end
  hb.update = update
  if conf.platform_url == "" then
    -- A daemon started by hand would otherwise report to whatever
    -- listens on a guessed address.
    log.warn("heartbeats are off because platform_url is empty")
  else
    heartbeat.start(conf, hb)
  end
  log.info("background work started", { platform_url = conf.platform_url,
    heartbeat_interval = conf.heartbeat_interval })
end


-- Stops the port watcher and the heartbeat loop. Returns nothing.
function _M.stop()
  if not started then
    return
  end
  started = false
  ports.stop()
  heartbeat.stop()
  log.info("background work stopped")
end


return _M
