-- Machine tickets: single-use tokens, valid for 60 seconds, that open
-- /_pty or /_toolbox on one machine for one user. The platform API issues
-- one to a logged-in dashboard, and the client passes it in the URL.
--
--   local issued = ticket.issue({ slug = "pale-fox", user_id = 42 })
--   store:add(issued)                      -- keeps the hash, not the ticket
--   -- later, from the request URL:
--   local record, message, code = store:consume(ticket.hash(t), "pale-fox")
--
-- Single use needs shared state. The store below keeps tickets in this
-- process's memory, so it works only where one process issues and
-- consumes them (the dev role). Separate processes need the database to
-- consume a ticket: one conditional UPDATE ... WHERE hash = $1 AND
-- used_at IS NULL AND expires > now() RETURNING slug, user_id.
local core = require("justavps.core")

local crypto = core.crypto
local sha256 = crypto.sha256
local hex_encode = crypto.hex_encode
local random_token = crypto.random_token

local type = type
local error = error
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable
local sfind = string.find
local huge = math.huge

local _M = {}

-- Seconds a ticket is valid, and the longest TTL issue accepts.
_M.TTL = 60
-- Characters of a ticket: 258 random bits.
_M.LENGTH = 43
-- Default bound on the tickets one store holds.
_M.MAX_ENTRIES = 10000


local function fail(message, code)
  return nil, message, code
end


local function is_slug(slug)
  return type(slug) == "string" and #slug >= 3 and #slug <= 40
    and not sfind(slug, "[^a-z0-9-]")
end


local function check_user_id(user_id, where)
  local kind = type(user_id)
  if kind ~= "string" and kind ~= "number" then
    error(where .. ": user_id must be a string or a number, got " .. kind, 3)
  end
end


-- Returns the lowercase hex SHA-256 of a ticket, the form stores keep, or
-- nil, message, "invalid_ticket" when the text is not a ticket.
function _M.hash(ticket)
  if type(ticket) ~= "string" or #ticket ~= _M.LENGTH
      or sfind(ticket, "[^A-Za-z0-9_-]") then
    return fail("ticket must be " .. _M.LENGTH
      .. " characters of [A-Za-z0-9_-]", "invalid_ticket")
  end
  return hex_encode(sha256(ticket))
end


-- Issues a ticket. opts: slug and user_id (required), ttl in seconds
-- (default and maximum TTL), now in Unix seconds (default core.time()).
-- Returns { ticket, hash, slug, user_id, expires }, or nil, message, code
-- when the random generator fails. Hand ticket to the client and keep
-- the rest.
function _M.issue(opts)
  if type(opts) ~= "table" then
    error("ticket.issue: opts must be a table, got " .. type(opts), 2)
  end
  if not is_slug(opts.slug) then
    error("ticket.issue: slug must match [a-z0-9-]{3,40}", 2)
  end
  check_user_id(opts.user_id, "ticket.issue")

  local ttl = opts.ttl or _M.TTL
  if type(ttl) ~= "number" or ttl <= 0 or ttl > _M.TTL then
    error("ticket.issue: ttl must be a number above 0 and at most "
      .. _M.TTL, 2)
  end

  local ticket, message, code = random_token(_M.LENGTH)
  if not ticket then
    return fail(message, code)
  end
  local now = opts.now or core.time()
  return {
    ticket = ticket,
    hash = hex_encode(sha256(ticket)),
    slug = opts.slug,
    user_id = opts.user_id,
    expires = now + ttl,
  }
end


local Store = {}
Store.__index = Store


-- Creates an in-memory store of issued tickets. opts.max_entries is the
-- maximum number of tickets it stores (default MAX_ENTRIES). When it is
-- full of live tickets, add fails rather than evicting one, so the caller
-- can answer 503 and the tickets already handed out keep working.
function _M.new_store(opts)
  local max_entries = opts and opts.max_entries or _M.MAX_ENTRIES
  if type(max_entries) ~= "number" or max_entries < 1
      or max_entries % 1 ~= 0 then
    error("ticket.new_store: max_entries must be a positive integer", 2)
  end
  return setmetatable({
    entries = {},
    count = 0,
    max_entries = max_entries,
    -- No entry expires before this time, so sweep can skip the scan.
    next_expiry = huge,
  }, Store)
end


-- Removes the expired tickets. Returns how many it removed. The scan is
-- skipped while no ticket can have expired yet.
function Store:sweep(now)
  now = now or core.time()
  if now < self.next_expiry then
    return 0
  end

  local removed, next_expiry = 0, huge
  for hash, record in pairs(self.entries) do
    if record.expires <= now then
      self.entries[hash] = nil
      removed = removed + 1
    elseif record.expires < next_expiry then
      next_expiry = record.expires
    end
  end
  self.count = self.count - removed
  self.next_expiry = next_expiry
  return removed
end


-- Records an issued ticket (the table from issue, or any table with hash,
-- slug, user_id and expires). Returns true, or nil, message, code:
--   store_full       max_entries live tickets are stored
--   duplicate_ticket the hash is stored already
function Store:add(issued, now)
  if type(issued) ~= "table" or type(issued.hash) ~= "string"
      or type(issued.expires) ~= "number" or not is_slug(issued.slug) then
    error("store:add: expected the table returned by ticket.issue", 2)
  end
  check_user_id(issued.user_id, "store:add")

  if self.entries[issued.hash] then
    return fail("ticket is stored already", "duplicate_ticket")
  end
  if self.count >= self.max_entries then
    self:sweep(now)
    if self.count >= self.max_entries then
      return fail("ticket store is full (" .. tostring(self.max_entries)
        .. " live tickets)", "store_full")
    end
  end

  self.entries[issued.hash] = {
    slug = issued.slug,
    user_id = issued.user_id,
    expires = issued.expires,
  }
  self.count = self.count + 1
  if issued.expires < self.next_expiry then
    self.next_expiry = issued.expires
  end
  return true
end


-- Consumes a ticket for the machine slug. Returns the record { slug,
-- user_id, expires } the first time, and nil, message, code after that
-- or on any failure. Every failure on a stored ticket removes it, so a
-- ticket presented for the wrong machine cannot be used at all. Codes:
--   invalid_ticket  unknown, or consumed already
--   ticket_expired  stored but past its expiry
--   wrong_slug      issued for another machine
function Store:consume(ticket_hash, slug, now)
  if type(ticket_hash) ~= "string" then
    error("store:consume: ticket_hash must be a string, got "
      .. type(ticket_hash), 2)
  end
  if type(slug) ~= "string" then
    error("store:consume: slug must be a string, got " .. type(slug), 2)
  end
  now = now or core.time()

  local record = self.entries[ticket_hash]
  if not record then
    return fail("ticket is unknown or used already", "invalid_ticket")
  end
  self.entries[ticket_hash] = nil
  self.count = self.count - 1

  if record.expires <= now then
    return fail("ticket expired", "ticket_expired")
  end
  if record.slug ~= slug then
    return fail("ticket was issued for another machine", "wrong_slug")
  end
  return record
end


-- Returns how many tickets the store holds, expired ones included until
-- the next sweep.
function Store:size()
  return self.count
end


return _M
