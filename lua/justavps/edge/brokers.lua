-- The brokers the edge forwards to: round robin over the healthy ones,
-- failover when one refuses a connection, and periodic TCP connect checks
-- that bring a broker back. The list and its health live in
-- justavps.edge.state, so they survive a reload.
local core = require("justavps.core")
local log = require("justavps.log")
local state = require("justavps.edge.state")

local ipairs = ipairs
local pcall = pcall
local setmetatable = setmetatable
local sort = table.sort

local _M = {}


local function is_up(broker, now)
  return broker.down_until == nil or now >= broker.down_until
end


-- Round robin orders of the broker list, all brokers up: rotations[i]
-- starts at broker i. Built on first use for each list.
local rotations_of = setmetatable({}, { __mode = "k" })


local function rotation(list, start)
  local rotations = rotations_of[list]
  if rotations == nil then
    rotations = {}
    rotations_of[list] = rotations
  end
  local order = rotations[start]
  if order == nil then
    local n = #list
    order = {}
    for i = 0, n - 1 do
      order[i + 1] = list[(start - 1 + i) % n + 1]
    end
    rotations[start] = order
  end
  return order
end


-- Returns the order of _M.order when a broker is marked down: the healthy
-- ones from start on, then the others by the time they were marked.
local function order_with_down(list, start, now)
  local n = #list
  local up, down = {}, {}
  for i = 0, n - 1 do
    local broker = list[(start - 1 + i) % n + 1]
    if is_up(broker, now) then
      up[#up + 1] = broker
    else
      down[#down + 1] = broker
    end
  end
  sort(down, function(a, b)
    return a.down_until < b.down_until
  end)
  for _, broker in ipairs(down) do
    up[#up + 1] = broker
  end
  return up
end


-- Returns the brokers to try for one request: the healthy ones in round
-- robin order, then those marked down (oldest mark first), so that a
-- request still has a chance when every broker was marked down. The list
-- may be shared with other requests, so callers must not change it.
function _M.order()
  local list = state.brokers
  local n = #list
  local now = core.now()
  local start = state.next_broker
  state.next_broker = start % n + 1

  for i = 1, n do
    if not is_up(list[i], now) then
      return order_with_down(list, start, now)
    end
  end
  return rotation(list, start)
end


-- Returns the configured broker at host and port, or nil.
function _M.find(host, port)
  for _, broker in ipairs(state.brokers) do
    if broker.host == host and broker.port == port then
      return broker
    end
  end
  return nil
end


-- Takes broker out of rotation for broker_health.down_for seconds.
function _M.mark_down(broker, reason)
  local was_up = is_up(broker, core.now())
  broker.down_until = core.now() + state.conf.broker_health.down_for
  broker.reason = reason
  if was_up then
    log.warn("broker marked down", { broker_id = broker.id,
      url = broker.url, reason = reason,
      seconds = state.conf.broker_health.down_for })
  end
end


-- Puts broker back into rotation.
function _M.mark_up(broker)
  if broker.down_until ~= nil then
    log.info("broker is back in rotation", { broker_id = broker.id,
      url = broker.url })
  end
  broker.down_until = nil
  broker.reason = nil
end


-- Connects to each broker once and closes the connection. A refused or
-- timed-out connect marks the broker down, a successful one marks it up.
function _M.check_all()
  local timeout = state.conf.broker_health.connect_timeout
  for _, broker in ipairs(state.brokers) do
    local sock, err, code = core.tcp.connect(broker.host, broker.port,
      { timeout = timeout })
    if sock then
      sock:close()
      _M.mark_up(broker)
    else
      _M.mark_down(broker, "health check: " .. (code or err or "failed"))
    end
  end
end


-- Starts the periodic checks, the first one an interval after start:
-- until then every broker counts as up, and a refused connection marks
-- it down. Returns a handle with stop().
function _M.start_checks()
  local running = false
  local interval = state.conf.broker_health.interval
  local timer = core.timer(interval, function()
    -- A check slower than the interval must not overlap the next one.
    if running then
      return
    end
    running = true
    local ok, err = pcall(_M.check_all)
    running = false
    if not ok then
      log.err("broker health check failed", { error = err })
    end
  end, interval)
  return {
    stop = function()
      timer:stop()
    end,
  }
end


-- Returns a summary of every broker for logs: { {id, url, up}, ... }.
function _M.describe()
  local out = {}
  local now = core.now()
  for i, broker in ipairs(state.brokers) do
    out[i] = { id = broker.id, url = broker.url, up = is_up(broker, now) }
  end
  return out
end


return _M
