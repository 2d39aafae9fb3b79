-- Access policy of the edge: decides whether a request may pass to a
-- machine, from the credentials the edge found and verified. It opens no
-- socket and runs no query, so it can be edited, reloaded and tested on
-- its own. lua/justavps/edge/access.lua gathers the credentials and
-- executes the decision.
--
-- classify(target, method, host_kind) names what a request reaches and
-- the API key scope it needs:
--   terminal  /_pty on a machine host: scope exec
--   toolbox   /_toolbox/... on a machine host: exec for exec and
--             processes, read, write or delete for the file calls
--   app       everything else, including every path on a port host:
--             scope proxy
--   bad       a target the daemon would reject (dot segments, encoded
--             slashes, a target that does not start with "/")
--
-- decide(input) returns { allow = true, via = credential } or
-- { allow = false, status, code, message, login }. login is true when the
-- request carried no usable credential, so that a browser may be sent to
-- the dashboard login instead of an error. Rules, in order:
--   1. a WebSocket handshake whose Origin is not the request's own host
--      is rejected (403 forbidden_origin);
--   2. a bad target is rejected (400 bad_path);
--   3. an API key that was sent but is invalid, revoked or of another
--      account is rejected (401 invalid_api_key);
--   4. terminal and toolbox open only with an API key holding the needed
--      scope or a single-use machine ticket; the proxy cookie and share
--      tokens never open them (403 ticket_required);
--   5. app paths open with an API key holding proxy, an owner token
--      (the __justavps_proxy cookie), or a share token for the port the
--      request reaches (proxy_token.allows decides the paths).
local proxy_token = require("justavps.auth.proxy_token")
local apikey = require("justavps.auth.apikey")

local type = type
local tonumber = tonumber
local slower = string.lower
local supper = string.upper
local smatch = string.match
local ssub = string.sub
local sgsub = string.gsub
local schar = string.char

local _M = {}

_M.name = "edge_access"

-- Toolbox calls by first segment after /_toolbox: the scope per method,
-- with "*" for any other method.
local TOOLBOX_SCOPES = {
  files = { GET = "read", HEAD = "read", PUT = "write", DELETE = "delete",
    ["*"] = "exec" },
  list = { GET = "read", HEAD = "read", ["*"] = "exec" },
  stat = { GET = "read", HEAD = "read", ["*"] = "exec" },
  search = { GET = "read", HEAD = "read", ["*"] = "exec" },
  mkdir = { POST = "write", ["*"] = "exec" },
  move = { POST = "write", ["*"] = "exec" },
  exec = { ["*"] = "exec" },
  processes = { ["*"] = "exec" },
}

-- Messages per denial code.
local MESSAGES = {
  forbidden_origin = "WebSocket handshakes must come from the machine's "
    .. "own origin",
  bad_path = "the request path is invalid",
  invalid_api_key = "the API key is invalid, revoked or not valid for "
    .. "this machine",
  ticket_required = "this path needs an API key with the right scope or a "
    .. "machine ticket; the proxy cookie and share links never open it",
  invalid_ticket = "the machine ticket is invalid, expired or already used",
  invalid_token = "the proxy token is invalid, expired or revoked",
  unauthorized = "sign in to reach this machine, or send an API key",
  reserved_path = "share links never open /_pty or /_toolbox",
  wrong_port = "this share link opens another port",
  outside_port = "this share link opens only /_port/PORT/ of its port",
}


local function hex_char(hex)
  return schar(tonumber(hex, 16))
end


-- Returns the lowercase, percent-decoded form of a raw path segment.
local function decode_segment(segment)
  return slower(sgsub(segment, "%%(%x%x)", hex_char))
end


-- Returns the first two raw segments of target's path, skipping empty
-- ones, or nil when the path does not start with "/".
local function first_segments(target)
  local path = smatch(target, "^[^?]*")
  if ssub(path, 1, 1) ~= "/" then
    return nil
  end
  local first, second
  for segment in path:gmatch("[^/]+") do
    if not first then
      first = segment
    else
      second = segment
      break
    end
  end
  return first or "", second
end


-- Returns { kind, scope } for target (the request-target the daemon
-- receives, after any port-host rewrite), method and host_kind
-- ("machine" or "port").
function _M.classify(target, method, host_kind)
  if type(target) ~= "string" then
    return { kind = "bad" }
  end
  local first, second = first_segments(target)
  if not first then
    return { kind = "bad" }
  end
  -- proxy_token.allows applies the daemon's path rules: dot segments,
  -- encoded slashes and backslashes are bad for every credential.
  local ok, code = proxy_token.allows({ scope = proxy_token.OWNER_SCOPE },
    target)
  if not ok and code == "bad_path" then
    return { kind = "bad" }
  end

  if host_kind ~= "port" then
    local name = decode_segment(first)
    if name == "_pty" then
      return { kind = "terminal", scope = "exec" }
    end
    if name == "_toolbox" then
      local call = second and TOOLBOX_SCOPES[decode_segment(second)]
      local verb = supper(method or "")
      local scope = call and (call[verb] or call["*"]) or "exec"
      return { kind = "toolbox", scope = scope }
    end
  end
  return { kind = "app", scope = "proxy" }
end


local function default_port(scheme)
  if scheme == "https" then
    return "443"
  end
  if scheme == "http" then
    return "80"
  end
  return nil
end


-- Splits "name[:port]" and drops the scheme's default port.
local function normal_authority(authority, scheme)
  local name, port = smatch(authority, "^(.-):(%d+)$")
  if not name then
    return authority
  end
  if port == default_port(scheme) then
    return name
  end
  return name .. ":" .. port
end


-- Returns true when origin (an Origin header value) names host (the
-- request's Host header, lowercased) under scheme ("https" or "http").
-- "null" and any other scheme are foreign.
function _M.same_origin(origin, host, scheme)
  if type(origin) ~= "string" or type(host) ~= "string" then
    return false
  end
  local oscheme, authority = smatch(slower(origin), "^(%a[%w+.-]*)://([^/]+)$")
  if not oscheme or oscheme ~= scheme then
    return false
  end
  return normal_authority(authority, oscheme)
    == normal_authority(slower(host), scheme)
end


local function deny(status, code, login, message)
  return { allow = false, status = status, code = code,
    message = message or MESSAGES[code], login = login == true }
end


local function allow(via)
  return { allow = true, via = via }
end


local function scope_message(scope)
  return "the API key lacks the " .. scope .. " scope this path needs"
end


local function decide_privileged(input, class)
  local key = input.api_key
  if key and apikey.has_scope(key.scopes, class.scope) then
    return allow("api_key")
  end
  if input.ticket then
    return allow("ticket")
  end
  if key then
    return deny(403, "insufficient_scope", false, scope_message(class.scope))
  end
  if input.ticket_error then
    return deny(401, "invalid_ticket", true)
  end
  if input.cookie or input.share then
    return deny(403, "ticket_required", false)
  end
  return deny(401, "unauthorized", true)
end


local function decide_app(input, target)
  local key = input.api_key
  if key then
    if apikey.has_scope(key.scopes, "proxy") then
      return allow("api_key")
    end
    return deny(403, "insufficient_scope", false, scope_message("proxy"))
  end

  local host_port = input.host_kind == "port" and input.port or nil
  if input.cookie and proxy_token.allows(input.cookie, target, host_port) then
    return allow("cookie")
  end
  if input.share then
    local ok, code = proxy_token.allows(input.share, target, host_port)
    if ok then
      return allow("share")
    end
    return deny(403, code or "wrong_port", false)
  end
  if input.token_error then
    return deny(401, "invalid_token", true)
  end
  return deny(401, "unauthorized", true)
end


-- Decides one request. input:
--   target        request-target the daemon receives (after rewrite)
--   method        request method
--   host_kind     "machine" or "port"; port: the port of a port host
--   host, scheme  the request's Host (lowercased) and "https" or "http"
--   origin        the Origin header or nil; is_websocket: a handshake
--   cookie        verified owner-token claims, or nil
--   share         verified share-token claims, or nil
--   token_error   code of a proxy token that was sent but failed
--   api_key       { scopes = {...} } of a valid key of the machine's
--                 account, or nil; api_key_error: code of a key that
--                 was sent but failed
--   ticket        true when a machine ticket was consumed for this
--                 request; ticket_error: code of a ticket that failed
function _M.decide(input)
  if input.is_websocket and input.origin ~= nil
      and not _M.same_origin(input.origin, input.host, input.scheme) then
    return deny(403, "forbidden_origin", false)
  end

  local class = input.class
    or _M.classify(input.target, input.method, input.host_kind)
  if class.kind == "bad" then
    return deny(400, "bad_path", false)
  end
  if input.api_key_error then
    return deny(401, "invalid_api_key", false)
  end
  if class.kind == "terminal" or class.kind == "toolbox" then
    return decide_privileged(input, class)
  end
  return decide_app(input, input.target)
end


-- Returns true when decide(input) would consult a machine ticket, so the
-- edge spends one only then: a terminal or toolbox request that passes
-- rules 1 to 3 and that no API key opens already.
function _M.needs_ticket(input)
  local class = input.class
    or _M.classify(input.target, input.method, input.host_kind)
  if class.kind ~= "terminal" and class.kind ~= "toolbox" then
    return false
  end
  if input.is_websocket and input.origin ~= nil
      and not _M.same_origin(input.origin, input.host, input.scheme) then
    return false
  end
  if input.api_key_error then
    return false
  end
  local key = input.api_key
  return not (key and apikey.has_scope(key.scopes, class.scope))
end


return _M
