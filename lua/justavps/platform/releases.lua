-- The data layer of daemon releases: create, list, and the update offer a
-- heartbeat reply carries. Functions return their result or nil, message,
-- code as justavps.db.db does.
local db = require("justavps.db.db")
local json = require("justavps.json")
local log = require("justavps.log")
local rollout = require("policies.rollout")

local type = type
local ipairs = ipairs
local smatch = string.match

local _M = {}

-- Releases a listing returns, newest first.
_M.MAX_LIST = 100

-- Newest releases the offer looks through for one that includes a
-- machine. A machine outside all of them gets no offer.
_M.OFFER_WINDOW = 20

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
  return decode_row(row)
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
-- never fails the heartbeat.
function _M.offer(machine, version)
  local rows, err, code = _M.list(_M.OFFER_WINDOW)
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
