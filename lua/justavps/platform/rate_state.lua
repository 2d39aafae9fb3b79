-- In-memory rate-limit counters of this platform process, one entry per
-- key of policies.rate_limit. The module marks itself stable, so a reload
-- of routes and policies keeps the counters.
--
-- The counters are per process: with several platform processes behind
-- one address, each allows the full limit.
-- TODO: keep the counters in PostgreSQL or share them between processes
-- once the platform scales out.
local reload = require("justavps.reload")
local log = require("justavps.log")

local pairs = pairs
local sort = table.sort
local floor = math.floor

local _M = {}

reload.configure({ stable = { "justavps.platform.rate_state" } })

-- key -> { state = value from the policy, expires = seconds }
local entries = {}
local count = 0
local evictions = 0


-- Returns the stored policy state of key, or nil when there is none or
-- it expired at or before now.
function _M.get(key, now)
  local entry = entries[key]
  if not entry then
    return nil
  end
  if entry.expires <= now then
    entries[key] = nil
    count = count - 1
    return nil
  end
  return entry.state
end


-- Removes the entries that expired at or before now. Returns how many.
function _M.sweep(now)
  local removed = 0
  for key, entry in pairs(entries) do
    if entry.expires <= now then
      entries[key] = nil
      removed = removed + 1
    end
  end
  count = count - removed
  return removed
end


-- Removes the tenth of the entries that expire first. Those keys are the
-- closest to a fresh start anyway, so dropping them lets the fewest extra
-- attempts through.
local function evict_soonest()
  local list = {}
  for key, entry in pairs(entries) do
    list[#list + 1] = { key = key, expires = entry.expires }
  end
  sort(list, function(a, b)
    return a.expires < b.expires
  end)
  local n = floor(#list / 10) + 1
  for i = 1, n do
    entries[list[i].key] = nil
  end
  count = count - n
  evictions = evictions + 1
  log.warn("rate-limit counters full; evicted the entries that expire "
    .. "first", { evicted = n, kept = count, evictions = evictions })
end


-- Stores state for key until expires. max_entries bounds the memory: when
-- a new key finds the table full, expired entries go first, then the
-- tenth that expires soonest.
function _M.set(key, state, expires, now, max_entries)
  local entry = entries[key]
  if entry then
    entry.state = state
    entry.expires = expires
    return
  end
  if count >= max_entries then
    _M.sweep(now)
    if count >= max_entries then
      evict_soonest()
    end
  end
  entries[key] = { state = state, expires = expires }
  count = count + 1
end


-- Returns the number of entries held, expired ones included until the
-- next sweep.
function _M.size()
  return count
end


-- Removes every entry.
function _M.reset()
  entries = {}
  count = 0
end


return _M
