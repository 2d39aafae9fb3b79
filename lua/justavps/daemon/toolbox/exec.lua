-- POST /exec: runs one command and streams its output as NDJSON.
--
-- Each output line is {"stream":"stdout"|"stderr","data":TEXT}, or
-- "data_b64" with base64 when the piece is not valid UTF-8. The last
-- line is {"exit_code":N,"signal":NAME|null,"timed_out":BOOL}.
--
-- The command runs in its own process group, which the request owns. On
-- timeout the group gets SIGTERM, then SIGKILL after KILL_GRACE seconds.
-- When the command exits or the client goes away, whatever it left
-- running in the group is killed. Long-running work belongs in
-- /processes instead.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local command = require("justavps.daemon.toolbox.command")
local util = require("justavps.daemon.toolbox.util")

local type = type
local ipairs = ipairs
local ssub = string.sub
local proc = core.proc
local crypto = core.crypto

local _M = {}

-- Seconds a command may run when the request sets no timeout, and the
-- largest timeout a request may set.
_M.TIMEOUT = 60
_M.MAX_TIMEOUT = 3600
-- Seconds between SIGTERM and SIGKILL on timeout.
_M.KILL_GRACE = 2
-- Seconds between checks that the client is still connected.
_M.DISCONNECT_CHECK = 1
-- Output bytes queued for a slow client before reading the pipes pauses.
local MAX_QUEUED = 1024 * 1024
-- Seconds to wait for the pipes to close once the group is gone.
local DRAIN_SECONDS = 5

local fail = util.fail


local function check_body(body)
  local timeout = body.timeout
  if timeout == nil then
    timeout = _M.TIMEOUT
  end
  if type(timeout) ~= "number" or timeout <= 0
      or timeout > _M.MAX_TIMEOUT then
    return nil, fail(400, "invalid_request", "timeout must be a number "
      .. "of seconds, more than 0 and at most " .. _M.MAX_TIMEOUT)
  end
  if body.stdin ~= nil and type(body.stdin) ~= "string" then
    return nil, fail(400, "invalid_request", "stdin must be a string")
  end
  return timeout
end


-- Returns a queue of NDJSON lines with push(value) and a writer loop that
-- sends them until close() was called and the queue is empty.
local function new_stream(req, on_disconnect)
  local lines, head, tail = {}, 1, 0
  local s = { queued = 0, disconnected = false, closed = false }
  local wake = core.waiter()

  function s.push(value)
    local line = json.encode(value) .. "\n"
    tail = tail + 1
    lines[tail] = line
    s.queued = s.queued + #line
    wake:wake()
  end

  function s.close()
    s.closed = true
    wake:wake()
  end

  function s.run()
    while true do
      if head <= tail then
        local line = lines[head]
        lines[head] = nil
        head = head + 1
        s.queued = s.queued - #line
        if not s.disconnected and not req:write(line) then
          s.disconnected = true
          on_disconnect()
        end
      elseif s.closed then
        return
      else
        wake:wait()
      end
    end
  end

  return s
end


-- Reads one pipe and pushes its output. A UTF-8 sequence cut at the end
-- of a read is held back for the next read.
local function pump(sock, name, stream)
  local pending = ""
  while true do
    local chunk = sock:read()
    if not chunk then
      break
    end
    local data = pending .. chunk
    pending = ""
    local valid, partial = util.utf8_prefix(data)
    if valid == #data then
      stream.push({ stream = name, data = data })
    elseif partial then
      if valid > 0 then
        stream.push({ stream = name, data = ssub(data, 1, valid) })
      end
      pending = ssub(data, valid + 1)
    else
      stream.push({ stream = name, data_b64 = crypto.base64_encode(data) })
    end
    while stream.queued > MAX_QUEUED and not stream.disconnected do
      core.sleep(0.02)
    end
  end
  if pending ~= "" then
    stream.push({ stream = name, data_b64 = crypto.base64_encode(pending) })
  end
end


function _M.handle(req)
  local body, err = util.read_json(req)
  if not body then
    return util.error_reply(err)
  end
  local timeout, terr = check_body(body)
  if not timeout then
    return util.error_reply(terr)
  end
  local cmd, cerr = command.prepare(body)
  if not cmd then
    return util.error_reply(cerr)
  end

  local p, serr, scode = proc.spawn({
    file = cmd.file, args = cmd.args, env = cmd.env, cwd = cmd.cwd,
    stdin = body.stdin and "pipe" or "null", stdout = "pipe",
    stderr = "pipe", detached = true,
  })
  if not p then
    return util.error_reply(command.spawn_error(body.cmd, serr, scode))
  end
  local pid = p:pid()
  log.info("exec started", { pid = pid, cmd = body.cmd, cwd = cmd.cwd_rel,
    req_id = req.id })

  local stream = new_stream(req, function()
    p:kill("SIGKILL", true)
  end)

  -- A command that prints nothing would not notice a client that left
  -- through a failed write, so the connection is checked as well.
  core.spawn(function()
    while not stream.closed and not stream.disconnected do
      core.sleep(_M.DISCONNECT_CHECK)
      if not stream.closed and not stream.disconnected
          and req:peer_closed() then
        stream.disconnected = true
        log.info("exec client went away", { pid = pid, req_id = req.id })
        p:kill("SIGKILL", true)
      end
    end
  end)
  req:send_head(200, { ["Content-Type"] = "application/x-ndjson",
    ["Cache-Control"] = "no-store" })

  if body.stdin then
    core.spawn(function()
      p.stdin:write(body.stdin)
      p.stdin:close()
    end)
  end

  local open_pipes = 2
  for _, name in ipairs({ "stdout", "stderr" }) do
    core.spawn(function()
      pump(p[name], name, stream)
      open_pipes = open_pipes - 1
    end)
  end

  local timed_out = false
  local kill_timer
  local timer = core.timer(timeout, function()
    timed_out = true
    p:kill("SIGTERM", true)
    kill_timer = core.timer(_M.KILL_GRACE, function()
      p:kill("SIGKILL", true)
    end)
  end)

  core.spawn(function()
    local status, signal = p:wait()
    timer:stop()
    if kill_timer then
      kill_timer:stop()
    end
    -- Descendants left in the group would keep the pipes open.
    p:kill("SIGKILL", true)

    core.update_time()
    local deadline = core.now() + DRAIN_SECONDS
    while open_pipes > 0 and core.now() < deadline do
      core.sleep(0.02)
    end
    p.stdout:close()
    p.stderr:close()

    stream.push({ exit_code = status, signal = signal or json.null,
      timed_out = timed_out })
    stream.close()
    log.info("exec finished", { pid = pid, exit_code = status,
      signal = signal, timed_out = timed_out, req_id = req.id })
  end)

  stream.run()
  if stream.disconnected then
    -- The connection is closed, so the request is already over.
    return
  end
  return req:finish()
end


return _M
