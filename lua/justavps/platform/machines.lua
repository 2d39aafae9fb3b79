-- The data layer of machines and what hangs off them: the machine rows,
-- their stage history (machine_events), metrics, share links
-- (proxy_tokens) and machine tickets. Every SQL statement of the machines,
-- events and access routes is here. Functions return their result or
-- nil, message, code as justavps.db.db does, plus "not_found".
--
-- Times leave the database as RFC 3339 text in UTC with microseconds
-- (2026-01-02T03:04:05.123456Z), the form API clients get and the form
-- list cursors carry back in.
local core = require("justavps.core")
local db = require("justavps.db.db")
local json = require("justavps.json")
local stages = require("justavps.provision.stages")
local state = require("justavps.platform.state")

local crypto = core.crypto

local type = type
local tostring = tostring
local byte = string.byte
local format = string.format
local ssub = string.sub
local slower = string.lower
local sgsub = string.gsub
local smatch = string.match
local concat = table.concat

local _M = {}

-- Bounds of list sizes, so no request reads a whole table.
_M.MAX_MACHINES_PAGE = 200
_M.DEFAULT_MACHINES_PAGE = 50
_M.MAX_EVENTS_PAGE = 500
_M.MAX_METRICS = 1000
_M.DEFAULT_METRICS = 100
_M.MAX_PROXY_TOKENS = 200

-- Random characters after the name part of a slug: 8 characters of a
-- 32-letter alphabet, 40 bits.
_M.SLUG_SUFFIX_LENGTH = 8
local SLUG_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
-- Characters of the name part, so a slug stays within 40 characters.
local SLUG_NAME_MAX = 24
-- New slugs tried when the random one is taken.
local SLUG_ATTEMPTS = 3

-- Characters of a machine token.
_M.TOKEN_LENGTH = 48

local UUID_PATTERN = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-"
  .. "%x%x%x%x%x%x%x%x%x%x%x%x$"
local TIME_PATTERN = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d+Z$"


-- SQL text that formats a timestamptz column as RFC 3339 in UTC. The
-- argument is always a constant column name, never a value.
local function iso(column, alias)
  return "to_char(" .. column .. " AT TIME ZONE 'UTC', "
    .. "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS " .. (alias or column)
end

local MACHINE_COLUMNS = concat({
  "id", "account_id", "slug", "name", "provider", "region", "server_type",
  "stage::text AS stage", "host(ip) AS ip", "version",
  iso("last_seen_at"), iso("created_at"), iso("updated_at"),
}, ", ")

local EVENT_COLUMNS = "id, stage::text AS stage, detail::text AS detail, "
  .. iso("created_at")


-- Returns true when s is a UUID in its text form.
function _M.is_uuid(s)
  return type(s) == "string" and smatch(s, UUID_PATTERN) ~= nil
end


-- Returns a new random (version 4) UUID in text form.
function _M.new_uuid()
  local b = { byte(crypto.random_bytes(16), 1, 16) }
  b[7] = b[7] % 16 + 0x40
  b[9] = b[9] % 64 + 0x80
  local hex = {}
  for i = 1, 16 do
    hex[i] = format("%02x", b[i])
  end
  return concat(hex, "", 1, 4) .. "-" .. concat(hex, "", 5, 6) .. "-"
    .. concat(hex, "", 7, 8) .. "-" .. concat(hex, "", 9, 10) .. "-"
    .. concat(hex, "", 11, 16)
end


-- Returns a new slug for a machine called name: the name lowercased, runs
-- of other characters than [a-z0-9] turned into one "-", cut to
-- SLUG_NAME_MAX characters, then "-" and SLUG_SUFFIX_LENGTH random
-- characters. A name without a usable character gives "m-<suffix>".
function _M.new_slug(name)
  local base = sgsub(slower(tostring(name or "")), "[^a-z0-9]+", "-")
  base = ssub(base, 1, SLUG_NAME_MAX)
  base = sgsub(sgsub(base, "^%-+", ""), "%-+$", "")
  if base == "" then
    base = "m"
  end

  -- 256 is a multiple of 32, so byte % 32 picks every letter equally.
  local random = crypto.random_bytes(_M.SLUG_SUFFIX_LENGTH)
  local suffix = {}
  for i = 1, _M.SLUG_SUFFIX_LENGTH do
    local n = byte(random, i) % 32 + 1
    suffix[i] = ssub(SLUG_ALPHABET, n, n)
  end
  return base .. "-" .. concat(suffix)
end


-- Returns the API form of a machine row: no id, account id or token.
function _M.public(row)
  return {
    slug = row.slug,
    name = row.name,
    provider = row.provider,
    region = row.region,
    server_type = row.server_type,
    stage = row.stage,
    ip = row.ip,
    version = row.version,
    last_seen_at = row.last_seen_at,
    created_at = row.created_at,
    updated_at = row.updated_at,
  }
end


local function insert_machine(tx, account_id, fields, slug, token)
  local machine, err, code = tx:one(
    "INSERT INTO machines (slug, account_id, name, provider, region, "
      .. "server_type, token) VALUES ($1, $2, $3, $4, $5, $6, $7) "
      .. "RETURNING " .. MACHINE_COLUMNS,
    { slug, account_id, fields.name, fields.provider, fields.region,
      fields.server_type, token })
  if not machine then
    return nil, err, code
  end

  local _, eerr, ecode = tx:query(
    "INSERT INTO machine_events (machine_id, stage, detail) "
      .. "VALUES ($1, 'server_creating', $2::jsonb)",
    { machine.id, json.encode({ source = "api" }) })
  if ecode then
    return nil, eerr, ecode
  end

  local _, jerr, jcode = tx:query(
    "INSERT INTO jobs (kind, machine_id, payload) "
      .. "VALUES ('provision', $1, $2::jsonb)",
    { machine.id, json.encode({ requested_by = fields.requested_by }) })
  if jcode then
    return nil, jerr, jcode
  end
  return machine
end


-- Creates a machine for account_id in one transaction: the machines row
-- (stage server_creating, a new slug and machine token), its first
-- machine_events row and a queued "provision" job. fields: name,
-- provider, region, server_type, requested_by (a user id or nil).
-- Returns the machine row (with id, without the token).
function _M.create(account_id, fields)
  local token, terr, tcode = crypto.random_token(_M.TOKEN_LENGTH)
  if not token then
    return nil, terr, tcode
  end

  local err, code
  for _ = 1, SLUG_ATTEMPTS do
    local machine
    machine, err, code = db.tx(insert_machine, account_id, fields,
      _M.new_slug(fields.name), token)
    if machine then
      return machine
    end
    -- Only the slug is unique among the new rows, so a unique violation
    -- means the random slug was taken: try another one.
    if code ~= db.sqlstate.unique_violation then
      return nil, err, code
    end
  end
  return nil, err, code
end


-- Encodes the (created_at, id) pair of the last row of a page as an
-- opaque cursor.
local function encode_cursor(row)
  return crypto.base64url_encode(row.created_at .. "|" .. row.id)
end


-- Decodes a cursor from encode_cursor. Returns created_at, id, or nil.
local function decode_cursor(cursor)
  if type(cursor) ~= "string" or #cursor > 200 then
    return nil
  end
  local text = crypto.base64url_decode(cursor)
  if not text then
    return nil
  end
  local created_at, id = smatch(text, "^([^|]+)|([^|]+)$")
  if not created_at or not smatch(created_at, TIME_PATTERN)
      or not _M.is_uuid(id) then
    return nil
  end
  return created_at, id
end


-- Lists an account's live machines, newest first, with one query.
-- opts.limit (default DEFAULT_MACHINES_PAGE, at most MAX_MACHINES_PAGE),
-- opts.cursor (next_cursor of the previous page). Returns
-- { items = [...], next_cursor = string or nil }, or nil, message, code
-- where code "invalid_cursor" is for a cursor that did not come from
-- here.
function _M.list(account_id, opts)
  opts = opts or {}
  local limit = opts.limit or _M.DEFAULT_MACHINES_PAGE
  if limit > _M.MAX_MACHINES_PAGE then
    limit = _M.MAX_MACHINES_PAGE
  end

  -- One row more than the page shows whether another page follows.
  local rows, err, code
  if opts.cursor then
    local created_at, id = decode_cursor(opts.cursor)
    if not created_at then
      return nil, "cursor is not one this API returned", "invalid_cursor"
    end
    rows, err, code = db.rows(
      "SELECT " .. MACHINE_COLUMNS .. " FROM machines "
        .. "WHERE account_id = $1 AND deleted_at IS NULL "
        .. "AND (created_at, id) < ($2::timestamptz, $3::uuid) "
        .. "ORDER BY created_at DESC, id DESC LIMIT $4",
      { account_id, created_at, id, limit + 1 })
  else
    rows, err, code = db.rows(
      "SELECT " .. MACHINE_COLUMNS .. " FROM machines "
        .. "WHERE account_id = $1 AND deleted_at IS NULL "
        .. "ORDER BY created_at DESC, id DESC LIMIT $2",
      { account_id, limit + 1 })
  end
  if not rows then
    return nil, err, code
  end

  local items = json.array()
  local next_cursor
  for i = 1, #rows do
    if i > limit then
      next_cursor = encode_cursor(rows[limit])
      break
    end
    items[i] = _M.public(rows[i])
  end
  return { items = items, next_cursor = next_cursor }
end


-- Returns the live machine slug of account_id (the row with id and
-- ports as JSON text), or nil, message, "not_found" when there is none
-- or it belongs to another account.
function _M.find(account_id, slug)
  return db.one(
    "SELECT " .. MACHINE_COLUMNS .. ", ports::text AS ports FROM machines "
      .. "WHERE slug = $1 AND account_id = $2 AND deleted_at IS NULL",
    { slug, account_id })
end


local function delete_in(tx, account_id, slug, requested_by)
  local machine, err, code = tx:one(
    "SELECT " .. MACHINE_COLUMNS .. " FROM machines WHERE slug = $1 "
      .. "AND account_id = $2 AND deleted_at IS NULL FOR UPDATE",
    { slug, account_id })
  if not machine then
    return nil, err, code
  end
  -- A repeated DELETE keeps the stage; the statement below still queues
  -- the delete job again when it died, so a retry can finish a delete.
  if machine.stage ~= "deleting" then
    local detail = { source = "api", requested_by = requested_by }
    local event, terr, tcode = stages.transition(tx, machine, "deleting",
      detail)
    if not event then
      return nil, terr, tcode
    end
  end

  -- A delete job left from an earlier attempt that failed is queued
  -- again, and one that is queued or running stays as it is.
  local _, jerr, jcode = tx:query(
    "INSERT INTO jobs (kind, machine_id, payload) "
      .. "VALUES ('delete', $1, $2::jsonb) "
      .. "ON CONFLICT (machine_id, kind) DO UPDATE SET state = 'queued', "
      .. "run_at = now(), attempts = 0, last_error = NULL, "
      .. "locked_by = NULL, locked_until = NULL, payload = EXCLUDED.payload "
      .. "WHERE jobs.state IN ('done', 'dead')",
    { machine.id, json.encode({ requested_by = requested_by }) })
  if jcode then
    return nil, jerr, jcode
  end

  machine.stage = "deleting"
  return machine
end


-- Starts deleting the machine slug of account_id in one transaction:
-- moves it to stage deleting (see justavps.provision.stages) and queues a
-- "delete" job. Returns the machine row; "not_found", or
-- "invalid_transition" from stages.transition.
function _M.request_delete(account_id, slug, requested_by)
  local machine, err, code = db.tx(delete_in, account_id, slug,
    requested_by)
  if machine then
    _M.forget_heartbeat_identity(slug)
  end
  return machine, err, code
end


-- The machines that sent heartbeats lately, by slug: { id, slug, stage,
-- token, expires }. A heartbeat needs the token to check its signature
-- before it writes anything, and looking it up was one statement of
-- every heartbeat. The entries are safe to keep for minutes:
-- - the heartbeat writes update only rows with deleted_at NULL, so a
--   machine deleted meanwhile is rejected there and dropped from here;
-- - the stage is a hint that picks the write path, and a stage change
--   reads the stage again under a row lock;
-- - a signature that fails with a cached token is checked again with
--   the token read from the database.
local heartbeat_identities = {}
local heartbeat_identity_count = 0

-- Defaults for specs that load this module without a platform config.
local DEFAULT_IDENTITY_TTL = 300
local DEFAULT_IDENTITY_MAX = 100000


local function identity_limits()
  local conf = state.conf
  if not conf then
    return DEFAULT_IDENTITY_TTL, DEFAULT_IDENTITY_MAX
  end
  return conf.heartbeat.machine_cache_ttl, conf.heartbeat.machine_cache_size
end


local function copy_identity(entry, cached)
  return { id = entry.id, slug = entry.slug, stage = entry.stage,
    token = entry.token, cached = cached }
end


-- Returns { id, slug, stage, token, cached } of the live machine slug
-- for checking its heartbeat: from the cache (cached is true), or read
-- from the database when the cache has no fresh entry or opts.fresh is
-- set. The caller owns the returned table. Failures are nil, message,
-- code as from db.one, with "not_found" for no live machine.
-- NOTE: after a token is changed in the database by hand, the old token
-- is accepted until its entry expires (heartbeat.machine_cache_ttl). The
-- new one works at once, because auth_machine checks a failed signature
-- again with opts.fresh.
function _M.heartbeat_identity(slug, opts)
  local ttl, max_entries = identity_limits()
  local now = core.now()
  local entry = heartbeat_identities[slug]
  local fresh = opts and opts.fresh
  if entry and not fresh and now < entry.expires then
    return copy_identity(entry, true)
  end

  local row, err, code = db.one(
    "SELECT id, slug, stage::text AS stage, token FROM machines "
      .. "WHERE slug = $1 AND deleted_at IS NULL", { slug })
  if not row then
    if code == "not_found" then
      _M.forget_heartbeat_identity(slug)
    end
    return nil, err, code
  end
  if ttl > 0 then
    if not heartbeat_identities[slug] then
      if heartbeat_identity_count >= max_entries then
        heartbeat_identities = {}
        heartbeat_identity_count = 0
      end
      heartbeat_identity_count = heartbeat_identity_count + 1
    end
    heartbeat_identities[slug] = { id = row.id, slug = row.slug,
      stage = row.stage, token = row.token, expires = now + ttl }
  end
  return copy_identity(row, false)
end


-- Records stage as the cached stage of slug, after a heartbeat read or
-- changed it under a row lock.
function _M.note_heartbeat_stage(slug, stage)
  local entry = heartbeat_identities[slug]
  if entry then
    entry.stage = stage
  end
end


-- Drops slug from the heartbeat identity cache.
function _M.forget_heartbeat_identity(slug)
  if heartbeat_identities[slug] then
    heartbeat_identities[slug] = nil
    heartbeat_identity_count = heartbeat_identity_count - 1
  end
end


local function decode_detail(row)
  local detail = json.decode(row.detail)
  row.detail = type(detail) == "table" and detail or {}
  return row
end


-- Returns machine_id's events with an id above after_id (0 for all), in
-- id order, at most limit (capped at MAX_EVENTS_PAGE), each
-- { id, stage, detail, created_at }.
function _M.events(machine_id, after_id, limit)
  if not limit or limit > _M.MAX_EVENTS_PAGE then
    limit = _M.MAX_EVENTS_PAGE
  end
  local rows, err, code = db.rows(
    "SELECT " .. EVENT_COLUMNS .. " FROM machine_events "
      .. "WHERE machine_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    { machine_id, after_id or 0, limit })
  if not rows then
    return nil, err, code
  end
  for i = 1, #rows do
    decode_detail(rows[i])
  end
  return rows
end


-- Returns the event with this id and its machine's slug, as
-- { id, slug, stage, detail, created_at }, for the event hub.
function _M.event(id)
  local row, err, code = db.one(
    "SELECT e.id, m.slug, e.stage::text AS stage, e.detail::text AS detail, "
      .. iso("e.created_at", "created_at") .. " FROM machine_events e "
      .. "JOIN machines m ON m.id = e.machine_id WHERE e.id = $1",
    { id })
  if not row then
    return nil, err, code
  end
  return decode_detail(row)
end


local METRIC_COLUMNS = iso("at") .. ", at AS at_order, cpu_percent, load_1, "
  .. "load_5, load_15, mem_used_bytes, mem_total_bytes, disk_used_bytes, "
  .. "disk_total_bytes, net::text AS net"


-- Returns machine_id's metrics in time order, at most opts.limit
-- (default DEFAULT_METRICS, capped at MAX_METRICS). With opts.since
-- (Unix seconds as a number, or an RFC 3339 string), the first rows
-- after that time; without it, the latest rows. Code "22007" or
-- "22008" for a since string PostgreSQL cannot read as a time.
function _M.metrics(machine_id, opts)
  opts = opts or {}
  local limit = opts.limit or _M.DEFAULT_METRICS
  if limit > _M.MAX_METRICS then
    limit = _M.MAX_METRICS
  end

  local rows, err, code
  local since = opts.since
  if since ~= nil then
    local seconds = type(since) == "number" and since or nil
    local text = type(since) == "string" and since or nil
    rows, err, code = db.rows(
      "SELECT " .. METRIC_COLUMNS .. " FROM machine_metrics "
        .. "WHERE machine_id = $1 AND at > COALESCE("
        .. "to_timestamp($2::float8), $3::timestamptz) "
        .. "ORDER BY at LIMIT $4",
      { machine_id, seconds, text, limit, n = 4 })
  else
    rows, err, code = db.rows(
      "SELECT * FROM (SELECT " .. METRIC_COLUMNS .. " FROM machine_metrics "
        .. "WHERE machine_id = $1 ORDER BY at DESC LIMIT $2) latest "
        .. "ORDER BY at_order",
      { machine_id, limit })
  end
  if not rows then
    return nil, err, code
  end

  for i = 1, #rows do
    local row = rows[i]
    row.at_order = nil
    local net = json.decode(row.net)
    row.net = type(net) == "table" and net or {}
  end
  return rows
end


local PROXY_TOKEN_COLUMNS = "id, port, " .. iso("expires_at") .. ", "
  .. iso("revoked_at") .. ", " .. iso("created_at") .. ", "
  .. "(revoked_at IS NULL AND expires_at > now()) AS active"


-- Stores a share link. link: id (the token's jti, a UUID), machine_id,
-- port, token_hash (hex SHA-256 of the token), expires (Unix seconds),
-- created_by (a user id or nil). Returns the stored row.
function _M.insert_proxy_token(link)
  return db.one(
    "INSERT INTO proxy_tokens (id, machine_id, port, token_hash, "
      .. "expires_at, created_by) VALUES ($1, $2, $3, $4, "
      .. "to_timestamp($5::float8), $6) RETURNING " .. PROXY_TOKEN_COLUMNS,
    { link.id, link.machine_id, link.port, link.token_hash, link.expires,
      link.created_by, n = 6 })
end


-- Returns machine_id's share links, newest first, at most
-- MAX_PROXY_TOKENS, without their tokens or hashes.
function _M.list_proxy_tokens(machine_id)
  return db.rows(
    "SELECT " .. PROXY_TOKEN_COLUMNS .. " FROM proxy_tokens "
      .. "WHERE machine_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
    { machine_id, _M.MAX_PROXY_TOKENS })
end


-- Revokes the share link id of machine_id. Revoking twice succeeds and
-- keeps the first revocation time. Returns the row, or "not_found".
function _M.revoke_proxy_token(machine_id, id)
  if not _M.is_uuid(id) then
    return nil, "no share link " .. tostring(id), "not_found"
  end
  return db.one(
    "UPDATE proxy_tokens SET revoked_at = COALESCE(revoked_at, now()) "
      .. "WHERE id = $1 AND machine_id = $2 RETURNING "
      .. PROXY_TOKEN_COLUMNS,
    { id, machine_id })
end


-- Returns true when the share link with this jti may no longer be used:
-- revoked, expired, unknown, or its machine deleted. This is the lookup
-- behind proxy_token.verify's is_revoked for the edge. Returns nil,
-- message on a failed query, which verify turns into a rejection.
function _M.is_share_token_revoked(jti)
  if not _M.is_uuid(jti) then
    return true
  end
  local row, err, code = db.one(
    "SELECT t.revoked_at IS NOT NULL OR t.expires_at <= now() "
      .. "OR m.deleted_at IS NOT NULL AS revoked FROM proxy_tokens t "
      .. "JOIN machines m ON m.id = t.machine_id WHERE t.id = $1",
    { jti })
  if not row then
    if code == "not_found" then
      return true
    end
    return nil, err
  end
  return row.revoked
end


-- Stores a machine ticket by its hash. It expires 60 s after now, the
-- table's default and maximum. Returns { expires_at }.
function _M.insert_ticket(machine_id, user_id, ticket_hash)
  return db.one(
    "INSERT INTO machine_tickets (machine_id, user_id, ticket_hash) "
      .. "VALUES ($1, $2, $3) RETURNING " .. iso("expires_at"),
    { machine_id, user_id, ticket_hash })
end


-- Spends a ticket, given its hash, for the machine slug. Any ticket that
-- is found is spent, even when it is expired or for another machine, as
-- the in-memory store of justavps.auth.ticket does. Returns
-- { machine_id, user_id }, or nil, message, code: invalid_ticket
-- (unknown or already used), ticket_expired, wrong_slug.
function _M.consume_ticket(ticket_hash, slug)
  local row, err, code = db.one(
    "WITH spent AS (UPDATE machine_tickets SET used_at = now() "
      .. "WHERE ticket_hash = $1 AND used_at IS NULL "
      .. "RETURNING machine_id, user_id, expires_at) "
      .. "SELECT s.machine_id, s.user_id, m.slug, "
      .. "s.expires_at > now() AS live, m.deleted_at IS NULL AS machine_live "
      .. "FROM spent s JOIN machines m ON m.id = s.machine_id",
    { ticket_hash })
  if not row then
    if code == "not_found" then
      return nil, "unknown or used ticket", "invalid_ticket"
    end
    return nil, err, code
  end
  if not row.live then
    return nil, "ticket expired", "ticket_expired"
  end
  if row.slug ~= slug or not row.machine_live then
    return nil, "ticket was issued for another machine", "wrong_slug"
  end
  return { machine_id = row.machine_id, user_id = row.user_id }
end


return _M
