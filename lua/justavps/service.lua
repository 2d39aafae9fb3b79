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


-- Returns the request handler for listener name: the app's
-- handlers[name] when it has handlers, else its handle.
local function handler_for(name)
  return function(req)
    local app = reload.current().module
    local handlers = app.handlers
    if handlers then
      return handlers[name](req)
    end
    return app.handle(req)
  end
end


-- Runs the service until a drain finishes. opts: app (module name),
-- listeners (a list of {name=, host=, port=, tls=, limits=}; by default one
-- listener named "main" from opts.host, opts.port, opts.tls and
-- opts.limits), watch (boolean), drain_timeout (seconds), access_log
-- (boolean), on_start (function(servers) run once listening, in a
-- coroutine). Returns the exit status.
function _M.run(opts)
  local gen, err = reload.load(opts.app)
  if not gen then
    log.alert("cannot load the app", { app = opts.app, error = err })
    return 1
  end

  local listeners = opts.listeners or {
    { name = "main", host = opts.host, port = opts.port, tls = opts.tls,
      limits = opts.limits },
  }

  local handles = {}
  local servers = {}
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
    for _, server in pairs(servers) do
      clean = server:drain(opts.drain_timeout) and clean
    end
    for _, h in ipairs(handles) do
      h:stop()
    end
    if watcher then
      watcher.close()
    end
    if opts.on_stop then
      opts.on_stop()
    end
    log.info("stopped", { clean = clean })
    core.stop()
  end

  -- Handlers go in before the first listener, so a signal sent as soon as
  -- the "listening" line appears never meets the default action.
  handles[#handles + 1] = core.signal.on("SIGHUP", function()
    reload_app(opts.app, "SIGHUP")
  end)
  handles[#handles + 1] = core.signal.on("SIGTERM", stop)
  handles[#handles + 1] = core.signal.on("SIGINT", stop)

  for _, l in ipairs(listeners) do
    local listen = {
      host = l.host,
      port = l.port,
      tls = l.tls,
      handler = handler_for(l.name),
      access_log = opts.access_log ~= false,
    }
    for k, v in pairs(l.limits or {}) do
      listen[k] = v
    end

    local server, lerr = core.http.listen(listen)
    if not server then
      log.alert("cannot listen", { listener = l.name, host = l.host,
        port = l.port, error = lerr })
      for _, s in pairs(servers) do
        s:close()
      end
      for _, h in ipairs(handles) do
        h:stop()
      end
      if watcher then
        watcher.close()
      end
      return 1
    end
    servers[l.name] = server
    log.info("listening", { listener = l.name, host = l.host,
      port = server:port(), app = opts.app, tls = l.tls ~= nil })
  end

  if opts.on_start then
    core.spawn(opts.on_start, servers)
  end

  core.run()

  -- A drain that had to cut requests off is a failed stop: supervisors
  -- and scripts see it in the exit status.
  return clean and 0 or 1
end


return _M
