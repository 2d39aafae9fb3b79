-- State the daemon keeps across reloads: its validated config and what is
-- compiled from it. This module is stable (never reloaded), so a reload
-- of the app and policies keeps the same config and caches.
local cidr = require("justavps.cidr")

local _M = {
  conf = nil,
  broker_blocks = {},
}


-- Installs a validated config. Returns true or nil, message.
function _M.set_config(conf)
  local blocks, err = cidr.compile(conf.broker_cidrs)
  if not blocks then
    return nil, "broker_cidrs: " .. err
  end
  _M.conf = conf
  _M.broker_blocks = blocks
  return true
end


return _M
