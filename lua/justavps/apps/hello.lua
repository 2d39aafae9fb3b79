-- The app the dev role serves until the full stack lands: a fixed greeting
-- and a health route, enough to exercise the host end to end.
local router = require("justavps.router")
local errors = require("justavps.errors")

local _M = {}

local GREETING = "hello world\n"
local TEXT = { ["Content-Type"] = "text/plain" }
local JSON = { ["Content-Type"] = "application/json" }

local routes = router.new()

routes:add{ method = "GET", path = "/", handler = function()
  return 200, TEXT, GREETING
end }

routes:add{ method = "GET", path = "/healthz", handler = function()
  return 200, JSON, '{"status":"ok"}\n'
end }


function _M.handle(req)
  local route, params_or_code = routes:match(req.method, req.path)
  if not route then
    local status, body = errors.response(params_or_code == "method_not_allowed"
      and "method_not_allowed" or "not_found")
    return status, JSON, body
  end
  return route.handler(req, params_or_code)
end


function _M.validate()
  return true
end


return _M
