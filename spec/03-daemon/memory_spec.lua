-- The idle collector: full collections while no connection is open, none
-- while one is, against a real listener and a real client socket.
local core = require("justavps.core")
local helpers = require("support.helpers")
local memory = require("justavps.daemon.memory")

local async = helpers.async

-- Polls every 20 ms, at most 250 times, until predicate() is true.
-- Returns whether it became true.
local function wait_for(predicate)
  for _ = 1, 250 do
    if predicate() then
      return true
    end
    core.sleep(0.02)
  end
  return predicate()
end


-- Allocates about kib KiB of tables that are garbage on return.
local function make_garbage(kib)
  local keep = {}
  for i = 1, kib * 16 do
    keep[i] = { i }
  end
  return #keep
end


describe("memory.collect", function()
  it("frees garbage", function()
    collectgarbage("collect")
    local count_before = memory.stats().collections
    make_garbage(2048)
    local before, after = memory.collect()
    assert.is_true(before - after > 1024,
      "freed " .. (before - after) .. " KiB")
    assert.equal(count_before + 1, memory.stats().collections)
    assert.equal(after, memory.stats().heap_after)
  end)
end)


describe("idle collector", function()
  local server, client

  before_each(function()
    server = assert(core.http.listen({ host = "127.0.0.1", port = 0,
      access_log = false, handler = function()
        return 204
      end }))
  end)

  after_each(function()
    memory.stop()
    if client then
      client:close()
      client = nil
    end
    server:close()
  end)

  local function start(min_growth)
    memory.start({ interval = 0.02, min_growth = min_growth,
      busy = function()
        return server:connections() > 0
      end })
  end

  it("collects when idle", async(function()
    local initial = memory.stats().collections
    start(64)
    assert.is_true(wait_for(function()
      return memory.stats().collections > initial
    end), "no collection at start")

    local started = memory.stats().collections
    make_garbage(1024)
    assert.is_true(wait_for(function()
      return memory.stats().collections > started
    end), "no collection after 1 MiB of garbage")
  end))

  it("skips while a connection is open", async(function()
    start(64)
    client = assert(core.tcp.connect("127.0.0.1", server:port()))
    assert.is_true(wait_for(function()
      return server:connections() > 0
    end), "the server did not accept the client")

    local collections = memory.stats().collections
    local skipped = memory.stats().skipped_busy
    make_garbage(1024)
    assert.is_true(wait_for(function()
      return memory.stats().skipped_busy >= skipped + 3
    end), "the collector did not check three times")
    assert.equal(collections, memory.stats().collections)
  end))

  it("skips small growth", async(function()
    local base = memory.stats().skipped_small
    start(1024 * 1024)
    assert.is_true(wait_for(function()
      return memory.stats().skipped_small >= base + 3
    end), "the collector did not check three times")
    local collections = memory.stats().collections
    make_garbage(256)
    local skipped = memory.stats().skipped_small
    assert.is_true(wait_for(function()
      return memory.stats().skipped_small >= skipped + 3
    end), "the collector did not check three more times")
    assert.equal(collections, memory.stats().collections)
  end))

  it("stops", async(function()
    local function checks()
      local stats = memory.stats()
      return stats.skipped_small + stats.collections
    end
    local base = checks()
    start(0)
    assert.is_true(wait_for(function()
      return checks() >= base + 3
    end), "the collector did not run")
    memory.stop()
    local stats = memory.stats()
    core.sleep(0.1)
    assert.same(stats, memory.stats())
  end))
end)
