-- justavps broker: verifies the edge's signature, timestamp and nonce,
-- applies the target policy and dials the machine. The only component
-- allowed to reach machine addresses.
local core = require("justavps.core")
local reload = require("justavps.reload")
local service = require("justavps.service")
local log = require("justavps.log")
local broker_config = require("justavps.broker.config")
local state = require("justavps.broker.state")

local _M = {}

_M.summary = "verifies edge signatures and dials machines"

_M.options = {
  { config = { type = "string", default = "/etc/justavps/broker.json",
    description = "path of the broker config file (JSON)" } },
  { watch = { type = "boolean", default = false,
    description = "reload the app and the target policy when a Lua file "
      .. "under the tree changes" } },
  { drain_timeout = { type = "duration", default = 10, between = { 0, 3600 },
    description = "seconds to let requests finish on SIGTERM or SIGINT" } },
  { access_log = { type = "boolean", default = true,
    description = "log one line per request" } },
}


-- Returns the TLS server context of conf, or nil in plain HTTP mode; or
-- false, message when the certificate cannot be loaded.
local function tls_context(conf)
  if conf.insecure_plain_http then
    log.warn("insecure_plain_http is on: serving plain HTTP without TLS; "
      .. "use it only for development on loopback", {
        host = conf.listen.host, port = conf.listen.port })
    return nil
  end
  local ctx, err = core.tls.server_context({ cert = conf.tls.cert,
    key = conf.tls.key })
  if not ctx then
    return false, err
  end
  return ctx
end


function _M.run(opts)
  local conf, err = broker_config.load(opts.config)
  if not conf then
    log.alert("cannot load the broker config", { path = opts.config,
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
    log.alert("invalid broker config", { path = opts.config, error = serr })
    return 1
  end

  reload.configure({ stable = { "justavps.broker.state",
    "justavps.broker.config", "justavps.proxy", "justavps.cidr",
    "justavps.service" } })

  log.info("broker configured", { broker_id = conf.broker_id,
    nonce_capacity = state.nonces:capacity(),
    nonce_ttl = conf.nonce.ttl, clock_skew = conf.clock_skew })

  return service.run({
    app = "justavps.broker.app",
    listeners = {
      -- Bodies stream through to the machine, which sets its own limits;
      -- the proxy keeps only a few buffers of any size.
      { name = "main", host = conf.listen.host, port = conf.listen.port,
        tls = tls, limits = { max_body = 2 ^ 50 } },
    },
    watch = opts.watch,
    drain_timeout = opts.drain_timeout,
    access_log = opts.access_log,
    on_stop = require("justavps.proxy").close_pool,
  })
end


return _M
