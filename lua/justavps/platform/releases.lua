-- The data layer of daemon releases: create, list, and the update offer a
-- heartbeat reply carries. Functions return their result or nil, message,
-- code as justavps.db.db does.
local core = require("justavps.core")
local db = require("justavps.db.db")
local json = require("justavps.json")
local log = require("justavps.log")
local rollout = require("policies.rollout")
local state = require("justavps.platform.state")

local type = type
local pcall = pcall
local ipairs = ipairs
local smatch = string.match

local _M = {}

-- Releases a listing returns, newest first.
_M.MAX_LIST = 100

-- Newest releases the offer looks through for one that includes a
-- machine. A machine outside all of them gets no offer.
_M.OFFER_WINDOW = 20

-- Seconds the offer's release list stays cached when the platform config
-- sets none (specs that load this module without a platform).
local DEFAULT_CACHE_TTL = 5

-- The newest OFFER_WINDOW releases as the offer last read them. rows is
-- nil when nothing is cached. generation grows with every invalidation,
-- so a read that started before a publish is not cached after it.
-- loading is the list of waiters of heartbeats that wait for a read in
-- flight, or nil when no read is in flight.
local offer_cache = { rows = nil, expires = 0, generation = 0,
  loading = nil }

-- The release version form, the same as the CHECK of releases.version:
-- MAJOR.MINOR.PATCH with an optional -pre-release or +build suffix.
local VERSION_CORE = "^%d+%.%d+%.%d+"
local VERSION_SUFFIX = "^[-+][%w.+-]+$"

local COLUMNS = "id, version, url, sha256, rollout::text AS rollout, "
  .. "created_by, to_char(created_at AT TIME ZONE 'UTC', "
  .. "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at"


-- Returns true when version is MAJOR.MINOR.PATCH[-pre|+build].
function _M.is_version(version)
  if type(version) ~= "string" or #version > 100 then
    return false
  end
  local core_part = smatch(version, VERSION_CORE)
  if not core_part then
    return false
  end
  local rest = version:sub(#core_part + 1)
  return rest == "" or smatch(rest, VERSION_SUFFIX) ~= nil
end


local function decode_row(row)
  local decoded = json.decode(row.rollout)
  row.rollout = type(decoded) == "table" and decoded or {}
  if row.created_by == db.null then
    row.created_by = nil
  end
  return row
end


-- Returns the API form of a release row.
function _M.public(row)
  return {
    id = row.id,
    version = row.version,
    url = row.url,
    sha256 = row.sha256,
    rollout = row.rollout,
    created_at = row.created_at,
  }
end


-- Inserts a release. fields: version, url, sha256 (lowercase hex),
-- rollout (a table), created_by (a user id or nil). Returns the row, or
-- nil, message, code where a taken version has code
-- db.sqlstate.unique_violation.
function _M.create(fields)
  local row, err, code = db.one(
    "INSERT INTO releases (version, url, sha256, rollout, created_by) "
      .. "VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING " .. COLUMNS,
    { fields.version, fields.url, fields.sha256, json.encode(fields.rollout),
      fields.created_by, n = 5 })
  if not row then
    return nil, err, code
  end
  _M.invalidate_cache()
  return decode_row(row)
end


-- Empties the release list cache of the update offer, so the next
-- heartbeat reads the list again. A publish in this process calls it.
-- NOTE: another platform process offers a new release only after its
-- cached list expires (heartbeat.release_cache_ttl).
function _M.invalidate_cache()
  offer_cache.rows = nil
  offer_cache.expires = 0
  offer_cache.generation = offer_cache.generation + 1
end


local function cache_ttl()
  local conf = state.conf
  return conf and conf.heartbeat.release_cache_ttl or DEFAULT_CACHE_TTL
end


-- Returns the newest OFFER_WINDOW releases from the cache, reading them
-- when the cache is empty or expired. Heartbeats that miss while a read
-- is in flight wait for that read instead of sending their own.
local function offer_releases()
  local ttl = cache_ttl()
  if ttl <= 0 then
    return _M.list(_M.OFFER_WINDOW)
  end
  local now = core.now()
  if offer_cache.rows and now < offer_cache.expires then
    return offer_cache.rows
  end

  if offer_cache.loading then
    local waiter = core.waiter()
    local waiters = offer_cache.loading
    waiters[#waiters + 1] = waiter
    local rows, err, code = waiter:wait()
    return rows, err, code
  end

  offer_cache.loading = {}
  local generation = offer_cache.generation
  local ok, rows, err, code = pcall(_M.list, _M.OFFER_WINDOW)
  if not ok then
    rows, err, code = nil, rows, "internal"
  end
  local waiters = offer_cache.loading
  offer_cache.loading = nil
  if rows and generation == offer_cache.generation then
    offer_cache.rows = rows
    offer_cache.expires = now + ttl
  end
  for i = 1, #waiters do
    waiters[i]:wake(rows, err, code)
  end
  return rows, err, code
end


-- Returns at most limit releases, newest first.
function _M.list(limit)
  local rows, err, code = db.rows(
    "SELECT " .. COLUMNS .. " FROM releases "
      .. "ORDER BY created_at DESC, id DESC LIMIT $1", { limit })
  if not rows then
    return nil, err, code
  end
  for _, row in ipairs(rows) do
    decode_row(row)
  end
  return rows
end


-- Returns the update offer for a machine that runs version (nil when the
-- daemon did not report one): { version, url, sha256 } of the newest
-- release whose rollout includes the machine, or nil when there is none
-- or the machine runs that release already. Only the newest included
-- release is a candidate, so a machine that runs it is not offered an
-- older one. A database failure is logged and gives no offer, so it
-- never fails the heartbeat. The release list comes from a cache kept
-- heartbeat.release_cache_ttl seconds.
function _M.offer(machine, version)
  local rows, err, code = offer_releases()
  if not rows then
    log.err("update offer not computed", { slug = machine.slug,
      error = err, code = code })
    return nil
  end
  for _, release in ipairs(rows) do
    if rollout.includes(release.rollout, machine, release.version) then
      if release.version == version then
        return nil
      end
      return { version = release.version, url = release.url,
        sha256 = release.sha256 }
    end
  end
  return nil
end


return _M
