-- Measures core.nonce: inserts, lookups and replays per second, and bytes
-- per entry. Each phase stops after its time budget, so a run takes at most
-- about 15 seconds of CPU time (under 2 s on a 2-core Xeon VM at 16 MiB).
--
--   luajit tools/bench/nonce_bench.lua [build-dir] [max-bytes]
--
-- build-dir defaults to "build"; the module is loaded from
-- build-dir/lua/justavps/core.so. max-bytes defaults to 16 MiB.
local build_dir = arg[1] or "build"
package.cpath = build_dir .. "/lua/?.so;" .. package.cpath

local core = require("justavps.core")

local max_bytes = tonumber(arg[2]) or 16 * 1024 * 1024
local ttl = 120
local phase_seconds = 1.5
local nonce_length = 32

local clock = os.clock


-- Runs fn(i) for i = 1, count or until budget seconds of CPU time pass,
-- checking the clock every 1024 calls. Returns calls made and seconds.
local function timed(count, budget, fn)
  local start = clock()
  local i = 0
  local elapsed = 0

  while i < count do
    local stop = math.min(count, i + 1024)
    for j = i + 1, stop do
      fn(j)
    end
    i = stop

    elapsed = clock() - start
    if elapsed >= budget then
      break
    end
  end

  return i, elapsed
end


local function report(name, calls, seconds)
  print(string.format("%-34s %9d calls %7.3f s %12.0f per second",
    name, calls, seconds, calls / seconds))
end


local cache = assert(core.nonce.new({ ttl = ttl, max_bytes = max_bytes }))
local capacity = cache:capacity()

-- Fill to 90% of capacity: probe chains are longest near the bound.
local target = math.floor(capacity * 0.9)
local nonces = {}
local generated = timed(target, 4, function(i)
  nonces[i] = core.crypto.random_token(nonce_length)
end)
target = generated

print(string.format("%s, max_bytes %d, ttl %d s, nonces of %d characters",
  jit and jit.version or "?", max_bytes, ttl, nonce_length))
print(string.format("bytes() %d, capacity() %d entries, %.2f bytes per entry "
  .. "at capacity", cache:bytes(), capacity, cache:bytes() / capacity))
print()

local now = 1000000

local inserted, seconds = timed(target, phase_seconds * 2, function(i)
  if cache:check_and_add(nonces[i], now) ~= true then
    error("insert " .. i .. " failed")
  end
end)
report("check_and_add, fresh (to 90%)", inserted, seconds)
print(string.format("  filled to %d entries (%.0f%% of capacity)",
  cache:count(), 100 * cache:count() / capacity))

local looked_up
looked_up, seconds = timed(inserted, phase_seconds, function(i)
  if cache:seen(nonces[i], now) ~= true then
    error("lookup " .. i .. " missed")
  end
end)
report("seen, present", looked_up, seconds)

-- Every added nonce has nonce_length characters, so one character more
-- gives a valid nonce that was never added.
local absent = {}
for i = 1, math.min(inserted, 200000) do
  absent[i] = nonces[i] .. "x"
end

looked_up, seconds = timed(#absent, phase_seconds, function(i)
  if cache:seen(absent[i], now) ~= false then
    error("lookup " .. i .. " found an absent nonce")
  end
end)
report("seen, absent", looked_up, seconds)

local replayed
replayed, seconds = timed(inserted, phase_seconds, function(i)
  if cache:check_and_add(nonces[i], now) ~= false then
    error("replay " .. i .. " was accepted")
  end
end)
report("check_and_add, replayed", replayed, seconds)

-- Steady state: the clock advances so that about half of capacity is live
-- and expired entries are reclaimed while inserting.
cache:close()
cache = assert(core.nonce.new({ ttl = ttl, max_bytes = max_bytes }))
local step = ttl / (capacity / 2)
local steady
steady, seconds = timed(inserted, phase_seconds * 2, function(i)
  if cache:check_and_add(nonces[i], now + i * step) ~= true then
    error("steady insert " .. i .. " failed")
  end
end)
report("check_and_add, steady with expiry", steady, seconds)
local stored = cache:count()
print(string.format("  %d entries stored at the end, %d of them expired",
  stored, cache:sweep(now + steady * step)))

print()
print(string.format("bytes per entry: %.2f at capacity (16-byte slots, "
  .. "at most 3/4 used), %.2f per entry at 90%% fill",
  cache:bytes() / capacity, cache:bytes() / math.max(1, inserted)))
cache:close()
