-- The platform's request entry: every /api/v1 call goes to the API
-- dispatcher, which finds the route, authenticates and validates before
-- the handler runs.
local api = require("justavps.platform.api")

local _M = {}

local instance = api.new({
  title = "JustAVPS platform API",
  version = "1",
  auth = {
    machine = require("justavps.platform.auth_machine"),
    user = require("justavps.platform.auth_user"),
  },
})

require("justavps.platform.routes.system")(instance)
require("justavps.platform.routes.heartbeat")(instance)
require("justavps.platform.routes.auth")(instance)
require("justavps.platform.routes.api_keys")(instance)
require("justavps.platform.routes.machines")(instance)
require("justavps.platform.routes.events")(instance)
require("justavps.platform.routes.access")(instance)
require("justavps.platform.routes.releases")(instance)
require("justavps.platform.routes.catalog")(instance)
require("justavps.platform.routes.billing")(instance)

_M.api = instance


function _M.handle(req)
  return instance:dispatch(req)
end


function _M.validate()
  return #instance.routes > 0
end


return _M
