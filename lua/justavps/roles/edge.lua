-- justavps edge: the public entry point for SLUG.DOMAIN and
-- PORT-SLUG.DOMAIN. Looks the machine up, checks the visitor's proxy
-- cookie, share token, API key or machine ticket, signs the request and
-- forwards it to a broker.
local core = require("justavps.core")
local reload = require("justavps.reload")
local service = require("justavps.service")
local log = require("justavps.log")
local db = require("justavps.db.db")
local proxy = require("justavps.proxy")
local edge_config = require("justavps.edge.config")
local state = require("justavps.edge.state")
local lookup = require("justavps.edge.lookup")
local brokers = require("justavps.edge.brokers")

local ipairs = ipairs

local _M = {}

_M.summary = "public entry point: authenticates, signs and forwards "
  .. "requests to a broker"

_M.options = {
  { config = { type = "string", default = "/etc/justavps/edge.json",
    description = "path of the edge config file (JSON)" } },
  { watch = { type = "boolean", default = false,
    description = "reload the app and the access policy when a Lua file "
      .. "under the tree changes" } },
  { drain_timeout = { type = "duration", default = 10, between = { 0, 3600 },
    description = "seconds to let requests finish on SIGTERM or SIGINT" } },
  { access_log = { type = "boolean", default = true,
    description = "log one line per request" } },
}


-- Returns the TLS server context of conf, or nil in plain HTTP mode; or
-- false, message when a certificate cannot be loaded.
local function tls_context(conf)
  if conf.insecure_plain_http then
    log.warn("insecure_plain_http is on: serving plain HTTP without TLS "
      .. "and cookies without Secure; use it only for development on "
      .. "loopback", { host = conf.listen.host, port = conf.listen.port })
    return nil
  end
  -- NOTE: docs/api/tls.md describes non-empty sni lists as broken in
  -- the core, and no spec covers this path with entries.
  local sni = {}
  for i, entry in ipairs(conf.tls.sni) do
    local names = {}
    for j, name in ipairs(entry.names) do
      names[j] = name
    end
    sni[i] = { names = names, cert = entry.cert, key = entry.key }
  end
  local ctx, err = core.tls.server_context({ cert = conf.tls.cert,
    key = conf.tls.key, sni = sni })
  if not ctx then
    return false, err
  end
  return ctx
end


function _M.run(opts)
  local conf, err = edge_config.load(opts.config)
  if not conf then
    log.alert("cannot load the edge config", { path = opts.config,
      error = err })
    return 1
  end

  local tls, terr = tls_context(conf)
  if tls == false then
    log.alert("cannot load the TLS certificate", { cert = conf.tls.cert,
      error = terr })
    return 1
  end

  local ok, serr = state.set_config(conf)
  if not ok then
    log.alert("cannot set up the brokers", { error = serr })
    return 1
  end
  db.setup(conf.database)

  reload.configure({ stable = { "justavps.edge.state",
    "justavps.edge.config", "justavps.proxy", "justavps.service",
    "justavps.db.db" } })

  log.info("edge configured", { domain = conf.domain,
    brokers = #conf.brokers, machine_ttl = conf.cache.machine_ttl })

  local listener, checks
  return service.run({
    app = "justavps.edge.app",
    listeners = {
      -- Bodies stream through to the broker; the proxy keeps only a few
      -- buffers of any size.
      { name = "main", host = conf.listen.host, port = conf.listen.port,
        tls = tls, limits = { max_body = 2 ^ 50 } },
    },
    watch = opts.watch,
    drain_timeout = opts.drain_timeout,
    access_log = opts.access_log,
    on_start = function()
      listener = lookup.start_listener()
      checks = brokers.start_checks()
    end,
    on_stop = function()
      if checks then
        checks.stop()
      end
      if listener then
        listener.stop()
      end
      proxy.close_pool()
      db.close()
    end,
  })
end


return _M
