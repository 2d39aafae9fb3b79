-- The daemon's /_pty endpoint: a browser terminal (xterm.js) over a
-- WebSocket, backed by a login shell on a PTY.
--
-- This module admits the request: the upgrade checks and the query
-- parameters all run before the upgrade, so a rejection is an ordinary
-- JSON error. It then upgrades the connection and reads the client's
-- frames: binary frames are keyboard input and text frames are JSON
-- control messages. terminal_session.lua owns the sessions, their output buffer
-- and the frames sent to the client. docs/daemon-terminal.md describes
-- the protocol.
local core = require("justavps.core")
local json = require("justavps.json")
local proxy = require("justavps.proxy")
local websocket = require("justavps.websocket")
local state = require("justavps.daemon.state")
local session = require("justavps.daemon.terminal_session")

local pairs = pairs
local ipairs = ipairs
local type = type
local tonumber = tonumber
local floor = math.floor
local schar = string.char
local sfind = string.find
local sgsub = string.gsub
local smatch = string.match
local ssub = string.sub
local now = core.now
local update_time = core.update_time
local spawn = core.spawn

local _M = {}

-- Terminal settings when the daemon config has no "terminal" record (as
-- in unit specs); the config's record carries the same keys.
local SETTINGS = {
  -- Output kept per session for reattaching clients, in bytes.
  buffer_size = 2 * 1024 * 1024,
  -- Seconds a session without a client keeps running.
  reattach_window = 300,
  -- Seconds without input or output after which a session is ended,
  -- attached or not; 0 turns the limit off.
  idle_timeout = 0,
  -- Seconds between WebSocket pings; 0 turns pings off. A client that
  -- sends nothing, pongs included, for three intervals is disconnected.
  ping_interval = 30,
  -- Seconds between SIGHUP and SIGKILL when a session is ended.
  kill_grace = 5,
  -- Sessions that may exist at once.
  -- NOTE: 32 is a guess at what one machine's users need, not measured.
  max_sessions = 32,
}

-- Largest message a client may send (a paste is one input message).
local MAX_MESSAGE = 1024 * 1024

-- Terminal size limits accepted from clients, and the default size.
local MAX_SIZE = 1000
local DEFAULT_COLS = 80
local DEFAULT_ROWS = 24

-- The longest session id accepted; ids the daemon makes are 32
-- characters of [A-Za-z0-9_-].
local MAX_ID_LENGTH = 64

-- Sequence numbers up to 2^53 are exact in a Lua number.
local MAX_SEQ_DIGITS = 15

local CLOSE_GOING_AWAY = 1001

local QUERY_KEYS = {
  session = true,
  since = true,
  replay = true,
  cols = true,
  rows = true,
}


local function reject(req, status, code, message, headers)
  req:keepalive(false)
  local s, h, body = proxy.error_response(status, code, message)
  for k, v in pairs(headers or {}) do
    h[k] = v
  end
  return s, h, body
end


local function hex_byte(h)
  return schar(tonumber(h, 16))
end


-- Decodes %XX escapes. Returns nil for a % not followed by two hex
-- digits.
local function percent_decode(s)
  if not sfind(s, "%", 1, true) then
    return s
  end
  local check = sgsub(s, "%%%x%x", "")
  if sfind(check, "%", 1, true) then
    return nil
  end
  return (sgsub(s, "%%(%x%x)", hex_byte))
end


-- Returns a positive integer from a decimal string of up to max_digits
-- digits, or nil.
local function parse_integer(s, max_digits)
  if not smatch(s, "^%d+$") or #s > max_digits then
    return nil
  end
  return tonumber(s)
end


-- Parses the query string of /_pty. Returns a table of the known
-- parameters (unknown ones, such as a ticket, are left to others), or
-- nil, message, code.
local function parse_query(query)
  local raw = {}
  for pair in (query or ""):gmatch("[^&]+") do
    local name, value = smatch(pair, "^([^=]*)=?(.*)$")
    name = percent_decode(name)
    value = percent_decode(value)
    if not name or not value then
      return nil, "the query string has a % not followed by two hex "
        .. "digits", "bad_query"
    end
    if QUERY_KEYS[name] then
      if raw[name] then
        return nil, "query parameter " .. name .. " is given twice",
          "bad_query"
      end
      raw[name] = value
    end
  end

  local params = {}

  if raw.session then
    if #raw.session > MAX_ID_LENGTH
      or not smatch(raw.session, "^[A-Za-z0-9_-]+$") then
      return nil, "session must be the id from a session frame "
        .. "([A-Za-z0-9_-], at most " .. MAX_ID_LENGTH .. " characters)",
        "bad_session"
    end
    params.session = raw.session
  end

  if raw.since then
    params.since = parse_integer(raw.since, MAX_SEQ_DIGITS)
    if not params.since then
      return nil, "since must be a byte sequence number (a decimal "
        .. "integer >= 0)", "bad_since"
    end
    if not params.session then
      return nil, "since applies only to a reattach: add session=ID",
        "bad_since"
    end
  end

  if raw.replay then
    if raw.replay ~= "full" then
      return nil, "replay must be \"full\"", "bad_replay"
    end
    if not params.session then
      return nil, "replay applies only to a reattach: add session=ID",
        "bad_replay"
    end
    params.full = true
  end

  for _, name in ipairs({ "cols", "rows" }) do
    if raw[name] then
      local n = parse_integer(raw[name], 4)
      if not n or n < 1 or n > MAX_SIZE then
        return nil, name .. " must be an integer from 1 to " .. MAX_SIZE,
          "bad_size"
      end
      params[name] = n
    end
  end

  return params
end


local function send_error(conn, code, message)
  return conn:send(json.encode({ type = "error", code = code,
    message = message }), "text")
end


local function is_size(n)
  return type(n) == "number" and n >= 1 and n <= MAX_SIZE and floor(n) == n
end


-- Acts on one JSON control message from the client. A message that is
-- not valid gets an error frame and the connection stays open.
local function on_control(s, att, conn, text)
  local msg, err = json.decode(text, { max_depth = 8 })
  if type(msg) ~= "table" or type(msg.type) ~= "string" then
    return send_error(conn, "bad_message", err
      or "a control message is a JSON object with a string \"type\"")
  end

  local kind = msg.type

  if kind == "input" then
    if type(msg.data) ~= "string" then
      return send_error(conn, "bad_message",
        "an input message needs \"data\", a string")
    end
    session.input(s, msg.data)

  elseif kind == "resize" then
    if not is_size(msg.cols) or not is_size(msg.rows) then
      return send_error(conn, "bad_message", "a resize message needs "
        .. "\"cols\" and \"rows\", integers from 1 to " .. MAX_SIZE)
    end
    session.resize(s, msg.cols, msg.rows)

  elseif kind == "pause" or kind == "resume" then
    session.set_paused(s, att, kind == "pause")

  else
    s.log.warn("ignored a terminal control message of unknown type",
      { type = ssub(kind, 1, 40) })
  end
end


-- Reads the client's frames until the connection ends. A client that
-- sends nothing for three ping intervals is disconnected, because a
-- dead peer would otherwise keep the session attached.
local function serve(s, att, conn, ping_interval)
  local silence_limit = 3 * ping_interval
  if ping_interval > 0 then
    conn:settimeout(ping_interval)
  end

  while true do
    local data, kind, code = conn:recv()

    if data == nil then
      if code ~= "timeout" then
        return code
      end
      update_time()
      if now() - att.received_at >= silence_limit then
        s.log.info("terminal client stopped responding to pings",
          { silent_s = now() - att.received_at })
        spawn(function()
          conn:close(CLOSE_GOING_AWAY, "no data or pong from the client")
        end)
        return "timeout"
      end

    else
      att.received_at = now()
      if kind == "close" then
        return "closed by client"
      elseif kind == "binary" then
        session.input(s, data)
      elseif kind == "text" then
        on_control(s, att, conn, data)
      end
    end
  end
end


local function json_reply(status, body)
  return status, { ["Content-Type"] = "application/json",
    ["Cache-Control"] = "no-store" }, json.encode(body) .. "\n"
end


-- Serves GET /_pty/sessions, and GET and DELETE /_pty/sessions/ID, which
-- show and end sessions, for example those a dropped client left behind.
local function handle_sessions(req, decision)
  if decision.session == nil then
    if req.method ~= "GET" then
      return reject(req, 405, "method_not_allowed",
        "/_pty/sessions takes GET", { Allow = "GET" })
    end
    local list = json.array()
    for i, s in ipairs(session.list()) do
      list[i] = session.describe(s)
    end
    return json_reply(200, { sessions = list })
  end

  local s = session.get(decision.session)
  if not s then
    return reject(req, 404, "session_not_found", "no terminal session "
      .. "has this id; it has ended or expired")
  end
  if req.method == "GET" then
    return json_reply(200, session.describe(s))
  end
  if req.method == "DELETE" then
    session.close(s, "closed_by_request")
    return 204, { ["Cache-Control"] = "no-store" }, ""
  end
  return reject(req, 405, "method_not_allowed",
    "/_pty/sessions/ID takes GET or DELETE", { Allow = "GET, DELETE" })
end


-- Serves GET /_pty (decision.action "pty") and /_pty/sessions. See
-- docs/daemon-terminal.md.
function _M.handle(req, decision)
  if decision.sessions then
    return handle_sessions(req, decision)
  end
  local conf = (state.conf and state.conf.terminal) or SETTINGS
  session.configure({
    buffer_size = conf.buffer_size,
    reattach_window = conf.reattach_window,
    idle_timeout = conf.idle_timeout,
    ping_interval = conf.ping_interval,
    kill_grace = conf.kill_grace,
  })

  local ok, key, code, status = websocket.check_request(req.method,
    function(name)
      return req:header(name)
    end)
  if not ok then
    local extra = status == 426 and { ["Sec-WebSocket-Version"] = "13" }
    return reject(req, status, code, "/_pty needs a WebSocket upgrade: "
      .. key, extra)
  end

  local params, perr, pcode = parse_query(req.query)
  if not params then
    return reject(req, 400, pcode, perr)
  end

  local s, since, full
  if params.session then
    s = session.get(params.session)
    if not s then
      return reject(req, 404, "session_not_found", "no terminal session "
        .. "has this id; it has ended or expired, so start a new one")
    end
    since = params.since
    full = params.full
    if since and since > s.ring.finish then
      return reject(req, 400, "bad_since", "since " .. since .. " is past "
        .. "the end of the session's output at " .. s.ring.finish)
    end

  else
    if session.count() >= conf.max_sessions then
      return reject(req, 503, "too_many_sessions", "this machine already "
        .. "runs " .. conf.max_sessions .. " terminal sessions; close one "
        .. "or reattach to it")
    end
    local err
    s, err = session.create({
      shell = state.conf.shell or "/bin/bash",
      cols = params.cols or DEFAULT_COLS,
      rows = params.rows or DEFAULT_ROWS,
    })
    if not s then
      return reject(req, 500, "spawn_failed",
        "cannot start the terminal shell: " .. err)
    end
    since = 0
  end

  local sock = req:hijack()
  local hok, herr = websocket.server_handshake(sock, key)
  if not hok then
    s.log.info("terminal upgrade failed", { error = herr })
    sock:close()
    if not params.session then
      session.discard(s)
    end
    return
  end

  local conn = websocket.wrap(sock, { role = "server",
    max_message = MAX_MESSAGE })

  if params.session and (params.cols or params.rows) then
    session.resize(s, params.cols or s.cols, params.rows or s.rows)
  end

  -- When serve returns, the connection is closed or a close is under
  -- way (by the peer, a takeover, the exit frame or the ping check).
  local att = session.attach(s, conn, since, full)
  session.detach(s, att, serve(s, att, conn, conf.ping_interval))
end

return _M
