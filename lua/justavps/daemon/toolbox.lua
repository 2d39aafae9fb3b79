-- Placeholder until the toolbox executor lands.
local proxy = require("justavps.proxy")

local _M = {}

function _M.handle(_req, _decision)
  return proxy.error_response(501, "not_implemented",
    "the toolbox is not available in this daemon build")
end

return _M
