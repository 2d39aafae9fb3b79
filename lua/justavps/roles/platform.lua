-- justavps platform: the HTTP API at /api/v1, with its state in
-- PostgreSQL.
local reload = require("justavps.reload")
local service = require("justavps.service")
local log = require("justavps.log")
local db = require("justavps.db.db")
local platform_config = require("justavps.platform.config")
local state = require("justavps.platform.state")
local worker = require("justavps.provision.worker")

local _M = {}

_M.summary = "HTTP API, dashboard sessions, machines, provisioning and "
  .. "billing"

_M.options = {
  { config = { type = "string",
    description = "path of the platform config file (JSON); without it "
      .. "defaults and JUSTAVPS_PLATFORM_* variables apply" } },
  { watch = { type = "boolean", default = false,
    description = "reload routes when a Lua file under the tree changes" } },
  { drain_timeout = { type = "duration", default = 10, between = { 0, 3600 },
    description = "seconds to let requests finish on SIGTERM or SIGINT" } },
  { access_log = { type = "boolean", default = true,
    description = "log one line per request" } },
}


function _M.run(opts)
  local conf, err = platform_config.load(opts.config)
  if not conf then
    log.alert("cannot load the platform config", { path = opts.config,
      error = err })
    return 1
  end

  state.set_config(conf)
  local ok, derr = db.setup(conf.database)
  if not ok then
    log.alert("cannot set up the database pool", { error = derr })
    return 1
  end

  reload.configure({ stable = { "justavps.platform.state",
    "justavps.platform.config", "justavps.db", "justavps.machine_sig" } })

  return service.run({
    app = "justavps.platform.app",
    host = conf.listen.host,
    port = conf.listen.port,
    watch = opts.watch,
    drain_timeout = opts.drain_timeout,
    access_log = opts.access_log,
    on_start = function(servers)
      worker.start(conf, { port = servers.main:port() })
    end,
    on_stop = function()
      worker.stop()
      db.close()
    end,
  })
end


return _M
