-- Hot reload of application code, built aside and swapped in one step.
--
-- reload.load(entry) runs require(entry) against a package.loaded from
-- which every reloadable module has been hidden, so the entry module and
-- each reloadable module it requires run again from disk. Stable modules
-- (the core, this module, the framework, C modules and anything outside the
-- project roots) stay shared. If loading or validate() fails, package.loaded
-- is restored exactly and the current generation keeps serving. On success
-- the new generation becomes current with one assignment, so code running
-- in the old one keeps the closures it already holds.
local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local require = require
local rawget = rawget
local sort = table.sort
local xpcall = xpcall
local traceback = debug.traceback
local sfind = string.find
local ssub = string.sub
local smatch = string.match
local searchpath = package.searchpath
local clock = os.clock

local _M = {}

-- Module name prefixes that are never reloaded. A prefix "a.b" covers
-- "a.b" itself and "a.b.*".
local stable_prefixes = {
  "justavps.core",
  "justavps.reload",
  "justavps.cli",
  "justavps.config",
  "justavps.errors",
  "justavps.json",
  "justavps.log",
  "justavps.router",
  "justavps.units",
  "justavps.roles",
  "justavps.service",
  "justavps.proxy",
  "justavps.cidr",
  "justavps.websocket",
}

-- Roles live under justavps.roles but are application code.
local reloadable_prefixes = {
  "justavps.roles.",
}

local roots = nil
local current = nil
local busy = false
local generation_count = 0
local logger = nil


local function log()
  if not logger then
    logger = require("justavps.log")
  end
  return logger
end


local function has_prefix(name, prefix)
  if name == prefix then
    return true
  end
  return ssub(name, 1, #prefix + 1) == prefix .. "."
    or (ssub(prefix, -1) == "." and ssub(name, 1, #prefix) == prefix)
end


local function default_roots()
  local root = rawget(_G, "JUSTAVPS_ROOT") or os.getenv("PWD") or "."
  return { root }
end


-- Sets which modules are reloaded. opts.roots: directories whose Lua files
-- are project code (default: JUSTAVPS_ROOT, else the working directory).
-- opts.stable: extra module name prefixes never to reload, for modules
-- that own long-lived state such as listening sockets.
function _M.configure(opts)
  if type(opts) ~= "table" then
    error("reload.configure: expected a table", 2)
  end
  if opts.roots ~= nil then
    if type(opts.roots) ~= "table" then
      error("reload.configure: roots must be a list of directories", 2)
    end
    roots = opts.roots
  end
  for _, prefix in ipairs(opts.stable or {}) do
    stable_prefixes[#stable_prefixes + 1] = prefix
  end
end


local function is_stable(name)
  for _, prefix in ipairs(reloadable_prefixes) do
    if has_prefix(name, prefix) then
      return false
    end
  end
  for _, prefix in ipairs(stable_prefixes) do
    if has_prefix(name, prefix) then
      return true
    end
  end
  return false
end


local function under_root(path)
  for _, root in ipairs(roots or default_roots()) do
    if ssub(path, 1, 1) ~= "/" then
      -- A relative package.path entry resolves from the working directory.
      if root == "." or root == os.getenv("PWD") then
        return true
      end
    elseif ssub(path, 1, #root + 1) == root .. "/" then
      return true
    end
  end
  return false
end


-- Returns true when module name is reloaded by reload.load.
function _M.is_reloadable(name)
  if type(name) ~= "string" or is_stable(name) then
    return false
  end
  local path = searchpath(name, package.path)
  if not path then
    return false
  end
  if ssub(path, 1, 2) == "./" then
    path = ssub(path, 3)
  end
  return under_root(path)
end


local function snapshot(loaded)
  local copy = {}
  for k, v in pairs(loaded) do
    copy[k] = v
  end
  return copy
end


-- Makes package.loaded hold exactly the entries of saved.
local function restore(loaded, saved)
  for k in pairs(loaded) do
    if saved[k] == nil then
      loaded[k] = nil
    end
  end
  for k, v in pairs(saved) do
    loaded[k] = v
  end
end


-- The first line of a Lua error without the traceback; it carries the
-- file:line of the failure.
local function first_line(err)
  local text = tostring(err)
  local line = smatch(text, "^[^\n]*")
  -- Syntax errors from require read "error loading module 'm' from file
  -- 'f':" with the file:line on the next line.
  if sfind(line, ":$") then
    line = smatch(text, "^[^\n]*\n%s*[^\n]*") or line
    line = line:gsub("\n%s*", " ")
  end
  return line
end


local function elapsed_ms(since)
  return (clock() - since) * 1000
end


-- Loads a new generation of entry (a module name) and makes it current.
-- Returns the generation { id, entry, module, modules, timings }, or nil,
-- message, code with code "busy" (another load is running), "load_failed"
-- (syntax or runtime error, message has file:line) or "invalid" (the
-- module's validate() failed).
function _M.load(entry)
  if type(entry) ~= "string" then
    error("reload.load: entry must be a module name", 2)
  end

  if busy then
    return nil, "busy", "busy"
  end
  busy = true

  local loaded = package.loaded
  local saved = snapshot(loaded)
  local timings = {}
  local started = clock()

  local hidden = {}
  for name in pairs(saved) do
    if _M.is_reloadable(name) then
      hidden[name] = true
      loaded[name] = nil
    end
  end
  loaded[entry] = nil
  timings.scan_ms = elapsed_ms(started)

  local step = clock()
  local ok, mod = xpcall(require, traceback, entry)
  timings.load_ms = elapsed_ms(step)

  local function fail(message, code, detail)
    restore(loaded, saved)
    busy = false
    log().err("reload failed", { entry = entry, error = message,
      code = code, detail = detail })
    return nil, message, code
  end

  if not ok then
    return fail("reload " .. entry .. ": " .. first_line(mod), "load_failed",
      mod)
  end

  step = clock()
  if type(mod) == "table" and type(mod.validate) == "function" then
    local vok, valid, verr = xpcall(mod.validate, traceback, mod)
    timings.validate_ms = elapsed_ms(step)
    if not vok then
      return fail("reload " .. entry .. ": validate raised: "
        .. first_line(valid), "invalid", valid)
    end
    if valid ~= true then
      return fail("reload " .. entry .. ": validate failed: "
        .. tostring(verr or "returned " .. tostring(valid)), "invalid")
    end
  end

  -- Modules of the new generation stay loaded. Hidden modules that it did
  -- not load again are put back, so code outside the generation keeps the
  -- module tables it had.
  local modules = {}
  for name in pairs(loaded) do
    if saved[name] == nil or hidden[name] or name == entry then
      if loaded[name] ~= saved[name] then
        modules[#modules + 1] = name
      end
    end
  end
  for name in pairs(hidden) do
    if loaded[name] == nil then
      loaded[name] = saved[name]
    end
  end
  sort(modules)

  generation_count = generation_count + 1
  local gen = {
    id = generation_count,
    entry = entry,
    module = mod,
    modules = modules,
    timings = timings,
  }
  timings.total_ms = elapsed_ms(started)

  local previous = current
  current = gen
  busy = false
  -- Forwarding decisions the HTTP server cached in C were made by the
  -- old generation's code and settings.
  require("justavps.core").http.pass_reset()

  log().info("reload finished", {
    entry = entry,
    generation = gen.id,
    previous = previous and previous.id or nil,
    modules = #modules,
    scan_ms = timings.scan_ms,
    load_ms = timings.load_ms,
    validate_ms = timings.validate_ms,
    total_ms = timings.total_ms,
  })

  return gen
end


-- Returns the active generation, or nil before the first load.
function _M.current()
  return current
end


-- Returns true while a load runs.
function _M.busy()
  return busy
end


-- Calls on_change(paths) after files under dirs change, batching the
-- events of delay seconds (default 0.2). Needs core.fs.watch(path,
-- fn(filename, events)); returns a handle with :close(), or nil, message,
-- "unsupported" when the core has no file watcher.
function _M.watch(dirs, on_change, opts)
  if type(dirs) == "string" then
    dirs = { dirs }
  end
  if type(dirs) ~= "table" or type(on_change) ~= "function" then
    error("reload.watch: expected a list of directories and a function", 2)
  end

  opts = opts or {}
  local core = opts.core or require("justavps.core")
  local watch = core.fs and core.fs.watch
  if type(watch) ~= "function" then
    return nil, "reload.watch: core.fs.watch is not available in this build",
      "unsupported"
  end

  local delay = opts.delay or 0.2
  local changed = {}
  local pending = nil
  local watchers = {}

  local function fire()
    pending = nil
    local paths = {}
    for path in pairs(changed) do
      paths[#paths + 1] = path
    end
    changed = {}
    sort(paths)
    local ok, err = xpcall(on_change, traceback, paths)
    if not ok then
      log().err("reload watch callback failed", { error = err })
    end
  end

  for _, dir in ipairs(dirs) do
    local w, err = watch(dir, function(filename)
      changed[dir .. "/" .. tostring(filename)] = true
      if not pending then
        pending = core.timer(delay, fire)
      end
    end)
    if not w then
      for _, prev in ipairs(watchers) do
        prev:stop()
      end
      return nil, "reload.watch: " .. dir .. ": " .. tostring(err),
        "watch_failed"
    end
    watchers[#watchers + 1] = w
  end

  local handle = {}
  function handle.close()
    for _, w in ipairs(watchers) do
      w:stop()
    end
    watchers = {}
    if pending then
      pending:stop()
      pending = nil
    end
  end
  return handle
end


return _M
