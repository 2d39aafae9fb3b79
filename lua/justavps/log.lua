-- Structured logging over core.log.write, with redaction and rate limiting.
--
--   log.info("listening", { port = 8080 })
--   local rlog = log.with({ request_id = id })
--   rlog.err("upstream failed", { err = err })
--
-- Levels have fixed meanings: alert for failures that should never happen,
-- err for failed requests and operations, warn for degraded but handled
-- conditions, info for starts, stops and state changes, debug for detail
-- that is off by default.
local json = require("justavps.json")

local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local lower = string.lower
local sfind = string.find
local gmatch = string.gmatch

local _M = {}

_M.REDACTED = "[redacted]"

-- Per message and level: lines written per window before the rest are
-- counted instead of written.
_M.BURST = 10
_M.WINDOW = 10
-- Keys tracked at once; past this the oldest windows are flushed early.
_M.MAX_TRACKED = 1000

local levels = {
  debug = "debug",
  info = "info",
  warn = "warn",
  err = "error",
  alert = "alert",
}

-- Field names containing one of these words anywhere are redacted.
local secret_substrings = {
  "secret", "token", "password", "passwd", "authorization", "cookie",
  "signature", "credential", "apikey",
}

-- Short words redacted only as a whole word of the name ("key",
-- "api_key", "x-api-key"), so "keepalive" or "monkey" stay readable.
local secret_words = {
  key = true,
  jwt = true,
  ticket = true,
}

-- Values that look like credentials whatever their field is called.
local secret_value_patterns = {
  "^sk_live_",
  "^[Bb]earer%s",
  "^[Bb]asic%s",
  "^v1=%x%x%x%x%x%x%x%x",
}


-- Returns true when a field with this name must not be logged.
function _M.is_secret_name(name)
  local n = lower(name)
  for _, s in ipairs(secret_substrings) do
    if sfind(n, s, 1, true) then
      return true
    end
  end
  for word in gmatch(n, "[%a%d]+") do
    if secret_words[word] then
      return true
    end
  end
  return false
end


local function is_secret_value(v)
  for _, p in ipairs(secret_value_patterns) do
    if sfind(v, p) then
      return true
    end
  end
  return false
end


local redact_table


local function redact_value(name, v)
  if type(name) == "string" and _M.is_secret_name(name) then
    return _M.REDACTED
  end
  local t = type(v)
  if t == "string" and is_secret_value(v) then
    return _M.REDACTED
  end
  if t == "table" then
    return redact_table(v, {})
  end
  return v
end


function redact_table(fields, seen)
  if seen[fields] then
    return "[cycle]"
  end
  seen[fields] = true
  local out = {}
  for k, v in pairs(fields) do
    if type(v) == "table" then
      if type(k) == "string" and _M.is_secret_name(k) then
        out[k] = _M.REDACTED
      else
        out[k] = redact_table(v, seen)
      end
    else
      out[k] = redact_value(k, v)
    end
  end
  seen[fields] = nil
  return out
end


-- Returns a copy of fields with secret-named fields and credential-looking
-- values replaced by "[redacted]", recursing into nested tables.
function _M.redact(fields)
  return redact_table(fields, {})
end


-- Nested tables reach the C writer as one JSON value.
local function flatten(fields)
  local out = {}
  for k, v in pairs(fields) do
    if type(v) == "table" then
      out[k] = json.encode(v) or tostring(v)
    elseif type(v) == "function" or type(v) == "userdata"
      or type(v) == "thread" then
      out[k] = tostring(v)
    else
      out[k] = v
    end
  end
  return out
end


local function core_writer()
  local core = require("justavps.core")
  return core.log.write, core.log.enabled, core.now
end


local Logger = {}


-- Creates a logger. opts (all optional, for tests and embedding):
--   write(level, msg, fields)  default core.log.write
--   enabled(level) -> boolean  default core.log.enabled
--   clock() -> seconds         default core.now
--   fields                     fixed fields added to every line
-- Returns a table with debug, info, warn, err, alert, with and flush.
function _M.new(opts)
  opts = opts or {}
  local write, enabled, clock = opts.write, opts.enabled, opts.clock
  if not (write and enabled and clock) then
    local w, e, c = core_writer()
    write = write or w
    enabled = enabled or e
    clock = clock or c
  end

  local shared = {
    write = write,
    enabled = enabled,
    clock = clock,
    windows = {},
    tracked = 0,
    last_sweep = nil,
  }

  return Logger.build(shared, _M.redact(opts.fields or {}))
end


local function emit(shared, level, msg, fixed, fields)
  local merged = {}
  for k, v in pairs(fixed) do
    merged[k] = v
  end
  if fields then
    for k, v in pairs(_M.redact(fields)) do
      merged[k] = v
    end
  end
  shared.write(level, msg, flatten(merged))
end


-- Writes one "repeated" line per window that dropped lines.
local function flush_window(shared, key, w)
  if w.suppressed > 0 then
    shared.write(w.level, w.msg, { suppressed = w.suppressed,
      window_s = _M.WINDOW })
  end
  shared.windows[key] = nil
  shared.tracked = shared.tracked - 1
end


local function sweep(shared, now, force)
  for key, w in pairs(shared.windows) do
    if force or now - w.start >= _M.WINDOW then
      flush_window(shared, key, w)
    end
  end
  shared.last_sweep = now
end


-- Returns true when the line may be written now.
local function admit(shared, level, msg)
  local now = shared.clock()

  if shared.last_sweep == nil or now - shared.last_sweep >= _M.WINDOW then
    sweep(shared, now, false)
  end

  local key = level .. "\0" .. msg
  local w = shared.windows[key]

  if w and now - w.start >= _M.WINDOW then
    flush_window(shared, key, w)
    w = nil
  end

  if not w then
    if shared.tracked >= _M.MAX_TRACKED then
      sweep(shared, now, true)
    end
    w = { start = now, count = 0, suppressed = 0, level = level, msg = msg }
    shared.windows[key] = w
    shared.tracked = shared.tracked + 1
  end

  w.count = w.count + 1
  if w.count > _M.BURST then
    w.suppressed = w.suppressed + 1
    return false
  end
  return true
end


function Logger.build(shared, fixed)
  local self = {}

  for name, level in pairs(levels) do
    self[name] = function(msg, fields)
      if type(msg) ~= "string" then
        error("log." .. name .. ": message must be a string, got "
          .. type(msg), 2)
      end
      if fields ~= nil and type(fields) ~= "table" then
        error("log." .. name .. ": fields must be a table, got "
          .. type(fields), 2)
      end
      if not shared.enabled(level) then
        return
      end
      if admit(shared, level, msg) then
        emit(shared, level, msg, fixed, fields)
      end
    end
  end

  -- Returns a child logger that adds fields to every line; it shares the
  -- parent's writer and rate limits.
  function self.with(fields)
    if type(fields) ~= "table" then
      error("log.with: fields must be a table, got " .. type(fields), 2)
    end
    local merged = {}
    for k, v in pairs(fixed) do
      merged[k] = v
    end
    for k, v in pairs(_M.redact(fields)) do
      merged[k] = v
    end
    return Logger.build(shared, merged)
  end

  -- Writes the counts of lines dropped so far; call before exit.
  function self.flush()
    sweep(shared, shared.clock(), true)
  end

  function self.enabled(level)
    return shared.enabled(levels[level] or level)
  end

  return self
end


-- The process logger, created on first use so that requiring this module
-- does not load the core.
local default

local function get_default()
  if not default then
    default = _M.new()
  end
  return default
end


-- Replaces the process logger, for example with one made by log.new for a
-- test. Returns the previous one.
function _M.set_default(logger)
  local previous = default
  default = logger
  return previous
end


for name in pairs(levels) do
  _M[name] = function(msg, fields)
    return get_default()[name](msg, fields)
  end
end

function _M.with(fields)
  return get_default().with(fields)
end

function _M.flush()
  return get_default().flush()
end

function _M.enabled(level)
  return get_default().enabled(level)
end


return _M
