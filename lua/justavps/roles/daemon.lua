-- justavps daemon: runs on every machine. The public listener takes traffic
-- from brokers and routes it by path; the internal listener serves the
-- machine-signed API on loopback.
local reload = require("justavps.reload")
local service = require("justavps.service")
local log = require("justavps.log")
local daemon_config = require("justavps.daemon.config")
local state = require("justavps.daemon.state")
local background = require("justavps.daemon.background")
local memory = require("justavps.daemon.memory")
local proxy = require("justavps.proxy")

local _M = {}

_M.summary = "runs on every machine: port routing, terminal, toolbox and "
  .. "internal API"

_M.options = {
  { config = { type = "string", default = "/etc/justavps/config.json",
    description = "path of the daemon config file (JSON)" } },
  { watch = { type = "boolean", default = false,
    description = "reload policies when a Lua file under the tree changes" } },
  { drain_timeout = { type = "duration", default = 10, between = { 0, 3600 },
    description = "seconds to let requests finish on SIGTERM or SIGINT" } },
  { access_log = { type = "boolean", default = true,
    description = "log one line per request" } },
}


function _M.run(opts)
  local conf, err = daemon_config.load(opts.config)
  if not conf then
    log.alert("cannot load the daemon config", { path = opts.config,
      error = err })
    return 1
  end

  local ok, serr = state.set_config(conf)
  if not ok then
    log.alert("invalid daemon config", { path = opts.config, error = serr })
    return 1
  end

  -- Modules that own running sessions or compiled config stay loaded
  -- across reloads; a reload swaps the app, policies and executors only.
  reload.configure({ stable = { "justavps.daemon.state",
    "justavps.daemon.config", "justavps.daemon.memory",
    "justavps.daemon.terminal_session",
    "justavps.daemon.terminal_ring" } })

  return service.run({
    app = "justavps.daemon.app",
    listeners = {
      -- Bodies stream through to the user's app, which sets its own
      -- limits; the proxy holds only a few buffers of any size.
      { name = "public", host = conf.public.host, port = conf.public.port,
        limits = { max_body = 2 ^ 50 } },
      { name = "internal", host = conf.internal.host,
        port = conf.internal.port },
    },
    watch = opts.watch,
    drain_timeout = opts.drain_timeout,
    access_log = opts.access_log,
    -- The port watcher, heartbeats and update probation start once the
    -- listeners are open, because probation checks the daemon's own
    -- internal API.
    on_start = function(servers)
      background.start(conf, {
        internal_port = servers.internal:port(),
        ports_interval = conf.ports_interval,
        heartbeat = { ca = conf.platform_ca },
        update = {
          installed_path = conf.update.installed_path,
          probation = conf.update.probation,
          reexec_args = { "daemon", "--config", opts.config },
          ca = conf.platform_ca,
        },
      })
      -- Full collections while no connection is open keep the idle
      -- heap near its live size; see justavps.daemon.memory.
      memory.start({ busy = function()
        return servers.public:connections() > 0
          or servers.internal:connections() > 0
      end })
    end,
    on_stop = function()
      memory.stop()
      background.stop()
      proxy.close_pool()
    end,
  })
end


return _M
