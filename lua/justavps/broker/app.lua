-- The broker's request entry: verifies the edge's signature, timestamp
-- and nonce, applies the target policy, and only then dials the machine
-- through the shared reverse proxy.
--
-- Checks run in the order of the wire contract, each with its own status
-- and error code:
--   1. the eight X-JustAVPS-* headers and Host are present and well
--      formed: 400 missing_header or invalid_header;
--   2. the broker id is this broker's: 401 wrong_broker;
--   3. the timestamp is within clock_skew of this clock: 401
--      stale_timestamp;
--   4. the signature matches, compared in constant time: 401
--      bad_signature;
--   5. the nonce is not live in the cache, and is then recorded: 401
--      replayed_nonce, or 503 nonce_cache_full at the memory bound;
--   6. the target policy allows the address and port: 403 target_denied.
-- The nonce is recorded only after the signature verifies, so nobody
-- without the secret can fill the cache.
local core = require("justavps.core")
local edge_sig = require("justavps.edge_sig")
local proxy = require("justavps.proxy")
local log = require("justavps.log")
local target_policy = require("policies.broker_target")
local state = require("justavps.broker.state")

local tonumber = tonumber
local type = type
local floor = math.floor
local max = math.max
local abs = math.abs
local pairs = pairs

local _M = {}

local error_response = proxy.error_response

-- Headers never forwarded to a machine: the eight signature headers, and
-- the client's own Forwarded and X-Forwarded-Prefix, which would tell the
-- app a client address or path prefix no proxy vouched for. The proxy
-- drops hop-by-hop headers and those named in Connection itself. The
-- received X-Real-IP, X-Forwarded-For, X-Forwarded-Proto and
-- X-Forwarded-Host are dropped too, and handle adds the broker's own.
local DROP
do
  local names = { "forwarded", "x-forwarded-prefix", "x-real-ip",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host" }
  for name in pairs(edge_sig.HEADER_SET) do
    names[#names + 1] = name
  end
  DROP = core.http.header_names(names)
end


-- Decisions of target_policy.allowed by target IP and port, for the
-- current conf.target and policy function: the policy reads nothing else,
-- and parsing the address and walking the blocks cost more than a lookup.
-- The map is emptied when it reaches MAX_TARGET_DECISIONS addresses.
local MAX_TARGET_DECISIONS = 4096
local decisions = { conf = nil, allowed = nil, count = 0, by_ip = {} }


local function target_allowed(ip, port, conf)
  if decisions.conf ~= conf or decisions.allowed ~= target_policy.allowed
      or decisions.count >= MAX_TARGET_DECISIONS then
    decisions.conf = conf
    decisions.allowed = target_policy.allowed
    decisions.count = 0
    decisions.by_ip = {}
  end
  local by_port = decisions.by_ip[ip]
  if by_port == nil then
    by_port = {}
    decisions.by_ip[ip] = by_port
    decisions.count = decisions.count + 1
  end
  local reason = by_port[port]
  if reason == nil then
    local allowed, denial = target_policy.allowed(ip, port, conf)
    reason = allowed and true or (denial or "denied")
    by_port[port] = reason
  end
  if reason == true then
    return true
  end
  return false, reason
end


-- Logs a rejected request, with the slug and the client IP when they were
-- well formed but never with the signature, and returns the error response.
local function reject(req, fields, status, code, message, reason)
  local peer = req:peer()
  log.warn("rejected an edge request", {
    req_id = req.id,
    status = status,
    code = code,
    reason = reason or message,
    slug = fields and fields.slug,
    client_ip = fields and fields.client_ip,
    peer = peer,
  })
  if req:is_upgrade() then
    -- The HTTP server would run the handler again on bytes that follow an
    -- upgrade request rejected without 101, so close the connection.
    req:keepalive(false)
  end
  return error_response(status, code, message)
end


-- Runs checks 1 to 5. Returns the fields, or nil followed by status,
-- code, message for the rejection. rerun is true when the request passed
-- the checks once already (see handle): its timestamp may have aged past
-- clock_skew since, and its nonce is in the cache.
local function verify(req, conf, rerun)
  local fields, code, message = edge_sig.parse_request(req)
  if not fields then
    return nil, 400, code, message
  end
  fields.method = req.method
  fields.target = req.target

  if fields.broker_id ~= conf.broker_id then
    return fields, 401, "wrong_broker",
      "the request was signed for another broker"
  end

  local now = floor(core.time())
  if not rerun and abs(now - tonumber(fields.timestamp)) > conf.clock_skew
  then
    return fields, 401, "stale_timestamp",
      "the request timestamp is more than " .. conf.clock_skew
        .. " s away from the broker's clock"
  end

  if not edge_sig.verify(conf.secret, fields, fields.signature) then
    return fields, 401, "bad_signature", "the signature does not match"
  end

  if rerun then
    return fields
  end

  local ok, err, ncode = state.nonces:check_and_add(fields.nonce)
  if ok == nil and ncode == "full" then
    log.err("nonce cache full; rejecting new nonces with 503 until entries "
      .. "expire",
      { capacity = state.nonces:capacity(), error = err })
    return fields, 503, "nonce_cache_full",
      "the broker is at its replay-cache limit; retry shortly"
  end
  if ok == nil then
    return fields, 400, "invalid_header",
      "invalid header X-JustAVPS-Nonce: " .. err
  end
  if not ok then
    return fields, 401, "replayed_nonce", "the nonce was already used"
  end
  return fields
end


-- The on_unreachable of proxy.forward: opts.request and opts.fields are
-- the request and its signed fields.
local function machine_unreachable(code, _, opts, connected)
  local fields = opts.fields
  if connected then
    log.warn("machine closed the connection before sending a response",
      { req_id = opts.request.id, slug = fields.slug,
        target_port = opts.port, code = code })
    return error_response(502, "upstream_closed",
      "machine " .. fields.slug .. " closed the connection on port "
        .. opts.port .. " before sending a response")
  end
  log.warn("machine refused the connection", { req_id = opts.request.id,
    slug = fields.slug, target_port = opts.port, code = code })
  return error_response(502, "upstream_unreachable",
    "machine " .. fields.slug .. " refused the connection on port "
      .. opts.port)
end


function _M.handle(req)
  local conf = state.conf
  -- A request that req:pass forwarded and that failed before its response
  -- runs here a second time, so that proxy.forward reports the failure.
  local rerun = req:pass_failure() ~= nil
  local fields, status, code, message = verify(req, conf, rerun)
  if status then
    return reject(req, fields, status, code, message)
  end

  local port = tonumber(fields.target_port)
  local allowed, reason = target_allowed(fields.target_ip, port,
    conf.target)
  if not allowed then
    return reject(req, fields, 403, "target_denied",
      "the target address may not be dialed", reason)
  end

  -- CONNECT would turn the machine connection into a tunnel, which the
  -- HTTP client does not offer; no edge sends it.
  if fields.method == "CONNECT" then
    return reject(req, fields, 405, "method_not_allowed",
      "CONNECT is not forwarded to machines")
  end

  local upstream = conf.upstream
  local extra = "X-Real-IP: " .. fields.client_ip
    .. "\r\nX-Forwarded-For: " .. fields.client_ip
    .. "\r\nX-Forwarded-Proto: " .. conf.forwarded_proto
    .. "\r\nX-Forwarded-Host: " .. fields.host .. "\r\n"
  -- NOTE: the proxy takes one timeout for the connect and for each read
  -- and write, so the largest of the three settings applies to all of
  -- them.
  local timeout = max(upstream.connect_timeout, upstream.header_timeout,
    upstream.idle_timeout)

  -- One table serves req:pass, which reads only its own fields, and
  -- proxy.forward.
  local opts = {
    host = fields.target_ip,
    port = port,
    target = fields.target,
    extra_headers = extra,
    drop_headers = DROP,
    timeout = timeout,
    -- The daemon may add a Date field to an app's 100 fields.
    max_headers = proxy.HOP_MAX_HEADERS,
    on_unreachable = machine_unreachable,
    request = req,
    fields = fields,
  }

  local method = fields.method
  if not rerun and (method == "GET" or method == "HEAD") then
    -- The HTTP server runs the checks above in C for later GET and HEAD
    -- requests without a body to this target, and forwards those that
    -- pass (core/http_pass.c). Any other request, and one that fails a
    -- check there, comes here.
    req:pass_learn_target({
      secret = conf.secret,
      broker_id = conf.broker_id,
      clock_skew = conf.clock_skew,
      nonces = state.nonces,
      forwarded_proto = conf.forwarded_proto,
      timeout = timeout,
      drop_headers = DROP,
      target_ip = fields.target_ip,
      target_port = port,
    })
    -- This request is forwarded in C too. IPv6 targets are declined.
    if req:pass(opts) then
      return
    end
  end

  return proxy.forward(req, opts)
end


function _M.validate()
  if type(target_policy.allowed) ~= "function" then
    return nil, "policies.broker_target: allowed must be a function"
  end
  if state.conf then
    return target_policy.validate(state.conf.target)
  end
  return true
end


return _M
