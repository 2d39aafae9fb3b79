-- core.nonce: replay detection, expiry, input checks and the memory bound.
-- Time is passed explicitly (the optional now argument) so no test sleeps.
local core = require("justavps.core")

local nonce = core.nonce

-- Returns a valid nonce (22 characters) that is unique for each i.
local function make_nonce(i)
  return string.format("n-%020d", i)
end


describe("nonce cache", function()
  local cache

  before_each(function()
    cache = nonce.new({ ttl = 120, max_bytes = 64 * 1024 })
  end)

  after_each(function()
    cache:close()
  end)

  it("records a fresh nonce", function()
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1000))
    assert.equal(1, cache:count())
  end)

  it("rejects a replay within the ttl", function()
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1000))

    local ok, reason = cache:check_and_add("abcdefghijklmnop", 1000)
    assert.is_false(ok)
    assert.equal("replayed", reason)

    ok, reason = cache:check_and_add("abcdefghijklmnop", 1119.9)
    assert.is_false(ok)
    assert.equal("replayed", reason)
  end)

  it("accepts the nonce again after the ttl", function()
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1000))
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1120))

    -- Recording it again restarts the window.
    local ok, reason = cache:check_and_add("abcdefghijklmnop", 1239)
    assert.is_false(ok)
    assert.equal("replayed", reason)
  end)

  it("keeps a fractional start for a whole extra second at most", function()
    -- Expiries are stored in whole seconds, rounded up.
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1000.5))
    assert.is_false(cache:check_and_add("abcdefghijklmnop", 1120.9))
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1121))
  end)

  it("tells nonces apart", function()
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1000))
    assert.is_true(cache:check_and_add("abcdefghijklmnoq", 1000))
    assert.is_true(cache:check_and_add("abcdefghijklmnopq", 1000))
    assert.is_true(cache:check_and_add("Abcdefghijklmnop", 1000))
    assert.equal(4, cache:count())
  end)

  it("looks up without recording", function()
    assert.is_false(cache:seen("abcdefghijklmnop", 1000))
    assert.equal(0, cache:count())
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1000))
    assert.is_true(cache:seen("abcdefghijklmnop", 1000))
    assert.is_true(cache:seen("abcdefghijklmnop", 1119))
    assert.is_false(cache:seen("abcdefghijklmnop", 1120))
  end)

  it("uses the wall clock without now", function()
    local before = core.time()
    assert.is_true(cache:check_and_add("wallclock-nonce-000001"))
    assert.is_true(cache:seen("wallclock-nonce-000001"))
    assert.is_true(cache:seen("wallclock-nonce-000001", before + 119))
    assert.is_false(cache:seen("wallclock-nonce-000001", before + 122))
  end)

  it("accepts both length limits and every allowed character", function()
    assert.is_true(cache:check_and_add(string.rep("a", 16), 1000))
    assert.is_true(cache:check_and_add(string.rep("b", 64), 1000))
    assert.is_true(cache:check_and_add("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 1000))
    assert.is_true(cache:check_and_add("abcdefghijklmnopqrstuvwxyz", 1000))
    assert.is_true(cache:check_and_add("0123456789_-0123456789_-", 1000))
  end)

  local malformed = {
    { "", "length 0" },
    { string.rep("a", 15), "length 15" },
    { string.rep("a", 65), "length 65" },
    { "abcdefghijklmno.", "offset 15" },
    { "abcdefgh ijklmnop", "offset 8" },
    { "abcdefgh+ijklmnop", "offset 8" },
    { "abcdefgh/ijklmnop", "offset 8" },
    { "abcdefgh=ijklmnop", "offset 8" },
    { "abcdefgh\0ijklmnop", "offset 8" },
    { "\195\169bcdefghijklmnop", "offset 0" },
  }

  for _, case in ipairs(malformed) do
    it("rejects the malformed nonce " .. string.format("%q", case[1]), function()
      local ok, err, code = cache:check_and_add(case[1], 1000)
      assert.is_nil(ok)
      assert.equal("invalid", code)
      assert.matches(case[2], err, 1, true)

      ok, err, code = cache:seen(case[1], 1000)
      assert.is_nil(ok)
      assert.equal("invalid", code)
      assert.matches(case[2], err, 1, true)

      assert.equal(0, cache:count())
    end)
  end

  it("raises on a non-string nonce", function()
    assert.has_error(function() cache:check_and_add(1234567890123456, 1000) end)
    assert.has_error(function() cache:check_and_add(nil, 1000) end)
    assert.has_error(function() cache:seen({}, 1000) end)
  end)

  it("raises on a bad now", function()
    assert.has_error(function() cache:check_and_add("abcdefghijklmnop", -1) end)
    assert.has_error(function() cache:check_and_add("abcdefghijklmnop", 0 / 0) end)
    assert.has_error(function() cache:check_and_add("abcdefghijklmnop", 2 ^ 32) end)
    assert.has_error(function() cache:check_and_add("abcdefghijklmnop", "x") end)
  end)

  it("sweeps expired entries", function()
    for i = 1, 10 do
      assert.is_true(cache:check_and_add(make_nonce(i), 1000))
    end
    for i = 11, 15 do
      assert.is_true(cache:check_and_add(make_nonce(i), 1050))
    end

    assert.equal(0, cache:sweep(1119))
    assert.equal(10, cache:sweep(1120))
    assert.equal(5, cache:count())
    assert.is_true(cache:seen(make_nonce(11), 1120))
    assert.is_false(cache:seen(make_nonce(1), 1120))
    assert.equal(5, cache:sweep(1170))
    assert.equal(0, cache:count())
  end)

  it("raises after close", function()
    cache:close()
    assert.has_error(function() cache:check_and_add("abcdefghijklmnop", 1000) end)
    assert.has_error(function() cache:count() end)
    -- A second close is harmless, and after_each closes once more.
    cache:close()
  end)
end)


describe("nonce.new", function()
  it("defaults to a 120 s ttl and 16 MiB", function()
    local cache = nonce.new()
    assert.is_true(cache:bytes() <= 16 * 1024 * 1024)
    assert.is_true(cache:bytes() > 15 * 1024 * 1024)
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1000))
    assert.is_false(cache:check_and_add("abcdefghijklmnop", 1119))
    assert.is_true(cache:check_and_add("abcdefghijklmnop", 1120))
    cache:close()
  end)

  it("sizes the table from max_bytes", function()
    local small = nonce.new({ max_bytes = 64 * 1024 })
    local large = nonce.new({ max_bytes = 1024 * 1024 })
    assert.is_true(small:bytes() <= 64 * 1024)
    assert.is_true(large:bytes() <= 1024 * 1024)
    assert.is_true(large:capacity() > 15 * small:capacity())
    -- A KiB is 64 slots of 16 bytes, used up to 3/4: 48 entries, less
    -- the header's share.
    assert.is_true(small:capacity() >= 64 * 48 * 0.99)
    assert.is_true(small:capacity() <= 64 * 48)
    small:close()
    large:close()
  end)

  it("raises on bad options", function()
    assert.has_error(function() nonce.new({ ttl = 0 }) end)
    assert.has_error(function() nonce.new({ ttl = -5 }) end)
    assert.has_error(function() nonce.new({ ttl = 86401 }) end)
    assert.has_error(function() nonce.new({ ttl = "120" }) end)
    assert.has_error(function() nonce.new({ max_bytes = 100 }) end)
    assert.has_error(function() nonce.new({ max_bytes = 1.5 * 1024 * 1024 + 0.5 }) end)
    assert.has_error(function() nonce.new({ max_bytes = 2 ^ 33 }) end)
    assert.has_error(function() nonce.new({ max_byte = 4096 }) end)
    assert.has_error(function() nonce.new("ttl=120") end)
  end)
end)


describe("nonce cache memory bound", function()
  local max_bytes = 32 * 1024
  local cache, inserted

  before_each(function()
    cache = nonce.new({ ttl = 120, max_bytes = max_bytes })
    inserted = {}

    local i = 0
    while true do
      i = i + 1
      assert.is_true(i <= 100000, "the cache never reported full")

      local name = make_nonce(i)
      local ok, err, code = cache:check_and_add(name, 1000 + i / 100000)
      assert.is_true(cache:bytes() <= max_bytes)
      if ok == nil then
        assert.equal("full", code)
        assert.matches("full", err, 1, true)
        break
      end
      assert.is_true(ok)
      inserted[#inserted + 1] = name
    end
  end)

  after_each(function()
    cache:close()
  end)

  it("fills to capacity, then reports full", function()
    assert.equal(cache:capacity(), #inserted)
    assert.equal(cache:capacity(), cache:count())
    assert.is_true(cache:bytes() <= max_bytes)

    local ok, _, code = cache:check_and_add("another-fresh-nonce-0001", 1001)
    assert.is_nil(ok)
    assert.equal("full", code)
  end)

  it("evicts no live entry", function()
    for _, name in ipairs(inserted) do
      local ok, reason = cache:check_and_add(name, 1100)
      assert.is_false(ok)
      assert.equal("replayed", reason)
    end
    assert.equal(cache:capacity(), cache:count())
  end)

  it("reports full again after a sweep finds nothing", function()
    assert.equal(0, cache:sweep(1119))
    local ok, _, code = cache:check_and_add("another-fresh-nonce-0002", 1119.5)
    assert.is_nil(ok)
    assert.equal("full", code)
  end)

  it("reclaims expired entries once time passes", function()
    -- Every entry expires at 1121 (recorded at 1000.x, rounded up).
    for i = 1, #inserted do
      local name = string.format("later-%018d", i)
      assert.is_true(cache:check_and_add(name, 1121), "insert " .. i .. " failed")
      assert.is_true(cache:bytes() <= max_bytes)
    end

    -- The old entries are gone, the new ones are all live.
    for _, name in ipairs(inserted) do
      assert.is_false(cache:seen(name, 1121))
    end
    for i = 1, #inserted do
      assert.is_true(cache:seen(string.format("later-%018d", i), 1121))
    end

    local ok, _, code = cache:check_and_add("another-fresh-nonce-0003", 1121)
    assert.is_nil(ok)
    assert.equal("full", code)
  end)

  it("still reports replays when full", function()
    local ok, reason = cache:check_and_add(inserted[1], 1001)
    assert.is_false(ok)
    assert.equal("replayed", reason)
  end)
end)


describe("nonce cache against a reference model", function()
  -- Random inserts, lookups and sweeps with time moving forward, checked
  -- against a plain Lua table. Entries expire, get reclaimed and move
  -- inside the table many times over, and the load reaches the bound.
  it("agrees on every operation", function()
    local ttl = 5
    local cache = nonce.new({ ttl = ttl, max_bytes = 4096 })
    local capacity = cache:capacity()
    local model = {}  -- nonce -> expiry in whole seconds
    local now = 1000
    local fulls = 0

    math.randomseed(20240601)

    local function live_count()
      local n = 0
      for _, expires in pairs(model) do
        if expires > now then
          n = n + 1
        end
      end
      return n
    end

    for step = 1, 30000 do
      -- About 80 inserts a second against a 5 s ttl keeps more than the
      -- capacity live at times, so both outcomes occur.
      now = now + math.random() * 0.02
      local name = make_nonce(math.random(1, capacity * 3))
      local action = math.random()
      local live = model[name] ~= nil and model[name] > now

      if action < 0.8 then
        local ok, reason, code = cache:check_and_add(name, now)
        if live then
          assert.is_false(ok, "step " .. step)
          assert.equal("replayed", reason)
        elseif live_count() >= capacity then
          assert.is_nil(ok, "step " .. step)
          assert.equal("full", code)
          fulls = fulls + 1
        else
          assert.is_true(ok, "step " .. step)
          model[name] = math.ceil(now + ttl)
        end

      elseif action < 0.99 then
        assert.equal(live, cache:seen(name, now), "step " .. step)

      else
        cache:sweep(now)
        assert.equal(live_count(), cache:count(), "step " .. step)
      end

      assert.is_true(cache:count() <= capacity)
    end

    -- The run must have reached the bound, or it tested too little.
    assert.is_true(fulls > 0)
    assert.is_true(fulls < 30000 * 0.5)
    cache:close()
  end)
end)
