-- WebSocket connections (RFC 6455) over core sockets.
--
-- core.ws does the protocol work in C: handshake checks, frame encoding
-- with masking, and an incremental parser that assembles messages and
-- enforces the rules. This module drives a core.tcp socket with them,
-- because a C function cannot continue after a yield under LuaJIT.
--
--   local websocket = require("justavps.websocket")
--   local conn = websocket.wrap(sock, { role = "server" })
--   local data, kind = conn:recv()
--   conn:send(data, kind)
--   conn:close(1000, "bye")
--
-- Misuse raises; an expected failure returns nil, message, code, and a
-- failure that ends the connection adds the close code as a fourth value.

local core = require("justavps.core")

local ws = core.ws
local encode_frame = ws.encode_frame
local frame_header = ws.frame_header
local close_frame = ws.close_frame
local valid_utf8 = ws.valid_utf8
local waiter = core.waiter
local now = core.now
local update_time = core.update_time
local error = error
local setmetatable = setmetatable
local type = type
local tostring = tostring
local min = math.min
local remove = table.remove
local insert = table.insert

local _M = {
  accept_key = ws.accept_key,
  check_request = ws.check_request,
  server_handshake = ws.server_handshake,
  client_handshake = ws.client_handshake,
  pipe = ws.pipe,
}

-- Largest read per call: the socket returns what it has, up to this.
local READ_SIZE = 1024 * 1024

local DEFAULT_CLOSE_TIMEOUT = 5

-- Close code sent when the peer's frames break the protocol but the
-- parser named no code; the parser always names one today.
local CLOSE_PROTOCOL_ERROR = 1002

-- Reported, never sent: the connection ended without a close frame.
local CLOSE_ABNORMAL = 1006

local Conn = {}
Conn.__index = Conn


local function check_size(opts, name)
  local v = opts[name]
  if v ~= nil and (type(v) ~= "number" or v < 1) then
    error(name .. " must be a number >= 1", 3)
  end
  return v
end


-- Wraps a connected socket whose handshake is done. Options:
--   role           "server" or "client" (required)
--   max_frame      largest frame the peer may send, in bytes
--                  (default max_message)
--   max_message    largest assembled message, in bytes (default 16 MiB)
--   frame_size     split sent messages into frames of at most this many
--                  bytes (default one frame per message)
--   auto_pong      send a pong for each ping (default true)
--   close_timeout  seconds to wait for the peer's close frame (default 5)
function _M.wrap(sock, opts)
  if type(opts) ~= "table" then
    error("wrap: opts must be a table with a role", 2)
  end

  local role = opts.role
  if role ~= "server" and role ~= "client" then
    error("wrap: role must be \"server\" or \"client\"", 2)
  end

  local close_timeout = opts.close_timeout or DEFAULT_CLOSE_TIMEOUT
  if type(close_timeout) ~= "number" or close_timeout <= 0 then
    error("wrap: close_timeout must be a number > 0", 2)
  end

  local parser = ws.parser({
    role = role,
    max_frame = check_size(opts, "max_frame"),
    max_message = check_size(opts, "max_message"),
  })

  return setmetatable({
    sock = sock,
    parser = parser,
    role = role,
    mask = role == "client",
    frame_size = check_size(opts, "frame_size"),
    auto_pong = opts.auto_pong ~= false,
    close_timeout = close_timeout,
    timeout = 0,
    writing = false,
    write_waiters = {},
    reading = false,
    close_sent = false,
    close_received = false,
    finished = false,
    peer_code = nil,
    peer_reason = nil,
    close_waiter = nil,
  }, Conn)
end


-- The writer lock: frames of one message must not interleave with frames
-- that another coroutine sends, such as an automatic pong.
local function lock(self)
  while self.writing do
    local w = waiter()
    insert(self.write_waiters, w)
    w:wait()
  end
  self.writing = true
end


local function unlock(self)
  self.writing = false
  local w = remove(self.write_waiters, 1)
  if w then
    w:wake()
  end
end


local function write_frame(self, kind, data, fin)
  if self.mask then
    return self.sock:write(encode_frame(kind, data, fin, true))
  end
  -- Header and payload in one writev: the payload is not copied.
  return self.sock:write({ frame_header(kind, #data, fin), data })
end


local function send_locked(self, frame)
  lock(self)
  local ok, err, code = self.sock:write(frame)
  unlock(self)
  return ok, err, code
end


-- Closes the socket once and wakes a close() waiting for the peer.
local function finish(self)
  if self.finished then
    return
  end
  self.finished = true
  self.sock:close()

  local w = self.close_waiter
  if w then
    self.close_waiter = nil
    w:wake(true)
  end
end


-- Sends a close frame unless one was sent already.
local function send_close(self, code, reason)
  if self.close_sent then
    return true
  end
  self.close_sent = true
  return send_locked(self, close_frame(code, reason, self.mask))
end


-- Ends the connection after the peer broke the protocol.
local function fail(self, message, code, close_code)
  close_code = close_code or CLOSE_PROTOCOL_ERROR
  send_close(self, close_code, nil)
  finish(self)
  return nil, message, code, close_code
end


local function on_close_frame(self, reason, code)
  self.close_received = true
  self.peer_code = code
  self.peer_reason = reason

  -- Echo the peer's code, as RFC 6455 section 5.5.1 suggests; a close
  -- without a code gets an empty close back.
  send_close(self, code, code and "" or nil)
  finish(self)
  return reason, "close", code, reason
end


-- Returns the next message or control frame as data, kind, where kind is
-- "text", "binary", "ping", "pong" or "close". A close adds code, reason
-- (code is nil when the peer sent none). With auto_pong a ping gets a pong
-- before recv returns it. A close gets a close frame in reply, and then the
-- socket is closed. Returns nil, message, code on a timeout (the
-- connection stays usable), and nil, message, code, close_code when the
-- connection ends: the close code sent for a violation, or 1006 when the
-- peer went away without a close frame.
function Conn:recv()
  if self.finished then
    return nil, "WebSocket connection is closed", "closed"
  end

  local parser = self.parser
  local sock = self.sock

  while true do
    local data, kind, code, close_code = parser:next()

    if data ~= nil then
      if kind == "ping" and self.auto_pong and not self.close_sent then
        send_locked(self, encode_frame("pong", data, true, self.mask))
      elseif kind == "close" then
        return on_close_frame(self, data, code)
      end
      return data, kind
    end

    if kind ~= nil then
      return fail(self, kind, code, close_code)
    end

    self.reading = true
    local chunk, err, rcode = sock:read(READ_SIZE)
    self.reading = false

    if not chunk then
      if rcode == "timeout" and not self.finished then
        return nil, err, rcode
      end
      finish(self)
      return nil, err, rcode, CLOSE_ABNORMAL
    end

    parser:feed(chunk)
  end
end


-- Sends data (a string) as one message; kind is "text" (the default,
-- data must be valid UTF-8) or "binary". Returns true or nil, message,
-- code.
function Conn:send(data, kind)
  kind = kind or "text"
  if type(data) ~= "string" then
    error("send: data must be a string", 2)
  end
  if kind ~= "text" and kind ~= "binary" then
    error("send: kind must be \"text\" or \"binary\"", 2)
  end
  if kind == "text" and not valid_utf8(data) then
    error("send: text must be valid UTF-8; send it as binary", 2)
  end
  if self.close_sent or self.finished then
    return nil, "WebSocket close frame already sent", "closed"
  end

  local n = #data
  local size = self.frame_size
  local ok, err, code

  lock(self)

  if not size or n <= size then
    ok, err, code = write_frame(self, kind, data, true)
  else
    local op = kind
    local i = 1
    while i <= n do
      local j = min(i + size - 1, n)
      ok, err, code = self.sock:write(
        encode_frame(op, data, j == n, self.mask, i, j))
      if not ok then
        break
      end
      op = "continuation"
      i = j + 1
    end
  end

  unlock(self)
  return ok, err, code
end


local function send_control(self, kind, data)
  data = data or ""
  if type(data) ~= "string" or #data > 125 then
    error(kind .. ": data must be a string of at most 125 bytes", 3)
  end
  if self.close_sent or self.finished then
    return nil, "WebSocket close frame already sent", "closed"
  end
  return send_locked(self, encode_frame(kind, data, true, self.mask))
end


-- Sends a ping with up to 125 bytes of data. Returns true or nil,
-- message, code.
function Conn:ping(data)
  return send_control(self, "ping", data)
end


-- Sends an unsolicited pong (a heartbeat that expects no reply).
function Conn:pong(data)
  return send_control(self, "pong", data)
end


-- Waits up to close_timeout seconds for the peer's close frame, reading
-- and dropping messages, or for a recv in another coroutine to see it.
local function await_peer_close(self)
  update_time()
  local deadline = now() + self.close_timeout

  if self.reading then
    local w = waiter()
    self.close_waiter = w
    local woken = w:wait(self.close_timeout)
    if not woken then
      self.close_waiter = nil
      return nil, "timed out waiting for the peer's close frame", "timeout"
    end
    return true
  end

  local sock = self.sock
  while not self.close_received do
    local left = deadline - now()
    if left <= 0 then
      sock:settimeout(self.timeout)
      return nil, "timed out waiting for the peer's close frame", "timeout"
    end

    sock:settimeout(left)
    local data, kind, code = self:recv()
    if data == nil then
      if not self.finished then
        sock:settimeout(self.timeout)
      end
      return nil, kind, code
    end
  end

  return true
end


-- Starts or completes the closing handshake: sends a close frame with
-- code (default 1000) and reason, waits up to close_timeout seconds for
-- the peer's close, then closes the socket. Returns true, peer_code,
-- peer_reason, or nil, message, code when the peer sent no close frame in time
-- (the socket is closed all the same). Raises on a code that may not be
-- sent (1005, 1006, 1015 and codes outside 1000-1003, 1007-1014,
-- 3000-4999) and on a reason over 123 bytes or not valid UTF-8.
function Conn:close(code, reason)
  code = code or 1000
  if not ws.valid_close_code(code) then
    error("close: code " .. tostring(code) .. " may not be sent; use "
          .. "1000-1003, 1007-1014 or 3000-4999", 2)
  end
  -- Encoding checks the reason; do it before anything is sent.
  local frame = close_frame(code, reason, self.mask)

  if self.finished then
    return true, self.peer_code, self.peer_reason
  end

  local ok, err, ecode = true, nil, nil
  if not self.close_sent then
    self.close_sent = true
    ok, err, ecode = send_locked(self, frame)
  end

  if ok and not self.close_received then
    ok, err, ecode = await_peer_close(self)
  end

  finish(self)

  if not ok then
    return nil, err, ecode
  end
  return true, self.peer_code, self.peer_reason
end


-- Sets the timeout in seconds for each later socket read and write; 0 or
-- nil waits forever.
function Conn:settimeout(seconds)
  self.timeout = seconds or 0
  self.sock:settimeout(self.timeout)
end


-- Returns true once the socket is closed.
function Conn:closed()
  return self.finished
end


return _M
