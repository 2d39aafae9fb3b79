-- The toolbox executor: the HTTP API under /_toolbox for files, exec and
-- background processes. docs/daemon-toolbox.md describes the API.
--
-- The routing policy has already checked the path (no dot segments,
-- encoded slashes or NUL), and app.lua has admitted the peer. The edge
-- authenticates callers, so no auth happens here.
local router = require("justavps.router")
local util = require("justavps.daemon.toolbox.util")
local paths = require("justavps.daemon.toolbox.paths")
local files = require("justavps.daemon.toolbox.files")
local entries = require("justavps.daemon.toolbox.entries")
local search = require("justavps.daemon.toolbox.search")
local exec = require("justavps.daemon.toolbox.exec")
local processes = require("justavps.daemon.toolbox.processes")
local ptable = require("justavps.daemon.toolbox.process_table")

local concat = table.concat

local _M = {}

local fail = util.fail


-- Wraps a handler that takes a cleaned relative path.
local function with_path(fn)
  return function(req, params, query)
    local rel, err = paths.clean(params.path or "")
    if not rel then
      return util.error_reply(err)
    end
    return fn(req, rel, query)
  end
end


local routes = router.new()

local function route(method, path, handler)
  routes:add({ method = method, path = path, handler = handler })
end

route("GET", "/files/{path*}", with_path(function(req, rel, query)
  if util.flag(query.list) then
    return entries.list(rel, query)
  end
  return files.download(req, rel)
end))
route("PUT", "/files/{path*}", with_path(files.upload))
route("DELETE", "/files/{path*}", with_path(function(_, rel, query)
  return entries.delete(rel, query)
end))
route("GET", "/list/{path*}", with_path(function(_, rel, query)
  return entries.list(rel, query)
end))
route("GET", "/stat/{path*}", with_path(function(_, rel)
  return entries.stat(rel)
end))
route("POST", "/mkdir/{path*}", with_path(function(_, rel, query)
  return entries.mkdir(rel, query)
end))
route("POST", "/move", function(req)
  return entries.move(req)
end)
route("GET", "/search", function(_, _, query)
  return search.handle(query)
end)
route("POST", "/exec", function(req)
  return exec.handle(req)
end)
route("POST", "/processes", function(req)
  return processes.start(req)
end)
route("GET", "/processes", function()
  return processes.list()
end)
route("GET", "/processes/{id}", function(_, params)
  return processes.show(params.id)
end)
route("DELETE", "/processes/{id}", function(_, params)
  return processes.delete(params.id)
end)
route("GET", "/processes/{id}/logs", function(req, params, query)
  return processes.logs(req, params.id, query)
end)
route("POST", "/processes/{id}/signal", function(req, params)
  return processes.signal(req, params.id)
end)


-- Runs the route for decision.path, the path after /_toolbox.
function _M.handle(req, decision)
  local found, params, extra = routes:match(req.method, decision.path)
  if not found then
    if params == "method_not_allowed" then
      local status, headers, body = util.error_reply(fail(405,
        "method_not_allowed", req.method .. " is not allowed on "
        .. decision.path))
      headers["Allow"] = concat(extra, ", ")
      return status, headers, body
    end
    if params == "bad_request" then
      return util.error_reply(fail(400, "invalid_path", extra))
    end
    return util.error_reply(fail(404, "not_found",
      "no toolbox endpoint at " .. decision.path))
  end
  return found.handler(req, params, util.parse_query(req.query))
end


ptable.start_sweeper()

return _M
