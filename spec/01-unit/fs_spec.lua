-- core.fs: inotify watches, stat and rename on a real temporary directory.
local core = require("justavps.core")
local helpers = require("spec.support.helpers")

local fs = core.fs

local function make_dir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir " .. dir) == 0)
  return dir
end

local function write_file(path, data)
  local f = assert(io.open(path, "w"))
  f:write(data)
  f:close()
end

describe("core.fs", function()
  local dir

  before_each(function()
    dir = make_dir()
  end)

  after_each(function()
    os.execute("rm -rf " .. dir)
  end)

  it("watches a directory for a new file", helpers.async(function()
    local got = core.waiter()
    local events = {}
    local w = assert(fs.watch(dir, function(name, ev)
      events[#events + 1] = { name = name, ev = ev }
      if name == "new.conf" then
        got:wake(true)
      end
    end))
    assert.equal(dir, w:path())

    write_file(dir .. "/new.conf", "x = 1\n")
    assert.is_true(got:wait(10))
    local last = events[#events]
    assert.equal("new.conf", last.name)
    assert.is_boolean(last.ev.change)
    assert.is_boolean(last.ev.rename)
    assert.is_true(last.ev.change or last.ev.rename)
    w:stop()
    w:stop()
    assert.is_nil(w:path())
  end))

  it("reports a rename into the directory", helpers.async(function()
    local got = core.waiter()
    write_file(dir .. "/tmp.conf", "y")
    local w = assert(fs.watch(dir, function(name, ev)
      if name == "final.conf" and ev.rename then
        got:wake(true)
      end
    end))
    core.spawn(function()
      assert(fs.rename(dir .. "/tmp.conf", dir .. "/final.conf"))
    end)
    assert.is_true(got:wait(10))
    w:stop()
  end))

  it("watches a single file", helpers.async(function()
    local path = dir .. "/single.conf"
    write_file(path, "a")
    local got = core.waiter()
    local w = assert(fs.watch(path, function(name, ev)
      got:wake(name, ev)
    end))
    write_file(path, "b")
    local name, ev = got:wait(10)
    assert.equal("single.conf", name)
    assert.is_true(ev.change)
    w:stop()
  end))

  it("fails to watch a missing path", function()
    local w, msg, code = fs.watch(dir .. "/missing", function() end)
    assert.is_nil(w)
    assert.equal("ENOENT", code)
    assert.matches("missing", msg, 1, true)
  end)

  it("stats a file and a directory", helpers.async(function()
    write_file(dir .. "/f", "12345")
    local st = assert(fs.stat(dir .. "/f"))
    assert.equal("file", st.type)
    assert.equal(5, st.size)
    assert.is_number(st.mtime)
    assert.is_true(st.mtime > 0)
    assert.equal(st.mode % 4096, st.perm)

    st = assert(fs.stat(dir))
    assert.equal("directory", st.type)
  end))

  it("returns ENOENT from stat and rename", helpers.async(function()
    local st, msg, code = fs.stat(dir .. "/nothing")
    assert.is_nil(st)
    assert.equal("ENOENT", code)
    assert.matches("nothing", msg, 1, true)

    local ok
    ok, msg, code = fs.rename(dir .. "/nothing", dir .. "/else")
    assert.is_nil(ok)
    assert.equal("ENOENT", code)
    assert.matches("rename", msg, 1, true)
  end))

  it("needs a coroutine for stat", function()
    assert.has_error(function() fs.stat("/") end)
  end)
end)
