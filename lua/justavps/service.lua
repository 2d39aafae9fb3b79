-- The life cycle every HTTP role shares: listen, serve the current
-- generation of an app module, reload it on SIGHUP or when a watched file
-- changes, and drain on SIGTERM or SIGINT.
--
-- The app module returns a table with handle(req) (and optionally
-- validate()). Each request looks the current generation up once, so a
-- reload changes the code of later requests while requests in flight
-- finish on the closures they started with.
local core = require("justavps.core")
local reload = require("justavps.reload")
local log = require("justavps.log")

local ipairs = ipairs
local pairs = pairs
local tostring = tostring

local _M = {}

-- Directories under the project root whose Lua files trigger a reload.
local WATCHED = { "lua/justavps", "lua/justavps/apps", "lua/justavps/roles",
  "policies", "providers" }


local function current_handler(req)
  return reload.current().module.handle(req)
end


local function reload_app(app, reason)
  local gen, err, code = reload.load(app)
  if not gen then
    -- reload.load has logged the details; the old generation serves on.
    log.warn("reload rejected", { reason = reason, code = code,
      error = err })
    return false
  end
  log.info("reloaded", { reason = reason, generation = gen.id })
  return true
end


local function watch_sources(app)
  local root = rawget(_G, "JUSTAVPS_ROOT") or "."
  local dirs = {}
  for _, dir in ipairs(WATCHED) do
    local path = root .. "/" .. dir
    local f = io.open(path .. "/.", "r")
    if f then
      f:close()
      dirs[#dirs + 1] = path
    end
  end

  local handle, err = reload.watch(dirs, function(paths)
    reload_app(app, "file change: " .. tostring(paths[1]))
  end)
  if not handle then
    log.warn("file watch unavailable; reload with SIGHUP", { error = err })
  end
  return handle
end


-- Runs the service until a drain finishes. opts: app (module name), host,
-- port, tls (a core.tls server context or nil), watch (boolean),
-- drain_timeout (seconds), access_log (boolean), limits (table of
-- core.http.listen limits). Returns the exit status.
function _M.run(opts)
  local gen, err = reload.load(opts.app)
  if not gen then
    log.alert("cannot load the app", { app = opts.app, error = err })
    return 1
  end

  local listen = {
    host = opts.host,
    port = opts.port,
    tls = opts.tls,
    handler = current_handler,
    access_log = opts.access_log ~= false,
  }
  for k, v in pairs(opts.limits or {}) do
    listen[k] = v
  end

  local server, lerr = core.http.listen(listen)
  if not server then
    log.alert("cannot listen", { host = opts.host, port = opts.port,
      error = lerr })
    return 1
  end

  local handles = {}
  local watcher = opts.watch and watch_sources(opts.app) or nil
  local stopping = false
  local clean = true

  local function stop(signame)
    if stopping then
      return
    end
    stopping = true
    log.info("draining", { signal = signame,
      timeout = opts.drain_timeout })
    clean = server:drain(opts.drain_timeout)
    for _, h in ipairs(handles) do
      h:stop()
    end
    if watcher then
      watcher.close()
    end
    log.info("stopped", { clean = clean })
    core.stop()
  end

  handles[#handles + 1] = core.signal.on("SIGHUP", function()
    reload_app(opts.app, "SIGHUP")
  end)
  handles[#handles + 1] = core.signal.on("SIGTERM", stop)
  handles[#handles + 1] = core.signal.on("SIGINT", stop)

  log.info("listening", { host = opts.host, port = server:port(),
    app = opts.app, tls = opts.tls ~= nil })

  core.run()
  return 0
end


return _M
