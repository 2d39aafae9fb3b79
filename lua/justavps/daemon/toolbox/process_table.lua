-- The table of background processes started through /processes, kept in
-- memory and saved as JSON in state_dir/processes/table.json, so that a
-- restarted daemon lists the processes it started before.
--
-- Each process runs under a small /bin/sh wrapper that leads its own
-- process group, appends the command's stdout and stderr to
-- state_dir/processes/ID/output.log, and writes the exit status to
-- state_dir/processes/ID/exit_status when the command ends. The output
-- and the status therefore reach disk while the daemon is stopped. A
-- process counts as running while /proc/PID exists with the boot id and
-- start time recorded at spawn, so a reused pid is never taken for it.
--
-- A sweeper runs every SWEEP_INTERVAL seconds. It records exits, keeps
-- each log below MAX_LOG bytes on disk, and removes exited processes from
-- the table after RETENTION seconds.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local state = require("justavps.daemon.state")
local util = require("justavps.daemon.toolbox.util")

local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local tonumber = tonumber
local tostring = tostring
local floor = math.floor
local ioopen = io.open
local oremove = os.remove
local orename = os.rename
local smatch = string.match
local sgmatch = string.gmatch
local sort = table.sort
local crypto = core.crypto

local _M = {}

local MODULE = "justavps.daemon.toolbox.process_table"

-- Seconds an exited process stays listed, with its exit status and log.
_M.RETENTION = 3600
-- Bytes of log kept on disk per process. Once a log passes MAX_LOG, its
-- oldest part is released so that about MAX_LOG / 2 bytes remain.
-- NOTE: the sweeper enforces this once per SWEEP_INTERVAL, so a fast
-- writer can pass it in between, and nothing enforces it while the
-- daemon is stopped.
_M.MAX_LOG = 8 * 1024 * 1024
-- Maximum number of entries in the table, running and exited.
_M.MAX_ENTRIES = 256
_M.SWEEP_INTERVAL = 1

local FALLOCATE = "/usr/bin/fallocate"
local MKDIR = "/bin/mkdir"
local BLOCK = 4096

-- Signal numbers of Linux on x86 and ARM, for exit statuses 128 + n.
local SIGNAL_NAMES = {
  [1] = "SIGHUP", [2] = "SIGINT", [3] = "SIGQUIT", [4] = "SIGILL",
  [6] = "SIGABRT", [8] = "SIGFPE", [9] = "SIGKILL", [10] = "SIGUSR1",
  [11] = "SIGSEGV", [12] = "SIGUSR2", [13] = "SIGPIPE", [14] = "SIGALRM",
  [15] = "SIGTERM",
}

-- entries[id] = entry; by_key[idempotency_key] = entry.
local entries = nil
local by_key = {}
-- Process objects of the processes this generation spawned, by id.
local children = {}
local punch_failed = false


local function dir()
  return state.conf.state_dir .. "/processes"
end


function _M.process_dir(id)
  return dir() .. "/" .. id
end


function _M.log_path(id)
  return _M.process_dir(id) .. "/output.log"
end


function _M.status_path(id)
  return _M.process_dir(id) .. "/exit_status"
end


local function read_file(path)
  local f = ioopen(path, "rb")
  if not f then
    return nil
  end
  local data = f:read("*a")
  f:close()
  return data
end


-- Returns the size of the file at path, or 0 when it cannot be opened.
function _M.file_size(path)
  local f = ioopen(path, "rb")
  if not f then
    return 0
  end
  local size = f:seek("end")
  f:close()
  return size or 0
end


local function boot_id()
  local id = read_file("/proc/sys/kernel/random/boot_id")
  return id and smatch(id, "^%s*(.-)%s*$")
end


-- Returns the start time of pid in clock ticks since boot, and whether
-- it is a zombie, read from /proc/PID/stat. Returns nil when there is no
-- such pid.
function _M.start_ticks(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if not stat then
    return nil
  end
  -- The command name in parentheses may contain spaces and ")".
  local rest = smatch(stat, ".*%)%s+(.*)$")
  if not rest then
    return nil
  end
  local fields = {}
  for word in sgmatch(rest, "%S+") do
    fields[#fields + 1] = word
  end
  return fields[20], fields[1] == "Z"
end


-- Returns true while the process that entry describes still runs.
function _M.alive(entry)
  if entry.boot_id ~= boot_id() then
    return false
  end
  local ticks, zombie = _M.start_ticks(entry.pid)
  return ticks ~= nil and ticks == entry.start_ticks and not zombie
end


local function current()
  return package.loaded[MODULE] == _M
end


-- Writes the table to disk through a temporary file and a rename. A
-- generation replaced by a reload writes nothing, so it cannot overwrite
-- the table of the current one.
function _M.save()
  if not entries or not current() then
    return
  end
  local list = json.array()
  for _, entry in pairs(entries) do
    if entry.status ~= "starting" then
      list[#list + 1] = entry
    end
  end
  local path = dir() .. "/table.json"
  local tmp = path .. ".tmp"
  local f, err = ioopen(tmp, "wb")
  if not f then
    log.err("cannot save the process table", { path = tmp, error = err })
    return
  end
  f:write(json.encode({ processes = list }))
  f:close()
  local ok, rerr = orename(tmp, path)
  if not ok then
    log.err("cannot save the process table", { path = path, error = rerr })
  end
end


local function mark_exited(entry, code, signal)
  entry.status = "exited"
  entry.exit_code = code
  if not signal and code and code > 128 then
    signal = SIGNAL_NAMES[code - 128]
  end
  entry.signal = signal
  entry.ended_at = core.time()
  children[entry.id] = nil
  log.info("process exited", { id = entry.id, pid = entry.pid,
    exit_code = code, signal = signal })
end


-- Updates entry from the exit status file, the process object (for
-- processes this generation spawned) and /proc. Returns true when the
-- entry changed.
function _M.refresh(entry)
  if entry.status ~= "running" then
    return false
  end
  local text = read_file(_M.status_path(entry.id))
  local code = text and tonumber(smatch(text, "^%s*(%d+)"))
  if code then
    mark_exited(entry, code)
    return true
  end

  local child = children[entry.id]
  if child then
    if child:exited() then
      mark_exited(entry, child:wait())
      return true
    end
    return false
  end
  if not _M.alive(entry) then
    -- The wrapper ended without writing a status: killed by SIGKILL, or
    -- the machine rebooted.
    mark_exited(entry, nil)
    return true
  end
  return false
end


-- Loads the table from disk on first use and re-adopts the processes in
-- it. Returns the entries table.
function _M.entries()
  if entries then
    return entries
  end
  entries, by_key = {}, {}
  local text = read_file(dir() .. "/table.json")
  local data = text and json.decode(text)
  if text and type(data) ~= "table" then
    log.err("ignoring an unreadable process table",
      { path = dir() .. "/table.json" })
  end
  local adopted, changed = 0, false
  for _, entry in ipairs(type(data) == "table" and data.processes or {}) do
    if type(entry) == "table" and type(entry.id) == "string"
        and entry.pid then
      entries[entry.id] = entry
      if entry.idempotency_key then
        by_key[entry.idempotency_key] = entry
      end
      changed = _M.refresh(entry) or changed
      if entry.status == "running" then
        adopted = adopted + 1
      end
    end
  end
  if text then
    log.info("loaded the process table", { adopted = adopted })
  end
  if changed then
    _M.save()
  end
  return entries
end


function _M.get(id)
  return _M.entries()[id]
end


function _M.by_key(key)
  _M.entries()
  return by_key[key]
end


-- Returns the entries sorted by start time.
function _M.list()
  local list = {}
  for _, entry in pairs(_M.entries()) do
    if entry.status ~= "starting" then
      _M.refresh(entry)
      list[#list + 1] = entry
    end
  end
  sort(list, function(a, b)
    if a.started_at == b.started_at then
      return a.id < b.id
    end
    return a.started_at < b.started_at
  end)
  return list
end


function _M.count()
  local n = 0
  for _ in pairs(_M.entries()) do
    n = n + 1
  end
  return n
end


-- Adds a placeholder entry before the slow steps of a start, so that a
-- retry with the same idempotency key finds it.
function _M.reserve(key, name)
  local entry = {
    id = crypto.hex_encode(crypto.random_bytes(8)),
    name = name, idempotency_key = key, status = "starting",
  }
  _M.entries()[entry.id] = entry
  if key then
    by_key[key] = entry
  end
  return entry
end


function _M.remove(entry)
  _M.entries()[entry.id] = nil
  if entry.idempotency_key and by_key[entry.idempotency_key] == entry then
    by_key[entry.idempotency_key] = nil
  end
  children[entry.id] = nil
  oremove(_M.log_path(entry.id))
  oremove(_M.status_path(entry.id))
  oremove(_M.process_dir(entry.id))
  _M.save()
end


-- Creates state_dir/processes/ID. Returns true or nil, message.
function _M.make_dir(id)
  local result, err = util.run(MKDIR, { "-p", "--", _M.process_dir(id) })
  if not result then
    return nil, err
  end
  if result.status ~= 0 then
    return nil, result.stderr
  end
  return true
end


-- Records a spawned process in its reserved entry and watches for its
-- exit.
function _M.started(entry, p, fields)
  for k, v in pairs(fields) do
    entry[k] = v
  end
  entry.pid = p:pid()
  entry.pgid = entry.pid
  entry.start_ticks = _M.start_ticks(entry.pid)
  entry.boot_id = boot_id()
  entry.started_at = core.time()
  entry.status = "running"
  entry.log_start = 0
  children[entry.id] = p
  _M.save()

  core.spawn(function()
    p:wait()
    if current() and _M.refresh(entry) then
      _M.save()
    end
  end)
end


-- Returns the first log offset still on disk: reads below it would
-- return the zeros of released blocks.
function _M.log_start(entry)
  local start = entry.log_start or 0
  if entry.releasing_to and entry.releasing_to > start then
    return entry.releasing_to
  end
  return start
end


-- Releases the disk blocks of the oldest part of a log with
-- fallocate --punch-hole. Offsets stay as they were: the file keeps its
-- size, and log_start moves up to the first byte still kept.
local function bound_log(entry)
  local path = _M.log_path(entry.id)
  local size = _M.file_size(path)
  local start = entry.log_start or 0
  if size - start <= _M.MAX_LOG or punch_failed then
    return false
  end
  local new_start = floor((size - _M.MAX_LOG / 2) / BLOCK) * BLOCK
  entry.releasing_to = new_start
  local result, err = util.run(FALLOCATE, { "--punch-hole", "--offset",
    tostring(start), "--length", tostring(new_start - start), "--", path })
  entry.releasing_to = nil
  if not result or result.status ~= 0 then
    -- NOTE: on a file system without punch-hole support, logs grow
    -- without bound.
    punch_failed = true
    log.err("cannot release old log blocks; logs are no longer bounded",
      { id = entry.id, path = path,
        error = result and result.stderr or err })
    return false
  end
  entry.log_start = new_start
  return true
end


function _M.sweep()
  local changed = false
  local now = core.time()
  for _, entry in pairs(_M.entries()) do
    if entry.status == "running" then
      changed = _M.refresh(entry) or changed
      changed = bound_log(entry) or changed
    elseif entry.status == "exited" then
      if now - (entry.ended_at or now) > _M.RETENTION then
        log.info("forgetting an exited process", { id = entry.id })
        _M.remove(entry)
      end
    end
  end
  if changed then
    _M.save()
  end
end


-- Starts the sweeper. It stops itself once a reload has replaced this
-- module.
function _M.start_sweeper()
  local timer
  local busy = false
  timer = core.timer(_M.SWEEP_INTERVAL, function()
    if not current() then
      timer:stop()
      return
    end
    if busy or not state.conf then
      return
    end
    busy = true
    local ok, err = pcall(_M.sweep)
    busy = false
    if not ok then
      log.err("process sweep failed", { error = err })
    end
  end, _M.SWEEP_INTERVAL)
end


return _M
