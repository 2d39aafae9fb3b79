-- The daemon's request entry: the public listener (traffic from brokers)
-- and the internal listener (machine-signed API on 127.0.0.1:7777).
--
-- The routing policy decides where a public request goes; this module
-- admits the peer, calls the policy and hands the request to the module
-- that executes the decision: proxy.lua for ports, terminal.lua for
-- /_pty, toolbox.lua for /_toolbox.
local cidr = require("justavps.cidr")
local proxy = require("justavps.proxy")
local log = require("justavps.log")
local routing = require("policies.daemon_routing")
local state = require("justavps.daemon.state")
local ports = require("justavps.daemon.ports")
local json = require("justavps.json")
local http = require("justavps.core").http
local reload = require("justavps.reload")

local ipairs = ipairs

local smatch = string.match
local tostring = tostring

local _M = {}

local error_response = proxy.error_response


-- The terminal, the toolbox and the internal API are loaded on first
-- use: together they are about 300 KiB of Lua heap, which a daemon that
-- only proxies would otherwise carry at idle. A reload loads them at
-- once (see _M.validate), so that an error in them fails the reload.
local terminal, toolbox, internal_api

local function load_terminal()
  terminal = terminal or require("justavps.daemon.terminal")
  return terminal
end

local function load_toolbox()
  toolbox = toolbox or require("justavps.daemon.toolbox")
  return toolbox
end

local function load_internal()
  internal_api = internal_api or require("justavps.daemon.internal")
  return internal_api
end


-- Returns true when the request reached the edge as PORT-SLUG.DOMAIN for
-- this port. The edge then added the /_port/PORT prefix itself, and the
-- app's public URL has none, so X-Forwarded-Prefix would mislead it. The
-- broker sets X-Forwarded-Host to the host the edge received.
local function via_port_host(req, port)
  local host = req:header("X-Forwarded-Host")
  return host ~= nil and smatch(host, "^(%d+)%-") == tostring(port)
end


-- Addresses whose listeners accept the proxy's connections to 127.0.0.1.
local REACHABLE = {
  ["127.0.0.1"] = true, ["0.0.0.0"] = true, ["::"] = true,
  ["::ffff:127.0.0.1"] = true,
}


local function app_closed_connection(port)
  return error_response(502, "app_closed_connection", "the app on port "
    .. port .. " closed the connection without an answer")
end


-- Returns a 502 for a closed port, naming it and the ports that do listen
-- where the proxy connects, so the user sees at once where the app
-- really is. A port bound to another address, such as this daemon's own
-- internal listener, would get the same 502 and is left out.
local function port_not_listening(port)
  local listening = {}
  local seen = {}
  for _, entry in ipairs(ports.catalogue(2)) do
    if REACHABLE[entry.address] and not seen[entry.port] then
      seen[entry.port] = true
      listening[#listening + 1] = entry.port
    end
  end
  if seen[port] then
    -- Something listens there: it accepted, then closed or reset the
    -- connection before its response.
    return app_closed_connection(port)
  end
  table.sort(listening)
  local body = {
    error = {
      code = "port_not_listening",
      message = "nothing is listening on port " .. port,
      port = port,
      listening = json.array(listening),
    },
  }
  return 502, { ["Content-Type"] = "application/json" },
    json.encode(body) .. "\n"
end


-- Results of the broker_cidrs check by peer address, for the current
-- state.broker_blocks, emptied when it reaches MAX_ADMISSIONS addresses.
local MAX_ADMISSIONS = 1024
local admissions = { blocks = nil, count = 0, by_ip = {} }


local function peer_admitted(ip)
  if admissions.blocks ~= state.broker_blocks
      or admissions.count >= MAX_ADMISSIONS then
    if admissions.blocks ~= state.broker_blocks then
      -- Connections admitted under the old networks must ask again.
      http.pass_reset()
    end
    admissions.blocks = state.broker_blocks
    admissions.count = 0
    admissions.by_ip = {}
  end
  local admitted = admissions.by_ip[ip]
  if admitted == nil then
    admitted = cidr.match(state.broker_blocks, ip) ~= nil
    admissions.by_ip[ip] = admitted
    admissions.count = admissions.count + 1
  end
  return admitted
end


local function admit(req)
  local ip = req:peer()
  if not ip or not peer_admitted(ip) then
    log.warn("rejected a client outside the broker networks",
      { client_ip = ip, path = req.path })
    return false
  end
  return true
end


-- Proxy decisions of the routing policy by path, for the current
-- state.conf.routing, emptied when it reaches MAX_DECISIONS paths. The
-- policy's decision depends on the path and the settings only, and the
-- proxy path reads a decision without changing it.
local MAX_DECISIONS = 1024
local decisions = { conf = nil, count = 0, by_path = {} }


local function decide(path)
  local conf = state.conf.routing
  if decisions.conf ~= conf or decisions.count >= MAX_DECISIONS then
    if decisions.conf ~= conf then
      http.pass_reset()
    end
    decisions.conf = conf
    decisions.count = 0
    decisions.by_path = {}
  end
  local decision = decisions.by_path[path]
  if decision == nil then
    decision = routing.decide(path, conf)
    if decision.action == "proxy" then
      decisions.by_path[path] = decision
      decisions.count = decisions.count + 1
    end
  end
  return decision
end


-- Seconds a connection to an app stays pooled. App servers close idle
-- keep-alive connections after a few seconds (5 s by default in gunicorn
-- and in Node.js's http server). A request sent just as the app closes
-- fails, and a POST cannot be resent. Below those limits that race is
-- gone, and a new connection on loopback costs little.
local APP_POOL_IDLE = 1


-- Builds the response to a refused connect, or to a connection the app
-- closed before its response. opts.port is the app's port. One function
-- serves every request, so the request path creates no closure (which
-- would end LuaJIT's trace there).
local function on_unreachable(_, _, opts, connected)
  if connected then
    return app_closed_connection(opts.port)
  end
  return port_not_listening(opts.port)
end


local function public(req)
  if not admit(req) then
    return error_response(403, "forbidden",
      "this address may not connect to the machine daemon")
  end

  local decision = decide(req.path)

  if decision.action == "reject" then
    return error_response(decision.status, decision.code, decision.message)
  end

  if decision.action == "pty" then
    return load_terminal().handle(req, decision)
  end

  if decision.action == "toolbox" then
    return load_toolbox().handle(req, decision)
  end

  local target = decision.path
  if req.query then
    target = target .. "?" .. req.query
  end

  local set
  if decision.prefix and not via_port_host(req, decision.port) then
    set = { ["X-Forwarded-Prefix"] = decision.prefix }
  end

  local method = req.method
  if method == "GET" or method == "HEAD" then
    -- The decision depends on the path, X-Forwarded-Host and the
    -- admitted peer only: the server forwards this connection's next
    -- GET and HEAD requests to the same path in C (core/http_pass.c).
    req:pass_learn({
      host = "127.0.0.1",
      port = decision.port,
      target = decision.path,
      set_headers = set,
      vary = "X-Forwarded-Host",
      timeout = 60,
      pool_idle = APP_POOL_IDLE,
      stale_408 = true,
    })
  end

  return proxy.forward(req, {
    host = "127.0.0.1",
    port = decision.port,
    target = target,
    set_headers = set,
    timeout = 60,
    pool_idle = APP_POOL_IDLE,
    stale_408 = true,
    on_unreachable = on_unreachable,
  })
end


local function internal(req)
  return load_internal().handle(req)
end


_M.handlers = {
  public = public,
  internal = internal,
}


function _M.validate()
  if reload.current() then
    load_terminal()
    load_toolbox()
    load_internal()
  end
  return type(routing.decide) == "function"
end


return _M
