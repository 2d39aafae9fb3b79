-- Fan-out of machine events to the SSE streams of this process. One
-- connection per platform process runs LISTEN machine_events. The insert
-- trigger on machine_events sends {"id","slug","stage"} when the inserting
-- transaction commits, whichever process wrote the row, so every platform
-- process sees every event. For each notification with subscribers, the
-- hub reads the whole row once and queues it to each subscriber of that
-- slug.
--
--   local sub = events_hub.get():subscribe(slug)
--   local item = sub:next(15)   -- an event, "resync", or nil, "timeout"
--   sub:close()
--
-- A subscriber receives "resync" whenever events may have been missed: the
-- LISTEN connection was (re)established, the row of a notification could
-- not be read, or its queue overflowed. It then reads what it missed from
-- the database, so a stream never has a gap.
--
-- The hub of the running process lives in justavps.platform.state, which
-- a reload keeps, so a reload neither opens a second LISTEN connection nor
-- drops the streams. NOTE: a reload therefore does not change the code of
-- a hub that is already running; a restart does.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local state = require("justavps.platform.state")

local pg = core.pg

local type = type
local next = next
local pairs = pairs
local error = error
local pcall = pcall
local require = require
local setmetatable = setmetatable
local tremove = table.remove
local min = math.min

local _M = {}

_M.CHANNEL = "machine_events"
_M.RESYNC = "resync"

-- Items queued for one subscriber before the queue is replaced by one
-- "resync", so a stream that cannot keep up costs bounded memory.
_M.QUEUE_MAX = 256
-- Seconds without a notification after which the connection is checked
-- with a query, so a connection that died silently is noticed.
local IDLE_CHECK = 60
-- Reconnect delays in seconds, doubling from the first to the last.
local RETRY_FIRST = 0.1
local RETRY_MAX = 5

local Hub = {}
Hub.__index = Hub

local Subscription = {}
Subscription.__index = Subscription


local function push(sub, item)
  if sub.closed then
    return
  end
  local queue = sub.queue
  if #queue >= _M.QUEUE_MAX then
    sub.queue = { _M.RESYNC }
  else
    queue[#queue + 1] = item
  end
  sub.waiter:wake(true)
end


-- Returns the next item within timeout seconds: an event table
-- { id, slug, stage, detail, created_at }, the string "resync", or nil,
-- "timeout", or nil, "closed" once the subscription or hub is closed.
function Subscription:next(timeout)
  local deadline = core.now() + timeout
  while true do
    if #self.queue > 0 then
      return tremove(self.queue, 1)
    end
    if self.closed then
      return nil, "closed"
    end
    local remaining = deadline - core.now()
    if remaining <= 0 then
      return nil, "timeout"
    end
    self.waiter:wait(remaining)
  end
end


-- Ends the subscription. Safe to call more than once.
function Subscription:close()
  if self.closed then
    return
  end
  self.closed = true
  local hub = self.hub
  local subs = hub.by_slug[self.slug]
  if subs then
    subs[self] = nil
    if next(subs) == nil then
      hub.by_slug[self.slug] = nil
    end
  end
  hub.count = hub.count - 1
  self.waiter:wake(false)
end


local function each_subscriber(hub, fn, slug)
  for s, subs in pairs(hub.by_slug) do
    if slug == nil or s == slug then
      for sub in pairs(subs) do
        fn(sub)
      end
    end
  end
end


local function resync_all(hub)
  each_subscriber(hub, function(sub)
    push(sub, _M.RESYNC)
  end)
end


local function deliver(hub, payload)
  local note = json.decode(payload)
  if type(note) ~= "table" or type(note.id) ~= "number"
      or type(note.slug) ~= "string" then
    log.warn("ignored a malformed machine_events notification",
      { payload = payload })
    return
  end
  if not hub.by_slug[note.slug] then
    return
  end

  local event, err, code = hub.fetch(note.id)
  -- Subscribers may have gone while the row was read.
  local subs = hub.by_slug[note.slug]
  if not subs then
    return
  end
  if not event then
    log.err("cannot read a notified machine event; streams will replay",
      { event_id = note.id, slug = note.slug, error = err, code = code })
    each_subscriber(hub, function(sub)
      push(sub, _M.RESYNC)
    end, note.slug)
    return
  end
  for sub in pairs(subs) do
    push(sub, event)
  end
end


-- Waits for notifications on conn until it fails or the hub closes.
-- Returns the error message and code.
local function pump(hub, conn)
  while not hub.closed do
    local channel, payload, code = conn:wait_notification(IDLE_CHECK)
    if channel then
      if channel == _M.CHANNEL then
        deliver(hub, payload)
      end
    elseif code == "timeout" then
      local ok, err, qcode = conn:query("SELECT 1", nil, { timeout = 10 })
      if not ok then
        return err, qcode
      end
    else
      return payload, code
    end
  end
  return "hub closed", "closed"
end


local function run(hub)
  local delay = RETRY_FIRST
  while not hub.closed do
    local conn, err, code = pg.connect(hub.conninfo,
      { timeout = hub.connect_timeout })
    if conn then
      local ok, lerr, lcode = conn:listen(_M.CHANNEL)
      if ok then
        hub.conn = conn
        delay = RETRY_FIRST
        log.info("listening for machine events", { channel = _M.CHANNEL })
        -- Events that committed before LISTEN took effect reached nobody.
        resync_all(hub)
        err, code = pump(hub, conn)
      else
        err, code = lerr, lcode
      end
      hub.conn = nil
      conn:close()
    end
    if hub.closed then
      break
    end
    log.warn("machine event listener failed; reconnecting",
      { error = err, code = code, retry_in = delay })
    core.sleep(delay)
    delay = min(delay * 2, RETRY_MAX)
  end
  hub.running = false
  each_subscriber(hub, function(sub)
    sub.waiter:wake(false)
  end)
end


local function start(hub)
  if hub.running or hub.closed then
    return
  end
  hub.running = true
  core.spawn(function()
    local ok, err = pcall(run, hub)
    if not ok then
      hub.running = false
      log.alert("machine event listener raised", { error = err })
    end
  end)
end


-- Subscribes to the events of machine slug and starts the listener on
-- first use. The first item is "resync" when the listener was not yet
-- listening, so subscribe, then read the history, then follow the queue.
function Hub:subscribe(slug)
  if self.closed then
    error("events_hub: subscribe on a closed hub", 2)
  end
  local sub = setmetatable({ hub = self, slug = slug, queue = {},
    waiter = core.waiter(), closed = false }, Subscription)
  local subs = self.by_slug[slug]
  if not subs then
    subs = {}
    self.by_slug[slug] = subs
  end
  subs[sub] = true
  self.count = self.count + 1
  start(self)
  return sub
end


-- Returns the number of open subscriptions.
function Hub:subscribers()
  return self.count
end


-- Returns true while the LISTEN connection is established.
function Hub:listening()
  return self.conn ~= nil
end


-- Stops the listener and ends every subscription.
function Hub:close()
  self.closed = true
  local conn = self.conn
  if conn then
    conn:close()
  end
  each_subscriber(self, function(sub)
    sub.closed = true
    sub.waiter:wake(false)
  end)
end


local function fetch_event(id)
  -- Looked up on each call, so a reload's data layer is used.
  return require("justavps.platform.machines").event(id)
end


-- Creates a hub. opts: conninfo (libpq connection string or nil for the
-- PG* environment variables), connect_timeout (seconds, default 10),
-- fetch (function(id) returning the event row, default the data layer's
-- machines.event).
function _M.new(opts)
  opts = opts or {}
  return setmetatable({
    conninfo = opts.conninfo,
    connect_timeout = opts.connect_timeout or 10,
    fetch = opts.fetch or fetch_event,
    by_slug = {},
    count = 0,
    running = false,
    closed = false,
    conn = nil,
  }, Hub)
end


-- Returns this process's hub, created on first use from the platform's
-- database config.
function _M.get()
  local hub = state.events_hub
  if not hub or hub.closed then
    local database = state.conf and state.conf.database or {}
    hub = _M.new({ conninfo = database.url,
      connect_timeout = database.connect_timeout })
    state.events_hub = hub
  end
  return hub
end


return _M
