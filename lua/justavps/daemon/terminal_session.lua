-- Terminal sessions: a login shell on a PTY whose output is kept in a
-- ring buffer, plus the one WebSocket client attached to it, if any.
--
-- Each session runs two coroutines. The reader moves PTY output into the
-- ring; the reaper waits for the shell to exit. Each attachment adds a
-- writer that sends the ring's bytes to its client from the client's
-- position. While a client is attached, the reader waits for its writer
-- to catch up before it reads again. So at most one read of output is
-- queued for a slow client, and the shell blocks on a full PTY instead
-- of the daemon buffering without bound. A detached session keeps reading,
-- and the ring keeps its newest bytes for a client that reattaches.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local ring = require("justavps.daemon.terminal_ring")

local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local floor = math.floor
local now = core.now
local update_time = core.update_time
local waiter = core.waiter
local spawn = core.spawn
local timer = core.timer
local random_token = core.crypto.random_token
local pty_spawn = core.pty.spawn

local _M = {}

-- Largest PTY read and largest binary frame sent, in bytes.
local READ_SIZE = 64 * 1024
local FRAME_SIZE = 64 * 1024

-- Seconds without output, after the shell has exited, before the reaper
-- closes a PTY that a background job keeps open.
local EXIT_DRAIN = 2

-- Maximum seconds between checks for sessions past their reattach window
-- or idle limit. A shorter limit is checked at a quarter of its length, so
-- an expiry comes at most a quarter of the limit late, and never later
-- than this.
local MAX_SWEEP_INTERVAL = 10
local MIN_SWEEP_INTERVAL = 0.25

local ID_LENGTH = 32

local DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
  .. ":/sbin:/bin"

-- Variables copied from the daemon's environment into the shell's.
local INHERITED_ENV = { "HOME", "USER", "LOGNAME", "PATH", "LANG", "LC_ALL",
  "TZ" }

-- Sessions by id, and their count.
local sessions = {}
local count = 0
local sweeper = nil

-- Limits, replaced by configure().
local settings = {
  buffer_size = 2 * 1024 * 1024,
  reattach_window = 300,
  idle_timeout = 0,
  ping_interval = 30,
  kill_grace = 5,
}


local function clock()
  update_time()
  return now()
end


-- Sets the limits that later sessions and sweeps use; see
-- terminal.lua for their meaning and defaults.
function _M.configure(opts)
  for k, v in pairs(opts) do
    settings[k] = v
  end
end


function _M.get(id)
  return sessions[id]
end


function _M.count()
  return count
end


-- Returns what GET /_pty/sessions shows of session s.
function _M.describe(s)
  local t = clock()
  return {
    id = s.id,
    pid = s.pid,
    cols = s.cols,
    rows = s.rows,
    attached = s.attachment ~= nil,
    exited = s.exited,
    output_bytes = s.ring.finish,
    idle_s = floor((t - s.active_at) * 10 + 0.5) / 10,
    detached_s = (not s.attachment and s.detached_at)
      and floor((t - s.detached_at) * 10 + 0.5) / 10 or nil,
  }
end


-- Returns every session, oldest first by pid.
function _M.list()
  local out = {}
  for _, s in pairs(sessions) do
    out[#out + 1] = s
  end
  table.sort(out, function(a, b)
    return a.pid < b.pid
  end)
  return out
end


local function shell_env(shell)
  local env = {}
  for _, name in ipairs(INHERITED_ENV) do
    env[name] = os.getenv(name)
  end
  env.PATH = env.PATH or DEFAULT_PATH
  env.LANG = env.LANG or "C.UTF-8"
  env.SHELL = shell
  env.TERM = "xterm-256color"
  env.COLORTERM = "truecolor"
  return env
end


-- Starts shell as a login shell, falling back to /bin/sh when it cannot
-- be run and to / when HOME cannot be entered. Returns the pty object and
-- the shell used, or nil, message.
local function spawn_shell(shell, cols, rows)
  local env = shell_env(shell)
  local cwd = env.HOME or "/"
  local term, err, code

  for _ = 1, 3 do
    term, err, code = pty_spawn({ file = shell, login = true, env = env,
      cwd = cwd, cols = cols, rows = rows })
    if term then
      return term, shell
    end

    if tostring(err):find("chdir failed", 1, true) and cwd ~= "/" then
      log.warn("cannot enter the home directory; the terminal starts in /",
        { home = cwd, error = err })
      cwd = "/"
    elseif tostring(err):find("exec failed", 1, true)
      and shell ~= "/bin/sh" then
      log.warn("cannot run the configured shell; using /bin/sh",
        { shell = shell, error = err, code = code })
      shell = "/bin/sh"
      env.SHELL = shell
    else
      break
    end
  end

  return nil, err
end


local function send_control(conn, message)
  return conn:send(json.encode(message), "text")
end


-- Returns the close reason for a shell that ended with status (128 + n
-- after signal n, as a shell reports it) and signal (a name or nil).
local function exit_reason(status, signal)
  if signal then
    return "shell exited with " .. status .. " (" .. signal .. ")"
  end
  return "shell exited with " .. status
end


local function stop_sweeper()
  if sweeper and count == 0 then
    sweeper:stop()
    sweeper = nil
  end
end


-- Closes the PTY once; later input and resizes are dropped.
local function close_io(s)
  if not s.io_closed then
    s.io_closed = true
    s.term:close()
  end
end


-- Removes the session; its shell has exited.
local function free(s, reason)
  if sessions[s.id] ~= s then
    return
  end
  sessions[s.id] = nil
  count = count - 1
  s.attachment = nil
  close_io(s)
  s.log.info("terminal session freed", { reason = reason })
  stop_sweeper()
end


-- Hangs the shell up, then kills its group after kill_grace seconds.
-- The reaper frees the session once the shell has exited.
local function kill(s, reason)
  if s.killing then
    return
  end
  s.killing = true
  s.log.info("terminal session expired; hanging up the shell",
    { reason = reason })

  if s.exited then
    free(s, reason)
    return
  end

  s.term:kill("SIGHUP")
  spawn(function()
    local status = s.term:wait(settings.kill_grace)
    if status == nil then
      s.log.warn("shell ignored SIGHUP; killing its process group",
        { grace_s = settings.kill_grace })
      s.term:kill("SIGKILL")
    end
  end)
end


-- Ends session s as the reattach window would: the shell is hung up,
-- and an attached client gets the exit frame and the close.
function _M.close(s, reason)
  kill(s, reason)
end


local function sweep()
  local t = clock()
  for _, s in pairs(sessions) do
    if not s.attachment and s.detached_at
      and t - s.detached_at >= settings.reattach_window then
      kill(s, "reattach_window")
    elseif settings.idle_timeout > 0
      and t - s.active_at >= settings.idle_timeout then
      kill(s, "idle_timeout")
    end
  end
end


local function sweep_interval()
  local shortest = settings.reattach_window
  if settings.idle_timeout > 0 and settings.idle_timeout < shortest then
    shortest = settings.idle_timeout
  end
  return math.max(MIN_SWEEP_INTERVAL,
    math.min(MAX_SWEEP_INTERVAL, shortest / 4))
end


local function start_sweeper()
  if not sweeper then
    local interval = sweep_interval()
    sweeper = timer(interval, sweep, interval)
  end
end


-- Moves PTY output into the ring until the terminal reports end of
-- stream.
local function run_reader(s)
  local io = s.term.io
  local r = s.ring

  while true do
    -- An attached client that is behind or has paused output blocks the
    -- reader.
    local att = s.attachment
    while att and (att.paused or att.pos < r.finish) do
      s.reader_wake:wait()
      att = s.attachment
    end

    if s.io_closed then
      break
    end
    s.reading = true
    local data, err, code = io:read(READ_SIZE)
    s.reading = false
    if not data then
      if code ~= "closed" then
        s.log.warn("terminal read failed", { error = err, code = code })
      end
      break
    end

    att = s.attachment
    r:append(data, att and att.pos)
    update_time()
    s.active_at = now()
    if att then
      att.wake:wake()
    end
  end

  s.eof = true
  s.eof_wake:wake()
end


-- Waits for the shell to exit and for the last output, then marks the
-- session exited so the attached writer sends the exit frame.
local function run_reaper(s)
  local status, signal = s.term:wait()
  s.status = status
  s.signal = signal

  -- The reader may be held back by a slow client; only a reader that
  -- waits EXIT_DRAIN seconds for output that never comes counts as stuck.
  while not s.eof do
    s.eof_wake:wait(EXIT_DRAIN)
    if not s.eof and s.reading
      and clock() - s.active_at >= EXIT_DRAIN then
      -- Something the shell left behind keeps the terminal open.
      s.log.info("a process left by the shell keeps the terminal open; "
        .. "hanging it up")
      s.term:kill("SIGHUP")
      break
    end
  end
  close_io(s)

  s.exited = true
  s.log.info("shell exited", { status = status, signal = signal,
    output_bytes = s.ring.finish })

  if s.attachment then
    s.attachment.wake:wake()
  elseif s.killing then
    free(s, "killed")
  end
end


-- Starts a new session with a login shell on a cols x rows terminal.
-- Returns the session or nil, message.
function _M.create(opts)
  local id, terr = random_token(ID_LENGTH)
  if not id then
    return nil, terr
  end

  local term, shell_or_err = spawn_shell(opts.shell, opts.cols, opts.rows)
  if not term then
    log.err("cannot start the terminal shell", { shell = opts.shell,
      error = shell_or_err })
    return nil, shell_or_err
  end

  local t = clock()
  local s = {
    id = id,
    term = term,
    pid = term:pid(),
    cols = opts.cols,
    rows = opts.rows,
    ring = ring.new(settings.buffer_size),
    attachment = nil,
    detached_at = t,
    active_at = t,
    reader_wake = waiter(),
    eof_wake = waiter(),
    eof = false,
    reading = false,
    exited = false,
    killing = false,
    io_closed = false,
  }
  s.log = log.with({ session = id, pid = s.pid })

  sessions[id] = s
  count = count + 1
  start_sweeper()

  s.log.info("terminal session started", { shell = shell_or_err,
    cols = opts.cols, rows = opts.rows })

  spawn(run_reader, s)
  spawn(run_reaper, s)
  return s
end


-- Ends a session whose client never attached (the upgrade failed).
function _M.discard(s)
  kill(s, "not_attached")
end


-- Sends the ring from att.pos to the client until the attachment ends.
-- Once the shell has exited and every byte is out, it sends the exit
-- frame, frees the session and closes the connection.
local function run_writer(s, att)
  local r = s.ring
  local conn = att.conn

  while s.attachment == att do
    if att.pos < r.start then
      -- The pin in Ring:append prevents this; if it ever happens the
      -- client must clear its screen rather than show a gap.
      s.log.alert("terminal output was dropped before it was sent",
        { pos = att.pos, start = r.start })
      send_control(conn, { type = "reset", seq = r.start })
      att.pos = r.start
    end

    if att.paused then
      att.wake:wait()

    elseif att.pos < r.finish then
      local chunk = r:slice(att.pos, FRAME_SIZE)
      local ok, err, code = conn:send(chunk, "binary")
      if not ok and code ~= "timeout" then
        -- A timeout leaves the frame queued; the recv loop judges
        -- whether the client is still there.
        s.log.info("terminal output write failed", { error = err,
          code = code })
        break
      end
      att.pos = att.pos + #chunk
      s.reader_wake:wake()

    elseif s.exited then
      local status = s.status
      send_control(conn, { type = "exit", code = status,
        signal = s.signal })
      free(s, "shell exited")
      conn:close(status == 0 and 1000 or 4001,
        exit_reason(status, s.signal))
      return

    else
      att.wake:wait()
    end
  end
end


-- Detaches att unless another client took over; the session keeps
-- running for the reattach window.
function _M.detach(s, att, reason)
  if att.ping then
    att.ping:stop()
    att.ping = nil
  end
  if s.attachment ~= att then
    return
  end
  s.attachment = nil
  s.detached_at = clock()
  att.wake:wake()
  s.reader_wake:wake()
  s.log.info("terminal client detached", { reason = reason,
    seq = att.pos })
end


-- Attaches conn to session s, taking it over from any client attached
-- before. since is the sequence number of the first byte the client
-- lacks (0 for a new session), or nil. With full true, or when since is
-- nil or older than the ring, the client gets a reset frame and the whole
-- ring. Sends the session frame and starts the writer and the ping timer.
-- Returns the attachment.
function _M.attach(s, conn, since, full)
  local old = s.attachment
  if old then
    _M.detach(s, old, "taken over")
    s.log.info("terminal client taken over by a new connection")
    spawn(function()
      old.conn:close(4000, "taken over")
    end)
  end

  local r = s.ring
  local reset = full or since == nil or since < r.start
  local pos = reset and r.start or since

  local att = {
    conn = conn,
    pos = pos,
    wake = waiter(),
    paused = false,
    received_at = clock(),
  }
  s.attachment = att
  s.detached_at = nil

  s.log.info("terminal client attached", { seq = pos,
    replay = reset and "full" or "since",
    buffered_bytes = r.finish - r.start })

  send_control(conn, { type = "session", id = s.id, seq = pos })
  if reset then
    send_control(conn, { type = "reset" })
  end

  local interval = settings.ping_interval
  if interval > 0 then
    att.ping = timer(interval, function()
      if s.attachment == att then
        conn:ping()
      end
    end, interval)
  end

  spawn(run_writer, s, att)
  return att
end


-- Writes keyboard input to the shell. Input after the shell has exited
-- is dropped.
function _M.input(s, data)
  if s.io_closed or s.exited or data == "" then
    return
  end
  s.active_at = now()
  local ok, err, code = s.term:write(data)
  if not ok then
    s.log.warn("terminal input write failed", { error = err, code = code })
  end
end


-- Sets the terminal size; the kernel sends SIGWINCH to the foreground
-- job.
function _M.resize(s, cols, rows)
  if s.io_closed then
    return
  end
  local ok, err, code = s.term:resize(cols, rows)
  if ok then
    s.cols = cols
    s.rows = rows
  else
    s.log.warn("terminal resize failed", { error = err, code = code })
  end
end


-- Stops or restarts output to the client (xterm.js flow control).
function _M.set_paused(s, att, paused)
  att.paused = paused
  att.wake:wake()
  s.reader_wake:wake()
end


return _M
