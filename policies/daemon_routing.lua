-- Routing policy of the machine daemon's public listener: decides where a
-- request goes from its path alone. It opens no socket and runs no query,
-- so it can be edited, reloaded and tested on its own.
--
-- decide(path, conf) returns one of
--   { action = "proxy", port = N, path = "/rest", prefix = "/_port/N" }
--   { action = "pty" }, or with sessions = true (and session = ID) for
--     /_pty/sessions[/ID]
--   { action = "toolbox", path = "/files/..." }
--   { action = "reject", status = 400|403, code = "...", message = "..." }
-- where path is the request path without the query string.
local tonumber = tonumber
local tostring = tostring
local ipairs = ipairs
local sfind = string.find
local ssub = string.sub
local slower = string.lower
local sgsub = string.gsub
local concat = table.concat

local _M = {}

_M.name = "daemon_routing"

-- Defaults an operator may override in the daemon config's "routing"
-- section.
_M.schema = {
  { default_port = { type = "integer", default = 3456, between = { 1, 65535 },
    description = "port that receives every path no other rule claims" } },
  { numeric_shortcut = { type = "boolean", default = true,
    description = "route /PORT/rest like /_port/PORT/rest" } },
  { denied_ports = { type = "array", default = {},
    elements = { type = "integer", between = { 1, 65535 } },
    description = "ports never reachable through the proxy" } },
  { rules = { type = "array", default = {},
    description = "extra rules, tried in order before the built-in ones",
    elements = { type = "record", fields = {
      { prefix = { type = "string", required = true, match = "^/[^%%]*$",
        description = "path prefix the rule claims, whole segments only" } },
      { port = { type = "integer", required = true, between = { 1, 65535 },
        description = "local port that receives the requests" } },
      { strip = { type = "boolean", default = true,
        description = "remove the prefix before forwarding" } },
    } } } },
}


local function reject(status, code, message)
  return { action = "reject", status = status, code = code,
    message = message }
end


-- Splits path into segments after checking that no segment can climb out
-- of its prefix: dot segments (also percent-encoded), encoded slashes and
-- backslashes are rejected, and empty segments from doubled slashes are
-- dropped. Returns the segments or nil, message.
local function segments(path)
  if ssub(path, 1, 1) ~= "/" then
    return nil, "path must start with /"
  end

  local out = {}
  for seg in (path .. "/"):gmatch("([^/]*)/") do
    if seg ~= "" then
      local lower = slower(seg)
      if sfind(lower, "%2f", 1, true) or sfind(lower, "%5c", 1, true)
          or sfind(seg, "\\", 1, true) or sfind(lower, "%00", 1, true) then
        return nil, "encoded slash, backslash or NUL in path"
      end
      local decoded = sgsub(lower, "%%2e", ".")
      if decoded == "." or decoded == ".." then
        return nil, "dot segment in path"
      end
      out[#out + 1] = seg
    end
  end
  return out
end


local function port_of(segment)
  if not sfind(segment, "^%d+$") then
    return nil
  end
  return tonumber(segment)
end


local function proxy_to(port, segs, first_rest, prefix, conf, slash)
  if port < 1 or port > 65535 then
    return reject(400, "invalid_port",
      "port " .. tostring(port) .. " is outside 1-65535")
  end
  for _, denied in ipairs(conf.denied_ports or {}) do
    if denied == port then
      return reject(403, "port_denied",
        "port " .. tostring(port) .. " is not reachable through the proxy")
    end
  end
  local rest = {}
  for i = first_rest, #segs do
    rest[#rest + 1] = segs[i]
  end
  local rest_path = "/" .. concat(rest, "/")
  if slash and #rest > 0 then
    rest_path = rest_path .. "/"
  end
  return { action = "proxy", port = port, prefix = prefix, path = rest_path }
end


-- Returns the decision of an operator rule when its prefix covers the
-- path's first segments, else nil. Prefixes match whole segments, so
-- "/api" claims "/api" and "/api/x" but not "/apix".
local function match_rule(rule, segs, slash, conf)
  local want = {}
  for seg in rule.prefix:gmatch("[^/]+") do
    want[#want + 1] = seg
  end
  if #want > #segs then
    return nil
  end
  for i, seg in ipairs(want) do
    if segs[i] ~= seg then
      return nil
    end
  end

  if rule.strip == false then
    return proxy_to(rule.port, segs, 1, nil, conf, slash)
  end
  return proxy_to(rule.port, segs, #want + 1, "/" .. concat(want, "/"),
    conf, slash)
end


function _M.decide(path, conf)
  local segs, err = segments(path)
  if not segs then
    return reject(400, "bad_path", err)
  end

  local first = segs[1]
  local slash = ssub(path, -1) == "/"

  for _, rule in ipairs(conf.rules or {}) do
    local decision = match_rule(rule, segs, slash, conf)
    if decision then
      return decision
    end
  end

  if first == "_pty" then
    if #segs == 1 then
      return { action = "pty" }
    end
    -- /_pty/sessions lists the sessions, /_pty/sessions/ID is one.
    if segs[2] == "sessions" and #segs <= 3 then
      return { action = "pty", sessions = true, session = segs[3] }
    end
    return reject(404, "not_found", "no such terminal path")
  end

  if first == "_toolbox" then
    local rest = {}
    for i = 2, #segs do
      rest[#rest + 1] = segs[i]
    end
    return { action = "toolbox", path = "/" .. concat(rest, "/") }
  end

  if first == "_port" then
    local port = segs[2] and port_of(segs[2])
    if not port then
      return reject(400, "invalid_port",
        "expected /_port/PORT/... with PORT a number 1-65535")
    end
    return proxy_to(port, segs, 3, "/_port/" .. segs[2], conf, slash)
  end

  if conf.numeric_shortcut and first then
    local port = port_of(first)
    if port then
      return proxy_to(port, segs, 2, "/" .. first, conf, slash)
    end
  end

  -- Everything else goes to the default port, path unchanged.
  local decision = proxy_to(conf.default_port, segs, #segs + 1, nil, conf)
  if decision.action == "proxy" then
    decision.path = path
  end
  return decision
end


return _M
