-- The edge's request entry. For each request, in order:
--   1. the Host names a machine (SLUG.DOMAIN) or one of its ports
--      (PORT-SLUG.DOMAIN), else 404 unknown_host;
--   2. the machine exists and is ready (lookup.lua), else 404
--      unknown_machine or 503 machine_provisioning with Retry-After;
--   3. the access policy allows the request with the credentials that
--      access.lua found, else 401/403, or a 302 to the dashboard login
--      for a browser without credentials;
--   4. a token in the query is exchanged for the __justavps_proxy cookie
--      with a 302 to the same URL without it (GET and HEAD only);
--   5. the request, without the edge's credentials and without any
--      X-JustAVPS-* header the client sent, is signed for a broker and
--      forwarded; a broker that refuses the connection is marked down and
--      the next one is tried.
-- Errors are JSON ({"error":{"code","message"}}) for API clients and
-- WebSocket handshakes, and a small HTML page for browsers.
local core = require("justavps.core")
local edge_sig = require("justavps.edge_sig")
local proxy = require("justavps.proxy")
local json = require("justavps.json")
local log = require("justavps.log")
local session = require("justavps.auth.session")
local policy = require("policies.edge_access")
local state = require("justavps.edge.state")
local hosts = require("justavps.edge.hosts")
local lookup = require("justavps.edge.lookup")
local access = require("justavps.edge.access")
local brokers = require("justavps.edge.brokers")

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local floor = math.floor
local min = math.min
local format = string.format
local slower = string.lower
local sfind = string.find
local sgsub = string.gsub
local sbyte = string.byte
local ssub = string.sub
local tnew = require("table.new")

local _M = {}

-- Returned by on_unreachable when a broker refused the connection, so the
-- next broker can be tried: nothing was sent to the refusing one.
local RETRY = {}

local SIGNATURE_PREFIX = "x-justavps-"

local STATUS_TITLES = {
  [400] = "Bad request",
  [401] = "Sign-in required",
  [403] = "Access denied",
  [404] = "Not found",
  [502] = "Machine unreachable",
  [503] = "Machine unavailable",
}


local function html_escape(s)
  return (sgsub(s, "[&<>\"']", {
    ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;",
    ['"'] = "&quot;", ["'"] = "&#39;",
  }))
end


-- Returns true for a WebSocket handshake. upgrade is the first Upgrade
-- header value, or nil.
local function is_websocket(req, upgrade)
  return upgrade ~= nil and slower(upgrade) == "websocket"
    and req:is_upgrade()
end


-- True for a browser navigation: not a WebSocket handshake, and an
-- Accept header (the first value, or nil) that lists text/html before
-- any application/json.
local function is_browser(accept, websocket)
  if websocket then
    return false
  end
  accept = slower(accept or "")
  local html = sfind(accept, "text/html", 1, true)
  if not html then
    return false
  end
  local api = sfind(accept, "application/json", 1, true)
  return api == nil or html < api
end


-- Sends an error as JSON or, for a browser, as an HTML page. extra:
-- fields added to the error object; headers: more response headers.
local function fail(req, ctx, status, code, message, extra, headers)
  local out = headers or {}
  if req:is_upgrade() then
    -- The server would run the handler again on bytes that follow an
    -- upgrade request answered without 101.
    req:keepalive(false)
  end
  if ctx.browser then
    out["Content-Type"] = "text/html; charset=utf-8"
    local title = STATUS_TITLES[status] or "Error"
    local body = format("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
      .. "<title>%s</title></head>\n<body><h1>%s</h1>\n<p>%s</p>\n"
      .. "<p><code>%s</code></p></body></html>\n", html_escape(title),
      html_escape(title), html_escape(message), html_escape(code))
    return status, out, body
  end
  out["Content-Type"] = "application/json"
  local err = { code = code, message = message }
  for k, v in pairs(extra or {}) do
    err[k] = v
  end
  return status, out, json.encode({ error = err }) .. "\n"
end


local function url_escape(s)
  return (sgsub(s, "[^A-Za-z0-9._~/:-]", function(c)
    return format("%%%02X", sbyte(c))
  end))
end


-- Sends a browser without credentials to the dashboard login, with
-- return_to set to the URL it asked for (without the edge's tokens).
local function login_redirect(ctx)
  local login = state.conf.login_url
  local back = ctx.scheme .. "://" .. ctx.host.host .. ctx.public_target
  local sep = sfind(login, "?", 1, true) and "&" or "?"
  return 302, {
    ["Location"] = login .. sep .. "return_to=" .. url_escape(back),
    ["Cache-Control"] = "no-store",
  }, ""
end


-- Answers a denial of the access policy.
local function deny(req, ctx, decision)
  if decision.login and ctx.browser and state.conf.login_url then
    return login_redirect(ctx)
  end
  log.info("access denied", { req_id = req.id, slug = ctx.machine.slug,
    status = decision.status, code = decision.code })
  return fail(req, ctx, decision.status, decision.code, decision.message)
end


-- Sets the cookie for a token from the query and redirects to the same
-- URL without it. An owner cookie already present is kept when the query
-- carries a share token, so a share link does not narrow the owner's
-- access.
local function exchange(ctx)
  local claims = ctx.query_claims
  local headers = { ["Location"] = ctx.public_target,
    ["Cache-Control"] = "no-store" }
  local owner = ctx.cookie_claims
    and ctx.cookie_claims.scope == "machine"
  if not (owner and claims.scope ~= "machine") then
    local max_age = floor(claims.exp - core.time())
    if max_age < 1 then
      max_age = 1
    end
    headers["Set-Cookie"] = session.cookie(access.PROXY_COOKIE,
      ctx.creds.token, { max_age = max_age,
        dev = state.conf.insecure_plain_http })
  end
  return 302, headers, ""
end


-- The headers dropped from every request: Cookie and the eight signature
-- headers. dropped_headers returns DROP_NAMES or DROP_WITH_AUTHORIZATION,
-- lists from core.http.header_names that req:forward_head reads without
-- walking a table, when the request has no X-JustAVPS-* header, which is
-- every request of a well-behaved client.
local DROP = { cookie = true }
for name in pairs(edge_sig.HEADER_SET) do
  DROP[name] = true
end

local DROP_NAMES, DROP_WITH_AUTHORIZATION
do
  local names = {}
  for name in pairs(DROP) do
    names[#names + 1] = name
  end
  DROP_NAMES = core.http.header_names(names)
  names[#names + 1] = "authorization"
  DROP_WITH_AUTHORIZATION = core.http.header_names(names)
end


-- Returns the request headers never forwarded, as a set or a list from
-- core.http.header_names: any X-JustAVPS-* header, Cookie (replaced by
-- its filtered copy), and Authorization when it carries a JustAVPS API
-- key.
local function dropped_headers(req, ctx)
  local api_key = ctx.api_key_hash ~= nil
  if not req:has_header_prefix(SIGNATURE_PREFIX) then
    return api_key and DROP_WITH_AUTHORIZATION or DROP_NAMES
  end

  local drop = {}
  for name in pairs(DROP) do
    drop[name] = true
  end
  for _, h in ipairs(req:header_list()) do
    local lname = slower(h[1])
    if ssub(lname, 1, #SIGNATURE_PREFIX) == SIGNATURE_PREFIX then
      drop[lname] = true
    end
  end
  if api_key then
    drop["authorization"] = true
  end
  return drop
end


-- The on_unreachable of proxy.forward for a broker: opts.request and
-- opts.broker are the request and the broker tried.
local function broker_unreachable(code, _, opts, connected)
  if code == "ECONNREFUSED" and not connected then
    return RETRY
  end
  log.warn("broker connection failed", { req_id = opts.request.id,
    broker_id = opts.broker.id, code = code, connected = connected })
  return proxy.error_response(502, "broker_unreachable",
    "the broker connection failed; retry shortly")
end


-- Forwards to the brokers in order until one accepts the connection.
local function forward(req, ctx)
  local conf = state.conf
  local client_ip = req:peer()
  local drop = dropped_headers(req, ctx)
  local set = {
    ["Host"] = ctx.host.host,
    ["Cookie"] = access.filter_cookies(ctx.cookie_lines),
  }
  local fields = {
    method = ctx.method,
    host = ctx.host.host,
    target = ctx.target,
    target_ip = ctx.machine.ip,
    target_port = conf.machine_port,
    slug = ctx.machine.slug,
    client_ip = client_ip,
    broker_id = nil,
  }

  -- A GET or HEAD without a body goes out through the HTTP server's fast
  -- path (core/http_pass.c), which takes drop_headers only as a list
  -- from core.http.header_names.
  -- A request with a machine ticket stays on the Lua path: a failure in
  -- C would run the handler again, and the second run could not spend
  -- the single-use ticket again.
  local method = ctx.method
  local fast = (method == "GET" or method == "HEAD") and not ctx.is_websocket
    and type(drop) == "userdata" and not ctx.creds.ticket

  -- When the fast path failed before the response, the handler runs again
  -- for the request. A broker that refused the connection is marked down
  -- and the request goes to the others through proxy.forward. Any other
  -- failure is reported by proxy.forward for the broker that failed.
  local order
  local failed_code, _, failed_connected, failed_host, failed_port =
    req:pass_failure()
  if failed_code then
    fast = false
    local failed_broker = brokers.find(failed_host, failed_port)
    if failed_code == "ECONNREFUSED" and not failed_connected then
      req:pass_failure(true)
      if failed_broker then
        -- Before brokers.order, which then puts it last.
        brokers.mark_down(failed_broker, "connection refused")
      end
    elseif failed_broker then
      order = { failed_broker }
    end
  end
  order = order or brokers.order()

  for _, broker in ipairs(order) do
    fields.broker_id = broker.id
    -- One table serves req:pass, which reads only its own fields, and
    -- proxy.forward.
    local opts = {
      host = broker.host,
      port = broker.port,
      tls = broker.tls,
      server_name = broker.server_name,
      target = ctx.target,
      set_headers = set,
      drop_headers = drop,
      -- The signature headers are in every drop set.
      extra_headers = edge_sig.sign_lines(broker.secret, fields),
      timeout = conf.broker_timeout,
      -- The daemon may add a Date field to an app's 100 fields.
      max_headers = proxy.HOP_MAX_HEADERS,
      on_unreachable = broker_unreachable,
      request = req,
      broker = broker,
    }
    local ttl = min(conf.cache.credential_ttl, conf.cache.machine_ttl)
    if fast and ttl > 0 then
      -- Later requests with the same method, target, Host, Origin and
      -- Authorization, and no cookie, get this decision in C for as long
      -- as the credential and machine caches would keep it.
      req:pass_learn_edge({
        ttl = ttl,
        host = ctx.host.host,
        prefix = ctx.host.kind == "port" and "/_port/" .. ctx.host.port
          or "",
        target = ctx.target,
        target_ip = ctx.machine.ip,
        target_port = tostring(conf.machine_port),
        slug = ctx.machine.slug,
        broker_id = broker.id,
        secret = broker.secret,
        broker_host = broker.host,
        broker_port = broker.port,
        tls = broker.tls,
        server_name = broker.server_name,
        drop_headers = drop,
        timeout = conf.broker_timeout,
      })
    end
    if fast and req:pass(opts) then
      return
    end
    local status, headers, body = proxy.forward(req, opts)
    if status ~= RETRY then
      return status, headers, body
    end
    brokers.mark_down(broker, "connection refused")
  end

  log.err("no broker accepted the connection", { req_id = req.id,
    slug = ctx.machine.slug, brokers = #state.brokers })
  return fail(req, ctx, 502, "broker_unavailable",
    "no broker is reachable; retry shortly")
end


-- Checks the machine row. Returns nil when it may serve traffic, else
-- the error response.
local function machine_error(req, ctx, row)
  local status = lookup.status(row)
  if status == "ready" then
    return nil
  end
  if status == "gone" then
    return fail(req, ctx, 404, "unknown_machine",
      "no machine " .. row.slug .. " exists")
  end
  if status == "provisioning" then
    local retry = tostring(floor(state.conf.retry_after))
    return fail(req, ctx, 503, "machine_provisioning",
      "machine " .. row.slug .. " is being provisioned (stage "
        .. row.stage .. "); retry in " .. retry .. " s",
      { stage = row.stage }, { ["Retry-After"] = retry })
  end
  if status == "failed" then
    return fail(req, ctx, 503, "machine_failed",
      "provisioning of machine " .. row.slug .. " failed",
      { stage = row.stage })
  end
  return fail(req, ctx, 503, "machine_unavailable",
    "machine " .. row.slug .. " has no address yet", { stage = row.stage })
end


-- Fields of a request's ctx: 12 set here and 2 by access.evaluate.
local CTX_FIELDS = 14

-- The request headers handle reads, in one req:header_values call.
local REQUEST_HEADERS = core.http.header_names({ "host", "upgrade",
  "accept", "authorization", "cookie", "origin" })


-- Returns the first value of the header name whose req:header_values
-- result is value, where false means a header sent more than once.
local function first_value(req, name, value)
  if value == false then
    return req:header(name)
  end
  return value
end


-- Returns the Cookie header values as a list, from cookie as
-- req:header_values returns it. NO_COOKIES is shared by every request
-- without one, so nothing may change the list.
local NO_COOKIES = {}

local function cookie_lines(req, cookie)
  if cookie == nil then
    return NO_COOKIES
  end
  if cookie then
    return { cookie }
  end
  return req:headers()["cookie"]
end


function _M.handle(req)
  local conf = state.conf
  local host, upgrade, accept, authorization, cookie, origin =
    req:header_values(REQUEST_HEADERS)
  upgrade = first_value(req, "upgrade", upgrade)
  local websocket = is_websocket(req, upgrade)
  -- Sized for every field handle and access.lua set, so that it never
  -- grows.
  local ctx = tnew(0, CTX_FIELDS)
  ctx.browser = is_browser(first_value(req, "accept", accept), websocket)
  ctx.is_websocket = websocket
  ctx.scheme = conf.insecure_plain_http and "http" or "https"

  if host == false then
    return fail(req, ctx, 400, "invalid_host",
      "the request has more than one Host header")
  end
  ctx.host = hosts.lookup(host, conf.domain)
  if not ctx.host then
    return fail(req, ctx, 404, "unknown_host",
      "this host is not served here; expected SLUG." .. conf.domain
        .. " or PORT-SLUG." .. conf.domain)
  end
  local target = req.target
  if ssub(target, 1, 1) ~= "/" then
    return fail(req, ctx, 400, "bad_request",
      "the request-target must start with /")
  end

  local row, err, code = lookup.machine(ctx.host.slug)
  if not row then
    if code == "not_found" then
      return fail(req, ctx, 404, "unknown_machine",
        "no machine " .. ctx.host.slug .. " exists")
    end
    log.err("machine lookup failed", { req_id = req.id,
      slug = ctx.host.slug, error = err, code = code })
    return fail(req, ctx, 503, "lookup_failed",
      "the edge could not look the machine up; retry shortly")
  end
  ctx.machine = row
  local mstatus, mheaders, mbody = machine_error(req, ctx, row)
  if mstatus then
    return mstatus, mheaders, mbody
  end

  local raw_query = req.query
  local query, creds = access.split_query(raw_query)
  ctx.creds = creds
  if raw_query == nil then
    -- Without a "?" the path is the whole target.
    ctx.public_target = target
  else
    ctx.public_target = req.path .. (query and ("?" .. query) or "")
  end
  ctx.method = req.method
  if ctx.host.kind == "port" then
    ctx.target = "/_port/" .. ctx.host.port .. ctx.public_target
  else
    ctx.target = ctx.public_target
  end
  ctx.cookie_lines = cookie_lines(req, cookie)
  ctx.origin = first_value(req, "origin", origin)
  if authorization == false then
    -- Which of two credentials counts would depend on the reader, as at
    -- the platform.
    return fail(req, ctx, 401, "unauthorized",
      "the request has more than one Authorization header; send one")
  end
  ctx.api_key_hash = access.api_key_hash(authorization)

  local decision, status, dcode, message = access.evaluate(req, ctx)
  if not decision then
    return fail(req, ctx, status, dcode, message)
  end
  if not decision.allow then
    return deny(req, ctx, decision)
  end

  if ctx.query_claims and not websocket
      and (ctx.method == "GET" or ctx.method == "HEAD") then
    return exchange(ctx)
  end

  return forward(req, ctx)
end


function _M.validate()
  if type(policy.decide) ~= "function"
      or type(policy.classify) ~= "function"
      or type(policy.needs_ticket) ~= "function" then
    return nil, "policies.edge_access: decide, classify and needs_ticket "
      .. "must be functions"
  end
  return true
end


return _M
