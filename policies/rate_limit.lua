-- Rate-limit policy of the platform's login and signup routes: decides
-- whether one more attempt under a key is allowed. It opens no socket,
-- runs no query and keeps no state of its own, so it can be edited,
-- reloaded and tested alone. The counters live in
-- justavps.platform.rate_state.
--
-- The algorithm is GCRA (the generic cell rate algorithm), the form of a
-- token bucket that needs one number per key: the theoretical arrival
-- time (TAT). With limit attempts per window seconds, each attempt moves
-- the TAT on by window / limit, and an attempt is denied while the TAT
-- would be more than a whole window ahead of now. A client that waits
-- regains attempts at an even rate instead of all at a window boundary.
--
-- decide(key, now, state, conf) returns
--   true, new_state, expires      allowed: store new_state under key until
--                                 expires (a time in seconds, like now)
--   false, retry_after            denied: retry_after whole seconds, >= 1
-- key is "<kind>:<value>", such as "ip:192.0.2.1" or "email:a@b.example";
-- conf[kind] is { limit = attempts, window = seconds }. state is what an
-- earlier call returned for key, or nil.
local type = type
local error = error
local tostring = tostring
local smatch = string.match
local max = math.max
local ceil = math.ceil

local _M = {}

_M.name = "rate_limit"


-- Returns the limit record for key's kind. Raises when conf has none,
-- because a key without a limit is a bug in the caller.
local function limit_of(key, conf)
  local kind = type(key) == "string" and smatch(key, "^([%w_]+):") or nil
  if not kind then
    error("rate_limit.decide: key must be \"<kind>:<value>\", got "
      .. tostring(key), 3)
  end
  local limit = conf and conf[kind]
  if type(limit) ~= "table" or type(limit.limit) ~= "number"
      or type(limit.window) ~= "number" or limit.limit < 1
      or limit.window <= 0 then
    error("rate_limit.decide: conf." .. kind .. " must be { limit = n >= "
      .. "1, window = seconds > 0 }", 3)
  end
  return limit
end


function _M.decide(key, now, state, conf)
  local limit = limit_of(key, conf)
  local interval = limit.window / limit.limit
  -- How far the TAT may run ahead of now while still allowing an attempt:
  -- limit - 1 intervals, so a fresh key allows limit attempts at once.
  local tolerance = limit.window - interval

  local tat = type(state) == "number" and max(state, now) or now
  local ahead = tat - now
  -- The margin absorbs rounding in the sum of intervals, so limit
  -- attempts at one instant are allowed when window / limit is inexact.
  if ahead > tolerance + 1e-6 then
    return false, max(1, ceil(ahead - tolerance))
  end

  local new_tat = tat + interval
  return true, new_tat, new_tat
end


return _M
