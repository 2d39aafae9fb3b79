-- State the broker keeps across reloads: its validated config and the
-- nonce cache. This module is stable (never reloaded), so a reload of the
-- app and the target policy keeps every recorded nonce. A fresh cache
-- would let each request of the last two minutes be replayed once.
local core = require("justavps.core")

local _M = {
  conf = nil,
  nonces = nil,
}


-- Installs a validated config and allocates the nonce cache. Returns true
-- or nil, message.
function _M.set_config(conf)
  local cache, err = core.nonce.new({ ttl = conf.nonce.ttl,
    max_bytes = conf.nonce.max_bytes })
  if not cache then
    return nil, "nonce cache: " .. err
  end
  if _M.nonces then
    _M.nonces:close()
  end
  _M.conf = conf
  _M.nonces = cache
  return true
end


return _M
