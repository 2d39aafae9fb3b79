-- State the platform keeps across reloads: its validated config and the
-- heartbeat nonce cache. Stable: a reload swaps routes and handlers only.
local core = require("justavps.core")

local _M = {
  conf = nil,
  heartbeat_nonces = nil,
}


function _M.set_config(conf)
  _M.conf = conf
  _M.heartbeat_nonces = assert(core.nonce.new({ ttl = 120,
    max_bytes = conf.heartbeat.nonce_max_bytes }))
  return true
end


return _M
