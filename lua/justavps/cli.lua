-- Placeholder command line until the framework lands.
local core = require("justavps.core")

local _M = {}

function _M.main(args)
  if args[1] == "--help" then
    io.stdout:write("usage: justavps ROLE [options]\n")
    return 0
  end
  io.stderr:write("justavps: unknown role '" .. tostring(args[1]) .. "'\n")
  return 2
end

return _M
