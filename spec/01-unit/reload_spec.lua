local reload = require("justavps.reload")
local log = require("justavps.log")

-- Fixture modules live in a temporary directory that is added to
-- package.path and configured as a project root.
local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -p " .. dir .. "/rfix"))

local function write(name, text)
  local f = assert(io.open(dir .. "/rfix/" .. name .. ".lua", "w"))
  f:write(text)
  f:close()
end

local function app(version, extra)
  return ([[
local helper = require("rfix.helper")
local _M = { version = %d }
function _M.handler()
  return "v%d:" .. helper.tag()
end
%s
return _M
]]):format(version, version, extra or "")
end

local function helper(tag)
  return ([[
local _M = {}
function _M.tag() return "%s" end
return _M
]]):format(tag)
end

local function loaded_copy()
  local t = {}
  for k, v in pairs(package.loaded) do
    t[k] = v
  end
  return t
end


describe("reload", function()
  local lines
  local previous_logger

  setup(function()
    package.path = dir .. "/?.lua;" .. package.path
    reload.configure({ roots = { dir } })
  end)

  teardown(function()
    os.execute("rm -rf " .. dir)
  end)

  before_each(function()
    lines = {}
    previous_logger = log.set_default(log.new({
      write = function(level, msg, fields)
        lines[#lines + 1] = { level = level, msg = msg, fields = fields }
      end,
      enabled = function() return true end,
      clock = function() return 0 end,
    }))
    write("helper", helper("a"))
    write("app", app(1))
  end)

  after_each(function()
    log.set_default(previous_logger)
  end)

  it("loads a first generation", function()
    local gen, err = reload.load("rfix.app")
    assert.is_nil(err)
    assert.equal("v1:a", gen.module.handler())
    assert.equal(gen, reload.current())
    assert.same({ "rfix.app", "rfix.helper" }, gen.modules)
  end)

  it("swaps to new code on success", function()
    local old = assert(reload.load("rfix.app"))
    write("helper", helper("b"))
    write("app", app(2))
    local new = assert(reload.load("rfix.app"))
    assert.equal("v2:b", new.module.handler())
    assert.equal(new, reload.current())
    assert.is_true(new.id > old.id)
    assert.equal(new.module, package.loaded["rfix.app"])
    assert.equal(require("rfix.helper").tag(), "b")
  end)

  it("keeps old closures callable after a swap", function()
    local old = assert(reload.load("rfix.app"))
    local in_flight = old.module.handler
    write("helper", helper("b"))
    write("app", app(2))
    assert(reload.load("rfix.app"))
    assert.equal("v1:a", in_flight())
    assert.equal("v1:a", old.module.handler())
  end)

  it("keeps old code on a syntax error", function()
    local old = assert(reload.load("rfix.app"))
    local before = loaded_copy()
    write("helper", helper("b"))
    write("app", "local x = \nreturn {")
    local gen, err, code = reload.load("rfix.app")
    assert.is_nil(gen)
    assert.equal("load_failed", code)
    assert.matches("rfix/app%.lua:%d+:", err)
    assert.equal(old, reload.current())
    assert.same(before, loaded_copy())
  end)

  it("reports file:line of a syntax error in a dependency", function()
    assert(reload.load("rfix.app"))
    write("helper", "local _M = {}\n\nfunction _M.tag( return 1 end\n")
    local _, err, code = reload.load("rfix.app")
    assert.equal("load_failed", code)
    assert.matches("rfix/helper%.lua:3:", err)
  end)

  it("keeps old code on a runtime error at load", function()
    local old = assert(reload.load("rfix.app"))
    local before = loaded_copy()
    write("app", app(2, "error('boom at load')"))
    local gen, err, code = reload.load("rfix.app")
    assert.is_nil(gen)
    assert.equal("load_failed", code)
    assert.matches("rfix/app%.lua:%d+: boom at load", err)
    assert.equal(old, reload.current())
    assert.equal("v1:a", reload.current().module.handler())
    assert.same(before, loaded_copy())
  end)

  it("restores package.loaded so require works again", function()
    assert(reload.load("rfix.app"))
    local before = loaded_copy()
    write("app", app(2, "error('boom')"))
    assert.is_nil(reload.load("rfix.app"))
    -- Lua leaves a sentinel in package.loaded after a failed require;
    -- the restore must remove it.
    assert.equal(before["rfix.app"], package.loaded["rfix.app"])
    assert.equal(before["rfix.app"], require("rfix.app"))
  end)

  it("keeps old code when validate fails", function()
    local old = assert(reload.load("rfix.app"))
    local before = loaded_copy()
    write("app", app(2,
      "function _M.validate() return nil, 'route table empty' end"))
    local gen, err, code = reload.load("rfix.app")
    assert.is_nil(gen)
    assert.equal("invalid", code)
    assert.matches("route table empty", err)
    assert.equal(old, reload.current())
    assert.same(before, loaded_copy())
  end)

  it("keeps old code when validate raises", function()
    local old = assert(reload.load("rfix.app"))
    write("app", app(2, "function _M.validate() error('bad policy') end"))
    local gen, err, code = reload.load("rfix.app")
    assert.is_nil(gen)
    assert.equal("invalid", code)
    assert.matches("rfix/app%.lua:%d+: bad policy", err)
    assert.equal(old, reload.current())
  end)

  it("accepts a generation whose validate passes", function()
    write("app", app(3, "function _M.validate(m) return m.version == 3 end"))
    local gen = assert(reload.load("rfix.app"))
    assert.equal(3, gen.module.version)
  end)

  it("returns busy while a load runs", function()
    write("app", app(4, [[
function _M.validate()
  local r = require("justavps.reload")
  _M.nested = { r.load("rfix.app") }
  return true
end]]))
    local gen = assert(reload.load("rfix.app"))
    assert.same({ nil, "busy", "busy" }, gen.module.nested)
    assert.is_false(reload.busy())
  end)

  it("logs step timings", function()
    assert(reload.load("rfix.app"))
    local last = lines[#lines]
    assert.equal("reload finished", last.msg)
    assert.equal("rfix.app", last.fields.entry)
    assert.is_number(last.fields.load_ms)
    assert.is_number(last.fields.total_ms)
  end)

  it("logs a failed reload as an error", function()
    assert(reload.load("rfix.app"))
    write("app", app(2, "error('boom')"))
    assert.is_nil(reload.load("rfix.app"))
    local last = lines[#lines]
    assert.equal("error", last.level)
    assert.equal("reload failed", last.msg)
    assert.equal("load_failed", last.fields.code)
  end)

  it("never reloads stable framework modules", function()
    assert.is_false(reload.is_reloadable("justavps.json"))
    assert.is_false(reload.is_reloadable("justavps.reload"))
    assert.is_false(reload.is_reloadable("justavps.core"))
    assert.is_false(reload.is_reloadable("cjson"))
    assert.is_true(reload.is_reloadable("rfix.helper"))
  end)

  it("keeps framework module identity across a swap", function()
    local json = require("justavps.json")
    write("app", app(5, "_M.json = require('justavps.json')"))
    local gen = assert(reload.load("rfix.app"))
    assert.equal(json, gen.module.json)
  end)

  it("rejects a non-string entry", function()
    assert.has_error(function() reload.load(42) end)
  end)

  it("reports a missing file watcher", function()
    local handle, err, code = reload.watch({ dir }, function() end,
      { core = { fs = {} } })
    assert.is_nil(handle)
    assert.equal("unsupported", code)
    assert.matches("core.fs.watch", err)
  end)

  it("batches watch events into one callback", function()
    local callbacks, timers = {}, {}
    local fake = {
      fs = {
        watch = function(path, fn)
          callbacks[path] = fn
          return { stop = function() callbacks[path] = nil end }
        end,
      },
      timer = function(_, fn)
        timers[#timers + 1] = fn
        return { stop = function() end }
      end,
    }
    local seen = {}
    local handle = assert(reload.watch({ dir }, function(paths)
      seen[#seen + 1] = paths
    end, { core = fake }))
    callbacks[dir]("a.lua", "change")
    callbacks[dir]("b.lua", "change")
    assert.equal(1, #timers)
    timers[1]()
    assert.same({ { dir .. "/a.lua", dir .. "/b.lua" } }, seen)
    handle.close()
    assert.is_nil(callbacks[dir])
  end)
end)
