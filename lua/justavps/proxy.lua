-- Reverse proxying of one request to an upstream HTTP server, shared by the
-- daemon (to the user's app) and the broker (to a machine).
--
-- The request body streams from the client to the upstream and the
-- response body streams back, each piece as it arrives, so neither is held
-- whole. Hop-by-hop headers and every header named in Connection are
-- dropped in both directions. A 101 answer to an upgrade becomes a byte
-- pipe between the two sockets. Idle upstream connections are kept per
-- host and port for reuse.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")

local ipairs = ipairs
local pairs = pairs
local next = next
local type = type
local tostring = tostring
local slower = string.lower
local sgmatch = string.gmatch
local sfind = string.find

local _M = {}

-- RFC 9110 section 7.6.1 connection-specific fields, plus the legacy
-- Proxy-Connection and the proxy credentials, which are meant for this hop.
local HOP_BY_HOP = {
  ["connection"] = true,
  ["keep-alive"] = true,
  ["proxy-connection"] = true,
  ["te"] = true,
  ["trailer"] = true,
  ["transfer-encoding"] = true,
  ["upgrade"] = true,
  ["proxy-authorization"] = true,
  ["proxy-authenticate"] = true,
}

-- Failure codes of a connect that nothing accepted, or of a connection
-- that the upstream closed or reset before it sent a response.
local UNREACHABLE = {
  ECONNREFUSED = true,
  ECONNRESET = true,
  ENETUNREACH = true,
  EHOSTUNREACH = true,
  EPIPE = true,
  closed = true,
}

-- Idle upstream sockets: pool[host][port] for a plain upstream, so that a
-- request builds no key string, and tls_pool["host port tls name"] for a
-- TLS one. Each list is { socks, at, idle, shun_until }:
--   socks, at   the sockets and the times they were put back, newest last
--   idle        seconds a socket may stay (pool_idle of proxy.forward)
--   shun_until  time before which the target gets no pooled socket (shun)
local pool = {}
local tls_pool = {}
local POOL_MAX_PER_TARGET = 32
local POOL_IDLE_SECONDS = 30

-- Seconds between sweeps of the pools while any list exists (a field so
-- that specs can shorten it). A sweep closes expired sockets and those the
-- upstream closed. Without it, their descriptors stay open until the next
-- request to the same target, which for a deleted machine never comes.
_M.pool_sweep_seconds = 5
local sweeper = nil

-- Seconds a proxied WebSocket may stay silent before this hop pings both
-- ends. Common load balancers cut idle connections after 60 s.
local WS_PING_INTERVAL = 25

-- Seconds between checks, while a response streams, that its client is
-- still connected.
local CLIENT_CHECK = 1


-- A TLS upstream gets its own pool per context and server name, so a
-- connection verified for one name is never reused for another.
local function pool_list(host, port, tls, server_name, create)
  local by_key, key
  if tls then
    by_key = tls_pool
    key = host .. " " .. port .. " " .. tostring(tls) .. " "
      .. tostring(server_name)
  else
    by_key = pool[host]
    if by_key == nil then
      if not create then
        return nil
      end
      by_key = {}
      pool[host] = by_key
    end
    key = port
  end
  local list = by_key[key]
  if list == nil and create then
    list = { socks = {}, at = {}, idle = POOL_IDLE_SECONDS }
    by_key[key] = list
  end
  return list
end


-- Returns a pooled socket for the target, or nil. resendable is true for a
-- request that send() repeats on a new connection when the pooled one
-- fails (a GET or HEAD without a body). Such a request skips the system
-- call that checks whether the upstream closed the socket since the event
-- loop last polled.
local function pool_take(host, port, tls, server_name, resendable)
  local list = pool_list(host, port, tls, server_name, false)
  if not list then
    return nil
  end

  local socks, at, idle = list.socks, list.at, list.idle
  local now = core.now()
  local n = #socks
  while n > 0 do
    local sock, put_at = socks[n], at[n]
    socks[n], at[n] = nil, nil
    n = n - 1
    -- reusable() detects a close or reset the upstream sent while the
    -- socket was idle, which closed() does not.
    if now - put_at < idle and sock:reusable(not resendable) then
      return sock
    end
    sock:close()
  end
  return nil
end


-- Keeps in list the sockets that may still be reused and closes the
-- others. Returns true when the list can be dropped: it has no socket
-- left and no shun mark in force.
local function sweep_list(list, now)
  local socks, at, idle = list.socks, list.at, list.idle
  local kept = 0
  for i = 1, #socks do
    local sock, put_at = socks[i], at[i]
    socks[i], at[i] = nil, nil
    if now - put_at < idle and sock:reusable(false) then
      kept = kept + 1
      socks[kept], at[kept] = sock, put_at
    else
      sock:close()
    end
  end
  return kept == 0 and (list.shun_until or 0) <= now
end


-- Sweeps every list, drops the lists sweep_list allows, and stops the
-- sweeper once no list is left.
local function sweep()
  local now = core.now()
  for key, list in pairs(tls_pool) do
    if sweep_list(list, now) then
      tls_pool[key] = nil
    end
  end
  for host, by_port in pairs(pool) do
    for port, list in pairs(by_port) do
      if sweep_list(list, now) then
        by_port[port] = nil
      end
    end
    if next(by_port) == nil then
      pool[host] = nil
    end
  end
  if next(pool) == nil and next(tls_pool) == nil and sweeper then
    sweeper:stop()
    sweeper = nil
  end
end


local function start_sweeper()
  if sweeper == nil then
    sweeper = core.timer(_M.pool_sweep_seconds, sweep,
      _M.pool_sweep_seconds)
  end
end


local function close_list(list)
  for _, sock in ipairs(list.socks) do
    sock:close()
  end
  list.socks, list.at = {}, {}
end


-- Seconds a target gets only new connections after a reused one failed
-- before the response. An app that closes each connection after its
-- response without Connection: close would otherwise fail every request
-- that a reused connection carries and that cannot be resent, such as a
-- POST.
-- NOTE: 30 s is a chosen value, not tuned on real apps: such an app still
-- fails about one request per target each time the mark expires.
local SHUN_SECONDS = 30


-- Closes the target's pooled sockets and stops pooling new ones for
-- SHUN_SECONDS. code is the failure of the reused connection.
local function shun(host, port, tls, server_name, code)
  local list = pool_list(host, port, tls, server_name, true)
  local now = core.now()
  if (list.shun_until or 0) <= now then
    log.info("a reused upstream connection failed; new connections only "
      .. "for a while", { host = host, port = port, code = code,
        seconds = SHUN_SECONDS })
  end
  list.shun_until = now + SHUN_SECONDS
  close_list(list)
  start_sweeper()
end


local function pool_put(host, port, sock, tls, server_name, idle)
  local list = pool_list(host, port, tls, server_name, true)
  list.idle = idle or POOL_IDLE_SECONDS
  local n = #list.socks
  local now = core.now()
  if n >= POOL_MAX_PER_TARGET or (list.shun_until or 0) > now then
    sock:close()
    return
  end
  list.socks[n + 1] = sock
  list.at[n + 1] = now
  start_sweeper()
end


-- Closes every pooled upstream socket (on drain or in specs), and those
-- of the C fast path, whose cached decisions it drops.
function _M.close_pool()
  core.http.pass_reset(true)
  for key, list in pairs(tls_pool) do
    close_list(list)
    tls_pool[key] = nil
  end
  for host, by_port in pairs(pool) do
    for _, list in pairs(by_port) do
      close_list(list)
    end
    pool[host] = nil
  end
  if sweeper then
    sweeper:stop()
    sweeper = nil
  end
end


-- Returns the number of idle upstream sockets in the pools, for specs.
function _M.pooled()
  local n = 0
  for _, list in pairs(tls_pool) do
    n = n + #list.socks
  end
  for _, by_port in pairs(pool) do
    for _, list in pairs(by_port) do
      n = n + #list.socks
    end
  end
  return n
end


-- Returns the set of lower-case header names listed in Connection values.
local function connection_tokens(list)
  local named = {}
  for _, h in ipairs(list) do
    if slower(h[1]) == "connection" then
      for token in sgmatch(h[2], "[^,%s]+") do
        named[slower(token)] = true
      end
    end
  end
  return named
end


local function add_header(headers, name, value)
  local old = headers[name]
  if old == nil then
    headers[name] = value
  elseif type(old) == "table" then
    old[#old + 1] = value
  else
    headers[name] = { old, value }
  end
end


-- Copies end-to-end headers from list (pairs {name, value}), dropping
-- hop-by-hop ones, those named in Connection and those in drop (a set of
-- lower-case names, or a list from core.http.header_names).
function _M.end_to_end(list, drop)
  local named = connection_tokens(list)
  if type(drop) == "userdata" then
    local set = {}
    for _, name in ipairs(drop:list()) do
      set[name] = true
    end
    drop = set
  end
  local headers = {}
  for _, h in ipairs(list) do
    local lname = slower(h[1])
    if not HOP_BY_HOP[lname] and not named[lname]
        and not (drop and drop[lname]) then
      add_header(headers, lname, h[2])
    end
  end
  return headers
end


local function is_websocket_upgrade(req)
  local upgrade = req:header("upgrade")
  return upgrade ~= nil and slower(upgrade) == "websocket"
    and req:is_upgrade()
end


-- Sends a JSON error in the shape every JustAVPS component uses.
function _M.error_response(status, code, message)
  return status, { ["Content-Type"] = "application/json" },
    json.encode({ error = { code = code, message = message } }) .. "\n"
end


-- Builds the proxy's error response to a failed exchange. connected is
-- true when the failure came after the connection was made.
local function upstream_error(code, err, target, connected)
  if code == "timeout" then
    return _M.error_response(504, "upstream_timeout",
      "upstream " .. target .. " did not answer in time")
  end
  if UNREACHABLE[code] then
    if connected then
      return _M.error_response(502, "upstream_closed",
        "upstream " .. target
          .. " closed the connection before sending a response")
    end
    return _M.error_response(502, "upstream_unreachable",
      "nothing accepted the connection at " .. target)
  end
  return _M.error_response(502, "upstream_error",
    "upstream " .. target .. " failed: " .. tostring(err))
end


-- Returns the response to a failed exchange: opts.on_unreachable's for
-- the codes of UNREACHABLE when the caller gave one, else upstream_error's.
local function failed(opts, code, err, connected)
  if opts.on_unreachable and UNREACHABLE[code] then
    return opts.on_unreachable(code, err, opts, connected)
  end
  return upstream_error(code, err, opts.host .. ":" .. tostring(opts.port),
    connected)
end


local function request_has_body(req)
  local length = req:header("content-length")
  if length then
    return length ~= "0", length
  end
  local te = req:header("transfer-encoding")
  return te ~= nil, nil
end


-- Relays the body of res to the client of req, then keeps the upstream
-- connection for reuse when both sides allow it.
local function relay_body(req, res, host, port, tls, server_name, idle)
  -- An upstream that sends nothing for a while (a silent command on
  -- /_toolbox/exec) would keep this hop, and each hop behind it, waiting
  -- for it after the client has gone. The check closes the upstream
  -- connection, which the hop behind notices in the same way.
  local watch = core.timer(CLIENT_CHECK, function()
    if req:peer_closed() then
      res:close()
    end
  end, CLIENT_CHECK)
  while true do
    local data, rerr = res:read()
    if not data then
      watch:stop()
      if rerr then
        -- The response is half sent: cutting the connection, without the
        -- last chunk of a chunked body, is the only honest signal left.
        res:close()
        req:abort()
        return
      end
      break
    end
    local ok = req:write(data)
    if not ok then
      watch:stop()
      res:close()
      return
    end
  end
  watch:stop()

  if res:keepalive() then
    pool_put(host, port, res:socket(), tls, server_name, idle)
  else
    res:close()
  end

  req:finish()
end


-- Header fields a justavps hop accepts from the next justavps hop: the
-- 100 that an app may send at the daemon, plus room for the Date field
-- each hop adds when the app sent none.
_M.HOP_MAX_HEADERS = 128


-- Bytes of a request body kept so that the request can be sent again
-- when its pooled connection fails: a PUT of a JSON document fits.
local REPLAY_MAX = 64 * 1024


-- Returns a body_reader for exchange that streams the body of req, and
-- a table whose started field turns true once it was first called. With
-- keep, the table also keeps the body read so far in chunks while it
-- stays within REPLAY_MAX bytes, and complete turns true at its end. It
-- is made here rather than in forward, so that forward creates no closure
-- and closes no upvalue: LuaJIT 2.1 (Debian's 2.1.0~beta3+git20220320)
-- compiles neither, and aborts the trace of the whole request there.
local function client_body_reader(req, keep)
  local body = { started = false, complete = false,
    chunks = keep and {} or nil, size = 0 }
  return function()
    body.started = true
    local data, err, code = req:read()
    if data == nil and err then
      -- forward turns this raise into its response by failed_code.
      body.failed_code = code or "closed"
      error("client body: " .. tostring(err))
    end
    if data == nil then
      body.complete = true
    elseif body.chunks then
      body.size = body.size + #data
      if body.size <= REPLAY_MAX then
        body.chunks[#body.chunks + 1] = data
      else
        body.chunks = nil
      end
    end
    return data
  end, body
end


-- Returns a body_reader that sends the kept chunks of body again.
local function replay_reader(body)
  local i = 0
  return function()
    i = i + 1
    return body.chunks[i]
  end
end


-- Sends head on sock, or on a new connection when sock is nil, and
-- returns the response as core.http._exchange does, with a fifth value
-- true when the connect failed.
local function exchange(sock, host, port, head, mode, length, body_reader,
                        is_head, request_close, timeout, tls, server_name,
                        max_headers)
  if sock == nil then
    local err, code
    sock, err, code = core.tcp.connect(host, port, { timeout = timeout,
      tls = tls, server_name = server_name })
    if sock == nil then
      return nil, "connecting to " .. host .. " port " .. port
        .. " failed: " .. err, code, nil, true
    end
  end
  return core.http._exchange(sock, head, mode, length, body_reader, is_head,
    request_close, timeout, max_headers)
end


-- One "Name: value\r\n" line of extra_headers.
local HEADER_LINE = "([^:\r\n]+): ?([^\r\n]*)\r\n"


-- Forwards a WebSocket upgrade request through Lua header tables and
-- core.http.request, and turns a 101 answer into a byte pipe.
local function forward_upgrade(req, opts)
  local host, port = opts.host, opts.port

  local headers = _M.end_to_end(req:header_list(), opts.drop_headers)
  for name, value in pairs(opts.set_headers or {}) do
    local lname = slower(name)
    if value == false then
      headers[lname] = nil
    else
      headers[lname] = value
    end
  end
  if opts.extra_headers then
    for name, value in sgmatch(opts.extra_headers, HEADER_LINE) do
      headers[slower(name)] = value
    end
  end
  headers["connection"] = "Upgrade"
  headers["upgrade"] = req:header("upgrade")

  local has_body, length = request_has_body(req)
  local body_reader
  if has_body then
    body_reader = function()
      local data, err = req:read()
      if data == nil and err then
        error("client body: " .. tostring(err))
      end
      return data
    end
    if length then
      headers["content-length"] = length
    end
  end

  -- An upgraded connection is never pooled, so the request goes out on a
  -- new one.
  local sock, err, code = core.tcp.connect(host, port, {
    timeout = opts.timeout or 60, tls = opts.tls,
    server_name = opts.server_name })
  if not sock then
    return failed(opts, code, err, false)
  end
  local res
  res, err, code = core.http.request({
    sock = sock,
    method = req.method,
    host = host,
    port = port,
    path = opts.target or req.target,
    headers = headers,
    body_reader = body_reader,
    timeout = opts.timeout or 60,
    tls = opts.tls,
    server_name = opts.server_name,
  })

  if not res then
    return failed(opts, code, err, true)
  end

  local out = _M.end_to_end(res:header_list())

  if res.status == 101 then
    out["connection"] = "Upgrade"
    out["upgrade"] = res:header("upgrade")
    local up = res:socket()
    req:send_head(101, out)
    local down = req:hijack()
    -- Pings from this hop keep an idle WebSocket open through other
    -- proxies and load balancers that cut idle connections.
    core.pipe(down, up, { idle_timeout = opts.pipe_idle_timeout,
      ws_ping_interval = opts.ws_ping_interval or WS_PING_INTERVAL })
    down:close()
    up:close()
    return
  end

  -- Keep the upstream's framing when it sent a length, so the client sees
  -- the same Content-Length; otherwise the server chunks the body.
  req:send_head(res.status, out)
  relay_body(req, res, host, port, opts.tls, opts.server_name,
    opts.pool_idle)
end


-- Returns true when the response head announces that the upstream closes
-- the connection after it (Connection: close, or HTTP/1.0 without it).
local function closes(res)
  local connection = res:header("connection")
  if connection then
    return sfind(slower(connection), "close", 1, true) ~= nil
  end
  return res.version == "1.0"
end


-- The methods RFC 9110 section 9.2.2 calls idempotent. The upstream may
-- have acted on a request before its connection failed, so only these
-- are sent a second time.
local IDEMPOTENT = { GET = true, HEAD = true, OPTIONS = true, TRACE = true,
  PUT = true, DELETE = true }


-- Sends the request and returns the response as exchange does. The
-- upstream may have closed a pooled socket just before its reuse, so an
-- idempotent request is then sent again on a new connection. It is not
-- when the request timed out, or when part of the client's body was read
-- and not kept (over REPLAY_MAX bytes, or still arriving).
local function send(opts, host, port, head, mode, length, body_reader, body,
                    is_head, request_close, timeout, method)
  local pooled = pool_take(host, port, opts.tls, opts.server_name,
    body_reader == nil and (is_head or method == "GET"))
  if pooled then
    local res, err, code, body_pending = exchange(pooled, host, port, head,
      mode, length, body_reader, is_head, request_close, timeout, nil, nil,
      opts.max_headers)
    -- Some app servers send a 408 with Connection: close before they
    -- close an idle connection. With opts.stale_408, such a response on a
    -- reused connection counts as a failed connection, not as the
    -- response to this request.
    local stale = res and opts.stale_408 and res.status == 408
      and closes(res)
    -- A body read in full and kept can be sent again.
    local replay = body and body.started and body.complete and body.chunks
    if not res and UNREACHABLE[code] then
      shun(host, port, opts.tls, opts.server_name, code)
    end
    if (res and not stale) or code == "timeout" or not IDEMPOTENT[method]
        or (body and body.started and not replay) then
      return res, err, code, body_pending
    end
    if stale then
      res:close()
    end
    if replay then
      body_reader = replay_reader(body)
    end
  end
  return exchange(nil, host, port, head, mode, length, body_reader, is_head,
    request_close, timeout, opts.tls, opts.server_name, opts.max_headers)
end


-- Forwards req to opts.host:opts.port and relays the answer. opts:
--   host, port       upstream address (IP literal) and port
--   target           request-target to send (default req.target)
--   set_headers      table of headers to add or replace (name = value, or
--                    false to remove)
--   drop_headers     set of lower-case request header names to drop, or
--                    a list from core.http.header_names
--   extra_headers    string of complete "Name: value\r\n" lines to add
--                    as they are (no Host, Content-Length or hop-by-hop
--                    names); drop_headers must name them
--   timeout          seconds for connect and for each read or write
--   on_unreachable   function(code, err, opts, connected) returning
--                    status, headers, body, to respond in the caller's
--                    words to a refused or failed connect (connected
--                    false) or to a connection the upstream closed or
--                    reset before its response (connected true). opts is
--                    this table, so one function can read the caller's
--                    own fields from it and need not be a new closure for
--                    each request
--   pipe_idle_timeout  seconds without a byte either way after which an
--                    upgraded connection is closed (nil: no limit)
--   ws_ping_interval seconds without a byte either way after which a
--                    WebSocket gets a ping toward each end (default
--                    WS_PING_INTERVAL; 0 sends none)
--   tls, server_name a core.tls client context and the name its
--                    certificate must carry, for a TLS upstream
--   stale_408        true when the upstream is an app server that may send
--                    a 408 before it closes an idle connection. Then a
--                    408 with Connection: close on a reused connection
--                    counts as a failed one, and an idempotent request
--                    goes out again. Not for a justavps hop, which sends
--                    a 408 only as the response it relays
--   max_headers      header fields accepted in the upstream's response
--                    head (default 100). A hop whose upstream is another
--                    justavps hop takes HOP_MAX_HEADERS, because each
--                    hop may add a Date field to the app's response
--   pool_idle        seconds an upstream connection may stay idle in the
--                    pool (default POOL_IDLE_SECONDS). Below the
--                    upstream's own keep-alive limit, the pool never
--                    sends a request on a connection the upstream is
--                    closing, which a request with a body cannot survive
-- Returns status, headers, body for the handler to return when the
-- proxy answered itself (an error), or nothing when it relayed the
-- upstream response. Except for a WebSocket upgrade, header fields keep
-- their order and the case of their names in both directions.
function _M.forward(req, opts)
  if is_websocket_upgrade(req) then
    return forward_upgrade(req, opts)
  end

  -- The fast path (core/http_pass.c) took this request and failed
  -- before the response: report that failure without sending the
  -- request again, as send() would have reported it.
  local failed_code, failed_err, failed_connected = req:pass_failure(true)
  if failed_code then
    return failed(opts, failed_code, failed_err, failed_connected)
  end

  local host, port = opts.host, opts.port
  local timeout = opts.timeout or 60

  -- The head is built and the response head relayed in C, straight from
  -- the parsed heads, so that this common path makes no header tables.
  local head, mode, length, request_close = req:forward_head(host, port,
    opts.target, opts.set_headers, opts.drop_headers, opts.extra_headers)

  local method = req.method
  local body_reader, body
  if mode ~= "none" then
    body_reader, body = client_body_reader(req, IDEMPOTENT[method]
      and (mode ~= "length" or length <= REPLAY_MAX))
  end

  local is_head = method == "HEAD"
  local res, err, code, body_pending, connect_failed
  if body_reader == nil then
    res, err, code, body_pending, connect_failed = send(opts, host, port,
      head, mode, length, nil, nil, is_head, request_close, timeout, method)
  else
    local ok
    ok, res, err, code, body_pending, connect_failed = pcall(send, opts,
      host, port, head, mode, length, body_reader, body, is_head,
      request_close, timeout, method)
    if not ok then
      if not body.failed_code then
        error(res, 0)
      end
      -- The client's body failed: the rest of it, if any comes, cannot be
      -- framed as a next request.
      req:keepalive(false)
      if body.failed_code == "timeout" then
        return _M.error_response(408, "request_timeout",
          "the request body stopped arriving")
      end
      log.info("client left before the end of its request body",
        { error = tostring(res) })
      return _M.error_response(400, "incomplete_body",
        "the connection ended before the request body did")
    end
  end

  if body_pending then
    -- The upstream failed while the client's body was still arriving:
    -- the rest of it cannot be framed as a next request.
    req:keepalive(false)
  end
  if not res then
    return failed(opts, code, err, not connect_failed)
  end
  if err == true then
    -- The upstream responded before it had the whole body, which is still
    -- on its way: the client's connection cannot carry another request.
    req:keepalive(false)
  end

  -- Keeps the upstream's framing when it sent a length, so the client
  -- sees the same Content-Length; otherwise the server chunks the body.
  -- The head goes out with the body bytes read so far, in one write, and
  -- a body that arrived whole ends the response there.
  local ok, progress = res:relay(req)
  if not ok then
    res:close()
    return
  end
  if progress == "done" then
    if res:keepalive() then
      pool_put(host, port, res:socket(), opts.tls, opts.server_name,
        opts.pool_idle)
    else
      res:close()
    end
    return
  end

  relay_body(req, res, host, port, opts.tls, opts.server_name,
    opts.pool_idle)
end


return _M
