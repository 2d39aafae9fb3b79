-- /processes: background processes that outlive the request, the client
-- and a daemon restart. See process_table.lua for how they are run and
-- recorded.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local command = require("justavps.daemon.toolbox.command")
local ptable = require("justavps.daemon.toolbox.process_table")
local util = require("justavps.daemon.toolbox.util")

local type = type
local pcall = pcall
local error = error
local ipairs = ipairs
local tonumber = tonumber
local tostring = tostring
local floor = math.floor
local max = math.max
local min = math.min
local ioopen = io.open
local supper = string.upper
local smatch = string.match
local proc = core.proc

local _M = {}

-- Seconds a follow request streams at most, and its default.
_M.FOLLOW_MAX = 24 * 3600
_M.FOLLOW_DEFAULT = 3600
-- Seconds between checks for new log bytes while following.
local POLL_INTERVAL = 0.2
local CHUNK = 64 * 1024
local MAX_TEXT = 200

-- The wrapper that leads the process group. It catches the usual
-- termination signals only so that it outlives the command and records
-- its status. The command gets the default dispositions back, because
-- a shell resets caught signals in the programs it runs. The command
-- path always contains a slash, so the shell never runs a builtin of
-- the same name.
local WRAPPER = [[
log=$1; status=$2; shift 2
trap : HUP INT QUIT TERM USR1 USR2 ALRM
"$@" >>"$log" 2>&1 </dev/null
code=$?
printf '%s\n' "$code" >"$status"
]]

local SIGNALS = {
  HUP = true, INT = true, QUIT = true, KILL = true, TERM = true,
  USR1 = true, USR2 = true, CONT = true, STOP = true, ALRM = true,
  WINCH = true,
}

local fail = util.fail


local function view(entry)
  local log_path = ptable.log_path(entry.id)
  return {
    id = entry.id,
    name = entry.name,
    cmd = entry.cmd,
    args = json.array(entry.args or {}),
    cwd = entry.cwd,
    idempotency_key = entry.idempotency_key,
    pid = entry.pid,
    pgid = entry.pgid,
    status = entry.status,
    exit_code = entry.exit_code,
    signal = entry.signal,
    started_at = entry.started_at,
    ended_at = entry.ended_at,
    log_start = ptable.log_start(entry),
    log_end = ptable.file_size(log_path),
  }
end


local function not_found(id)
  return util.error_reply(fail(404, "not_found", "no process " .. id))
end


local function check_text(body, field)
  local value = body[field]
  if value ~= nil and (type(value) ~= "string" or #value > MAX_TEXT
      or value == "") then
    return nil, fail(400, "invalid_request", field .. " must be a "
      .. "non-empty string of at most " .. MAX_TEXT .. " bytes")
  end
  return true
end


-- Waits for a start with the same idempotency key that is still running
-- its slow steps. Returns the entry, or nil when that start failed.
local function await_start(entry)
  local deadline = core.now() + 60
  while entry.status == "starting" and core.now() < deadline do
    core.sleep(0.05)
  end
  if entry.status == "starting" or not ptable.get(entry.id) then
    return nil
  end
  return entry
end


local function launch(entry, body)
  local cmd, err = command.prepare(body)
  if not cmd then
    return nil, err
  end
  local ok, derr = ptable.make_dir(entry.id)
  if not ok then
    return nil, fail(500, "spawn_failed", "cannot create the log "
      .. "directory: " .. tostring(derr))
  end
  local log_path = ptable.log_path(entry.id)
  local f = ioopen(log_path, "ab")
  if f then
    f:close()
  end

  local args = { "-c", WRAPPER, "justavps-process", log_path,
    ptable.status_path(entry.id), cmd.file }
  for _, a in ipairs(cmd.args) do
    args[#args + 1] = a
  end
  local p, serr, scode = proc.spawn({
    file = "/bin/sh", args = args, env = cmd.env, cwd = cmd.cwd,
    stdin = "null", stdout = "null", stderr = "null", detached = true,
  })
  if not p then
    return nil, command.spawn_error(body.cmd, serr, scode)
  end
  ptable.started(entry, p, { cmd = body.cmd, args = cmd.args,
    cwd = cmd.cwd_rel })
  log.info("process started", { id = entry.id, pid = entry.pid,
    cmd = body.cmd, name = entry.name })
  return entry
end


-- POST /processes
function _M.start(req)
  local body, err = util.read_json(req)
  if not body then
    return util.error_reply(err)
  end
  for _, field in ipairs({ "name", "idempotency_key" }) do
    local ok, terr = check_text(body, field)
    if not ok then
      return util.error_reply(terr)
    end
  end

  local key = body.idempotency_key
  local existing = key and ptable.by_key(key)
  if existing then
    existing = await_start(existing)
    if existing then
      ptable.refresh(existing)
      return util.json_reply(200, view(existing))
    end
  end
  if ptable.count() >= ptable.MAX_ENTRIES then
    return util.error_reply(fail(429, "too_many_processes", "the table "
      .. "holds " .. ptable.MAX_ENTRIES .. " processes; delete exited ones "
      .. "or wait until they expire"))
  end

  local entry = ptable.reserve(key, body.name)
  local ok, result, lerr = pcall(launch, entry, body)
  if not ok or not result then
    ptable.remove(entry)
    if not ok then
      error(result, 0)
    end
    return util.error_reply(lerr)
  end
  return util.json_reply(201, view(entry))
end


-- GET /processes
function _M.list()
  local out = json.array()
  for _, entry in ipairs(ptable.list()) do
    out[#out + 1] = view(entry)
  end
  return util.json_reply(200, { processes = out })
end


-- GET /processes/ID
function _M.show(id)
  local entry = ptable.get(id)
  if not entry or entry.status == "starting" then
    return not_found(id)
  end
  if ptable.refresh(entry) then
    ptable.save()
  end
  return util.json_reply(200, view(entry))
end


-- DELETE /processes/ID: removes an exited process from the table and
-- deletes its log.
function _M.delete(id)
  local entry = ptable.get(id)
  if not entry or entry.status == "starting" then
    return not_found(id)
  end
  ptable.refresh(entry)
  if entry.status == "running" then
    return util.error_reply(fail(409, "process_running", "process " .. id
      .. " is still running; signal it first"))
  end
  ptable.remove(entry)
  return util.json_reply(200, { id = id, deleted = true })
end


local function parse_signal(value)
  if type(value) == "number" and value == floor(value) and value >= 1
      and value <= 64 then
    return value
  end
  if type(value) ~= "string" then
    return nil
  end
  local name = smatch(supper(value), "^SIG(%u+%d?)$")
    or smatch(supper(value), "^(%u+%d?)$")
  if name and SIGNALS[name] then
    return "SIG" .. name
  end
  return nil
end


-- POST /processes/ID/signal {"signal":"SIGTERM"}: signals the whole
-- process group.
function _M.signal(req, id)
  local body, err = util.read_json(req)
  if not body then
    return util.error_reply(err)
  end
  local entry = ptable.get(id)
  if not entry or entry.status == "starting" then
    return not_found(id)
  end
  local sig = parse_signal(body.signal == nil and "SIGTERM" or body.signal)
  if not sig then
    local requested = body.signal
    requested = (type(requested) == "string" or type(requested) == "number")
      and tostring(requested) or json.encode(requested) or type(requested)
    return util.error_reply(fail(400, "invalid_signal", "unknown signal "
      .. requested .. "; use a name such as SIGTERM or a number from 1 to "
      .. "64"))
  end

  if ptable.refresh(entry) then
    ptable.save()
  end
  -- The start time check keeps a reused pid from being signalled.
  if entry.status ~= "running" or not ptable.alive(entry) then
    return util.error_reply(fail(409, "process_not_running",
      "process " .. id .. " is not running"))
  end
  local ok, kerr, code = proc.kill(-entry.pgid, sig)
  if not ok then
    if code == "ESRCH" then
      return util.error_reply(fail(409, "process_not_running",
        "process " .. id .. " is not running"))
    end
    return util.error_reply(fail(500, "signal_failed", "cannot signal "
      .. "process " .. id .. ": " .. tostring(kerr)))
  end
  log.info("process signalled", { id = id, pgid = entry.pgid,
    signal = sig })
  return util.json_reply(200, { id = id, signal = sig })
end


-- Reads up to n bytes of the log at offset pos, or nil at its end.
local function read_at(f, pos, n)
  f:seek("set", pos)
  return f:read(n)
end


-- GET /processes/ID/logs?offset=N&follow=1&wait=SECONDS: the log bytes
-- from offset N. X-Log-Offset is the offset of the first byte sent: it
-- is above N when that part was already released. A follow response
-- ends when the process has exited and everything was sent, when wait
-- seconds passed, when the client goes away, or when the part not yet
-- sent is being released. The client resumes from X-Log-Offset plus the
-- bytes it received.
function _M.logs(req, id, query)
  local entry = ptable.get(id)
  if not entry or entry.status == "starting" then
    return not_found(id)
  end
  local offset = tonumber(query.offset or "0")
  if not offset or offset < 0 or offset ~= floor(offset) then
    return util.error_reply(fail(400, "invalid_request",
      "offset must be a whole number of bytes, 0 or more"))
  end
  local follow = util.flag(query.follow)
  local wait = tonumber(query.wait or "") or _M.FOLLOW_DEFAULT
  if wait <= 0 or wait > _M.FOLLOW_MAX then
    return util.error_reply(fail(400, "invalid_request", "wait must be "
      .. "more than 0 and at most " .. _M.FOLLOW_MAX .. " seconds"))
  end

  local path = ptable.log_path(id)
  local f = ioopen(path, "rb")
  if not f then
    return util.error_reply(fail(404, "not_found",
      "the log of process " .. id .. " is gone"))
  end
  if ptable.refresh(entry) then
    ptable.save()
  end

  local size = ptable.file_size(path)
  local pos = max(offset, ptable.log_start(entry))
  if pos > size and not follow then
    pos = size
  end
  local headers = {
    ["Content-Type"] = "application/octet-stream",
    ["Cache-Control"] = "no-store",
    ["X-Log-Offset"] = tostring(pos),
    ["X-Log-Start"] = tostring(ptable.log_start(entry)),
    ["X-Process-Status"] = entry.status,
  }
  if not follow then
    headers["Content-Length"] = tostring(size - pos)
    req:send_head(200, headers)
    while pos < size do
      local data = read_at(f, pos, min(CHUNK, size - pos))
      if not data then
        req:keepalive(false)
        break
      end
      pos = pos + #data
      if not req:write(data) then
        f:close()
        return
      end
    end
    f:close()
    return req:finish()
  end

  req:send_head(200, headers)
  core.update_time()
  local deadline = core.now() + wait
  local exited_seen = false
  while core.now() < deadline do
    if pos < ptable.log_start(entry) then
      break
    end
    local data = read_at(f, pos, CHUNK)
    if data then
      pos = pos + #data
      if not req:write(data) then
        f:close()
        return
      end
    elseif exited_seen then
      break
    else
      ptable.refresh(entry)
      -- One more read after the exit picks up the last bytes.
      exited_seen = entry.status ~= "running"
      if not exited_seen then
        core.sleep(POLL_INTERVAL)
      end
    end
  end
  f:close()
  return req:finish()
end


return _M
