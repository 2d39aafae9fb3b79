-- Self-update of the daemon binary, offered by the platform in a heartbeat
-- reply as { version, url, sha256 }.
--
-- apply: skip the running version; download beside the installed binary
-- (same file system, so the final rename is atomic); check the SHA-256 while
-- streaming; chmod 755; run the file with --version and require
-- "justavps <version>"; keep the old binary as <installed>.bak (a hard
-- link); write a probation marker; start a rollback watchdog; rename the
-- new file over the installed path (the running process keeps its inode,
-- so there is no "text file busy"); restart.
--
-- Probation: the marker <state_dir>/update-probation.json contains the old
-- and new versions and a deadline. The restarted daemon calls check_probation
-- at startup. It confirms the update once it has answered its own health
-- check and sent a heartbeat with the new version, by removing the marker.
-- When the deadline passes with the marker still there, the watchdog (a
-- shell script that does not depend on the new binary starting at all)
-- moves <installed>.bak back and restarts.
--
-- Outcomes are appended as JSON lines to <state_dir>/update-events.jsonl
-- ({ type = applied | rolled_back | skipped | failed, version, previous,
-- reason, at }) so that they survive restarts; heartbeats send them and
-- acknowledge them with ack_events.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local machine_sig = require("justavps.machine_sig")
local metrics = require("justavps.daemon.metrics")

local crypto = core.crypto
local floor = math.floor
local tostring = tostring
local tonumber = tonumber
local ipairs = ipairs
local type = type
local pcall = pcall
local open = io.open
local remove = os.remove
local sfind = string.find
local smatch = string.match
local ssub = string.sub
local lower = string.lower
local concat = table.concat
local unpack = unpack

local _M = {}

_M.DEFAULTS = {
  installed_path = "/usr/local/bin/justavps-daemon",
  -- Seconds the new version has to confirm itself after the swap.
  probation = 120,
  -- Seconds after a failed attempt before any new one.
  cooldown = 60,
  max_size = 256 * 1024 * 1024,
  download_timeout = 60,
  version_timeout = 10,
  -- Arguments the binary is restarted with when there is no systemd.
  reexec_args = { "daemon", "--config", "/etc/justavps/config.json" },
}

local MARKER = "update-probation.json"
local EVENTS = "update-events.jsonl"
local COOLDOWN_FILE = "update-cooldown"
local MAX_REDIRECTS = 3
-- Seconds the in-process check waits past the deadline for the watchdog
-- before it rolls back itself.
local ROLLBACK_GRACE = 5

-- Module state; the daemon marks this module stable, so reloads keep it.
local state = {
  busy = false,
  cooldown_until = nil,
  skipped_version = nil,
  probation = nil,
}


local function option(opts, name)
  local v = opts[name]
  if v == nil then
    return _M.DEFAULTS[name]
  end
  return v
end


local function path_join(dir, name)
  return dir .. "/" .. name
end


local function read_all(path)
  local f = open(path, "rb")
  if not f then
    return nil
  end
  local data = f:read("*a")
  f:close()
  return data
end


local function write_atomic(path, data)
  local tmp = path .. ".tmp"
  local f, err = open(tmp, "wb")
  if not f then
    return nil, err
  end
  f:write(data)
  f:close()
  local ok, rerr = os.rename(tmp, path)
  if not ok then
    remove(tmp)
    return nil, rerr
  end
  return true
end


-- Events ---------------------------------------------------------------

-- Appends an outcome to the events file. event: { type, version,
-- previous, reason }. Returns nothing; a write failure is logged.
function _M.record_event(state_dir, event)
  event.at = event.at or floor(core.time())
  local line = json.encode(event)
  local f, err = open(path_join(state_dir, EVENTS), "ab")
  if not f then
    log.err("cannot record an update event", { error = err,
      event = event.type })
    return
  end
  f:write(line, "\n")
  f:close()
  local write = (event.type == "failed" or event.type == "rolled_back")
    and log.warn or log.info
  write("update " .. tostring(event.type), { version = event.version,
    previous = event.previous, reason = event.reason })
end


-- Returns the recorded events not yet acknowledged, oldest first, and how
-- many lines they came from (for ack_events).
function _M.pending_events(state_dir)
  local list = json.array()
  local text = read_all(path_join(state_dir, EVENTS))
  if not text then
    return list, 0
  end
  local lines = 0
  for line in text:gmatch("[^\n]+") do
    lines = lines + 1
    local event = json.decode(line)
    if type(event) == "table" then
      list[#list + 1] = event
    end
  end
  return list, lines
end


-- Drops the first count lines of the events file, once a heartbeat that
-- carried them was accepted. Lines appended meanwhile are kept.
function _M.ack_events(state_dir, count)
  if count <= 0 then
    return
  end
  local path = path_join(state_dir, EVENTS)
  local text = read_all(path)
  if not text then
    return
  end
  local rest, n = {}, 0
  for line in text:gmatch("[^\n]+") do
    n = n + 1
    if n > count then
      rest[#rest + 1] = line .. "\n"
    end
  end
  if #rest == 0 then
    remove(path)
  else
    write_atomic(path, concat(rest))
  end
end


-- Cooldown --------------------------------------------------------------

local function cooldown_left(state_dir)
  local now = core.time()
  if not state.cooldown_until then
    -- The watchdog of a rolled-back update writes the file, and a restart
    -- loses the in-memory value.
    state.cooldown_until = tonumber(read_all(path_join(state_dir,
      COOLDOWN_FILE)) or "") or 0
  end
  return state.cooldown_until - now
end


local function start_cooldown(state_dir, seconds)
  state.cooldown_until = core.time() + seconds
  write_atomic(path_join(state_dir, COOLDOWN_FILE),
    tostring(floor(state.cooldown_until)) .. "\n")
end


-- URLs -----------------------------------------------------------------

local function is_ip_literal(host)
  return sfind(host, "^%d+%.%d+%.%d+%.%d+$") ~= nil or sfind(host, ":")
end


-- Resolves a host name through the system's resolver (NSS) with getent,
-- because core.http.request takes IP literals only. Must run in a core
-- coroutine.
local function resolve(host)
  if not sfind(host, "^[%w.-]+$") or ssub(host, 1, 1) == "-" then
    return nil, "invalid host name " .. host
  end
  local out, err = metrics.run_command("getent", { "ahosts", host }, 10)
  if not out then
    return nil, "cannot resolve " .. host .. ": " .. tostring(err)
  end
  local address = smatch(out, "^(%S+)")
  if not address then
    return nil, "cannot resolve " .. host .. ": no address"
  end
  return address
end


-- Splits an http or https URL into the options of core.http.request:
-- { host, port, path, tls, server_name }. Host names are resolved. opts.ca
-- is the CA file for https (default OpenSSL's). Returns the table or nil,
-- message. Must run in a core coroutine when the host is a name.
function _M.http_target(url, opts)
  opts = opts or {}
  local scheme, authority, path = smatch(url, "^(%a[%w+.-]*)://([^/?#]+)(.*)$")
  if not scheme then
    return nil, "invalid URL " .. url .. ": expected http:// or https://"
  end
  scheme = lower(scheme)
  if scheme ~= "http" and scheme ~= "https" then
    return nil, "unsupported URL scheme " .. scheme .. " in " .. url
  end

  local host, port = smatch(authority, "^%[([%x:.]+)%]:?(%d*)$")
  if not host then
    host, port = smatch(authority, "^([^:@]+):?(%d*)$")
  end
  if not host then
    return nil, "invalid host in URL " .. url
  end
  port = tonumber(port) or (scheme == "https" and 443 or 80)
  if path == "" then
    path = "/"
  end
  path = smatch(path, "^[^#]*")

  local target = { host = lower(host), port = port, path = path }
  if not is_ip_literal(target.host) then
    local address, err = resolve(target.host)
    if not address then
      return nil, err
    end
    target.server_name = target.host
    target.host = address
  end

  if scheme == "https" then
    local ctx, err = core.tls.client_context({ ca = opts.ca })
    if not ctx then
      return nil, "TLS client context: " .. tostring(err)
    end
    target.tls = ctx
    -- NOTE: an https URL with an IP literal is checked against that IP as
    -- the certificate name, which few certificates carry.
    target.server_name = target.server_name or target.host
  end
  return target
end


-- Download -------------------------------------------------------------

local function fetch(url, opts, redirects)
  local target, err = _M.http_target(url, opts)
  if not target then
    return nil, err
  end
  local res, rerr, code = core.http.request({
    method = "GET", host = target.host, port = target.port,
    path = target.path, tls = target.tls, server_name = target.server_name,
    timeout = option(opts, "download_timeout"),
  })
  if not res then
    return nil, "download of " .. url .. " failed: " .. tostring(rerr)
      .. " (" .. tostring(code) .. ")"
  end
  local location = res:header("location")
  if res.status >= 300 and res.status < 400 and location then
    res:close()
    if redirects >= MAX_REDIRECTS then
      return nil, "download of " .. url .. ": too many redirects"
    end
    if not sfind(location, "^%a[%w+.-]*://") then
      return nil, "download of " .. url .. ": relative redirect to "
        .. location .. " is not supported"
    end
    return fetch(location, opts, redirects + 1)
  end
  if res.status ~= 200 then
    res:close()
    return nil, "download of " .. url .. " returned status " .. res.status
  end
  return res
end


-- Streams url into path, hashing as it goes. Returns the lowercase hex
-- SHA-256, or nil, message.
local function download(url, path, opts)
  local res, err = fetch(url, opts, 0)
  if not res then
    return nil, err
  end
  local f, ferr = open(path, "wb")
  if not f then
    res:close()
    return nil, "cannot write " .. path .. ": " .. tostring(ferr)
  end

  local hash = crypto.sha256_new()
  local size, max = 0, option(opts, "max_size")
  local failure
  while true do
    local chunk, rerr = res:read()
    if not chunk then
      if rerr then
        failure = "download of " .. url .. " broke off: " .. rerr
      end
      break
    end
    size = size + #chunk
    if size > max then
      failure = "download of " .. url .. " is larger than " .. max
        .. " bytes"
      break
    end
    hash:update(chunk)
    local ok, werr = f:write(chunk)
    if not ok then
      failure = "cannot write " .. path .. ": " .. tostring(werr)
      break
    end
  end
  res:close()
  local closed, cerr = f:close()
  if not failure and not closed then
    failure = "cannot write " .. path .. ": " .. tostring(cerr)
  end
  local digest = crypto.hex_encode(hash:final())
  if failure then
    return nil, failure
  end
  return digest
end


-- Restart and watchdog --------------------------------------------------

local function default_restart_command()
  if metrics.systemd_running() then
    -- --no-block: stopping the unit kills this process and systemctl
    -- with it, so systemctl must not wait for the restart job.
    return { "systemctl", "--no-block", "restart", "justavps-daemon" }
  end
  return "reexec"
end


local function restart_command(opts)
  return opts.restart_command or default_restart_command()
end


-- The rollback watchdog. Arguments: SECONDS MARKER INSTALLED BACKUP EVENTS
-- COOLDOWN_FILE COOLDOWN FROM TO MODE [ARGS...]. After SECONDS, if MARKER
-- still exists, it moves BACKUP back to INSTALLED, records a rolled_back
-- event and a cooldown, and restarts. MODE "command": ARGS is the restart
-- command. MODE "reexec": ARGS is OLD_PID, then the daemon's arguments.
-- The script waits for OLD_PID to exit and starts INSTALLED itself. On a
-- rollback it stops that process before it starts the old binary.
-- Versions are checked against VERSION_PATTERN, so they need no escaping
-- inside the JSON line.
local WATCHDOG = [=[
seconds=$1 marker=$2 installed=$3 backup=$4 events=$5
cooldown_file=$6 cooldown=$7 from=$8 to=$9
shift 9
mode=$1
shift
child=
if [ "$mode" = reexec ]; then
  old_pid=$1
  shift
  while kill -0 "$old_pid" 2>/dev/null; do sleep 0.2; done
  "$installed" "$@" &
  child=$!
fi
sleep "$seconds"
[ -f "$marker" ] || exit 0
if [ -n "$child" ]; then
  kill "$child" 2>/dev/null
  wait "$child"
fi
mv -f "$backup" "$installed" || exit 1
rm -f "$marker"
now=$(date +%s)
echo $((now + cooldown)) > "$cooldown_file"
format='{"type":"rolled_back","version":"%s","previous":"%s",'
format=$format'"reason":"%s","at":%s}\n'
printf "$format" "$to" "$from" \
  "the new version did not pass its health check and send a heartbeat in time" \
  "$now" >> "$events"
if [ "$mode" = reexec ]; then
  exec "$installed" "$@"
fi
exec "$@"
]=]


-- Starts the watchdog. Returns the process object, or nil, message.
local function start_watchdog(marker, installed, backup, from, to, opts)
  local state_dir = opts.state_dir
  local command = restart_command(opts)
  local probation = option(opts, "probation")
  local args = { "-c", WATCHDOG, "sh", tostring(probation), marker,
    installed, backup, path_join(state_dir, EVENTS),
    path_join(state_dir, COOLDOWN_FILE), tostring(option(opts, "cooldown")),
    from, to }

  if command == "reexec" then
    args[#args + 1] = "reexec"
    args[#args + 1] = tostring(core.proc.getpid())
    for _, a in ipairs(option(opts, "reexec_args")) do
      args[#args + 1] = a
    end
  else
    args[#args + 1] = "command"
    for _, a in ipairs(command) do
      args[#args + 1] = a
    end
  end

  local file = "sh"
  local watchdog = option(opts, "watchdog")
  if watchdog == nil then
    watchdog = metrics.systemd_running() and "systemd-run" or "detached"
  end
  if watchdog == "systemd-run" then
    -- A process of this unit would die with it on restart, so the watchdog
    -- runs as a transient unit of its own. The timer replaces the sleep.
    -- NOTE: not run by the specs, which have no systemd.
    args[4] = "0"
    local wrapped = { "--quiet", "--collect",
      "--on-active=" .. probation .. "s", "/bin/sh" }
    for _, a in ipairs(args) do
      wrapped[#wrapped + 1] = a
    end
    file, args = "systemd-run", wrapped
  end

  local p, err = core.proc.spawn({ file = file, args = args,
    detached = true, stdout = "inherit", stderr = "inherit" })
  if not p then
    return nil, "cannot start the rollback watchdog: " .. tostring(err)
  end
  return p
end


local function run_restart(opts)
  local command = restart_command(opts)
  if command == "reexec" then
    -- The watchdog starts the new binary once this process has exited.
    log.info("update installed; stopping so the new binary can start")
    core.proc.kill(core.proc.getpid(), "SIGTERM")
    return true
  end
  local out, err = metrics.run_command(command[1],
    { unpack(command, 2) }, 60)
  if not out then
    return nil, "restart command failed: " .. tostring(err)
  end
  return true
end


-- Apply -----------------------------------------------------------------

local VERSION_PATTERN = "^[%w][%w.+-]*$"


local function check_update(update)
  if type(update) ~= "table" then
    return nil, "update must be an object"
  end
  local v, url, sha = update.version, update.url, update.sha256
  if type(v) ~= "string" or #v > 64 or not sfind(v, VERSION_PATTERN) then
    return nil, "invalid update version " .. tostring(v)
  end
  if type(url) ~= "string" or not sfind(url, "^[Hh][Tt][Tt][Pp][Ss]?://") then
    return nil, "invalid update url " .. tostring(url)
  end
  if type(sha) ~= "string" or not sfind(sha, "^" .. ("%x"):rep(64) .. "$")
  then
    return nil, "invalid update sha256: expected 64 hex digits"
  end
  return true
end


local function fail(opts, update, current, reason)
  start_cooldown(opts.state_dir, option(opts, "cooldown"))
  _M.record_event(opts.state_dir, { type = "failed",
    version = type(update) == "table" and tostring(update.version) or nil,
    previous = current, reason = reason })
  return nil, reason, "failed"
end


-- The steps after the checks: download, verify, swap, restart.
local function install(update, opts, current)
  local installed = option(opts, "installed_path")
  local backup = installed .. ".bak"
  local tmp = installed .. ".new-" .. crypto.random_token(8)

  local digest, err = download(update.url, tmp, opts)
  if not digest then
    remove(tmp)
    return fail(opts, update, current, err)
  end
  if not crypto.constant_time_equal(digest, lower(update.sha256)) then
    remove(tmp)
    return fail(opts, update, current, "checksum mismatch: expected "
      .. lower(update.sha256) .. ", got " .. digest)
  end

  local ok, cerr = metrics.run_command("chmod", { "755", tmp })
  if not ok then
    remove(tmp)
    return fail(opts, update, current, "chmod failed: " .. tostring(cerr))
  end

  local out, verr = metrics.run_command(tmp, { "--version" },
    option(opts, "version_timeout"))
  local reported = out and smatch(out, "^(.-)%s*$")
  if reported ~= "justavps " .. update.version then
    remove(tmp)
    return fail(opts, update, current, "the new binary reported "
      .. (reported and ("\"" .. reported:sub(1, 100) .. "\"")
        or tostring(verr))
      .. " for --version, expected \"justavps " .. update.version .. "\"")
  end

  -- A hard link keeps the old binary without copying; cp covers file
  -- systems without hard links.
  local linked = metrics.run_command("ln", { "-f", installed, backup })
  if not linked then
    local copied, lerr = metrics.run_command("cp", { "-p", installed,
      backup })
    if not copied then
      remove(tmp)
      return fail(opts, update, current, "cannot keep the old binary as "
        .. backup .. ": " .. tostring(lerr))
    end
  end

  local marker = path_join(opts.state_dir, MARKER)
  local probation = option(opts, "probation")
  local wrote, merr = write_atomic(marker, json.encode({
    from = current, to = update.version, installed_path = installed,
    backup_path = backup, deadline = floor(core.time()) + probation,
  }))
  if not wrote then
    remove(tmp)
    return fail(opts, update, current, "cannot write the probation marker "
      .. marker .. ": " .. tostring(merr))
  end

  local watchdog, werr = start_watchdog(marker, installed, backup, current,
    update.version, opts)
  if not watchdog then
    remove(tmp)
    remove(marker)
    return fail(opts, update, current, werr)
  end

  local renamed, rerr = core.fs.rename(tmp, installed)
  if not renamed then
    remove(tmp)
    remove(marker)
    pcall(watchdog.kill, watchdog, "SIGKILL", true)
    return fail(opts, update, current, "cannot replace " .. installed
      .. ": " .. tostring(rerr))
  end
  log.info("update installed; restarting", { version = update.version,
    previous = current, installed = installed })

  local restarted, serr = run_restart(opts)
  if not restarted then
    pcall(watchdog.kill, watchdog, "SIGKILL", true)
    remove(marker)
    local back, berr = core.fs.rename(backup, installed)
    if not back then
      log.alert("cannot put the old binary back after a failed restart",
        { installed = installed, backup = backup, error = berr })
    end
    return fail(opts, update, current, serr)
  end
  return true, "restarting"
end


-- Applies an update offer { version, url, sha256 }. opts: state_dir
-- (required), installed_path, restart_command (an argv array, or
-- "reexec"; default systemctl when systemd runs, else reexec),
-- reexec_args, probation, cooldown, watchdog ("detached", "systemd-run"
-- or false), current_version (default core.version), ca, max_size,
-- download_timeout, version_timeout. Must run in a core coroutine.
--
-- Returns true, "restarting" once the new binary is installed and the
-- restart started; or nil, message, code with code "skipped" (same
-- version), "cooldown", "busy" or "failed". Skips and failures are
-- recorded as events, a skip once per version.
function _M.apply(update, opts)
  local current = opts.current_version or core.version
  if not opts.state_dir then
    error("updater.apply: opts.state_dir is required", 2)
  end

  local valid, verr = check_update(update)
  if not valid then
    return fail(opts, update, current, verr)
  end

  if update.version == current then
    if state.skipped_version ~= current then
      state.skipped_version = current
      _M.record_event(opts.state_dir, { type = "skipped",
        version = current, previous = current,
        reason = "already running this version" })
    end
    return nil, "already running version " .. current, "skipped"
  end

  local left = cooldown_left(opts.state_dir)
  if left > 0 then
    return nil, "an update failed recently; next attempt in "
      .. floor(left + 0.5) .. " s", "cooldown"
  end
  if state.busy then
    return nil, "an update is already in progress", "busy"
  end

  state.busy = true
  local ok, a, b, c = pcall(install, update, opts, current)
  state.busy = false
  if not ok then
    return fail(opts, update, current, "update failed: " .. tostring(a))
  end
  return a, b, c
end


-- Probation -------------------------------------------------------------

local function default_health_check(conf, opts)
  local host = conf.internal.host
  if host == "0.0.0.0" then
    host = "127.0.0.1"
  elseif host == "::" then
    host = "::1"
  end
  local headers = machine_sig.sign(conf.token, "GET", "/v1/health", "")
  local res = core.http.request({ host = host,
    port = opts.internal_port or conf.internal.port, path = "/v1/health",
    headers = headers, timeout = 5 })
  if not res then
    return false
  end
  local body = res:read_body(4096)
  res:close()
  local decoded = body and json.decode(body)
  return res.status == 200 and type(decoded) == "table"
    and decoded.status == "ok"
end


local function rollback_in_process(p, opts)
  log.err("update probation expired without confirmation; rolling back",
    { version = p.to, previous = p.from })
  local back, err = core.fs.rename(p.backup_path, p.installed_path)
  if not back then
    log.alert("cannot put the old binary back", { error = err,
      backup = p.backup_path, installed = p.installed_path })
    return
  end
  remove(p.marker)
  start_cooldown(opts.state_dir, option(opts, "cooldown"))
  _M.record_event(opts.state_dir, { type = "rolled_back", version = p.to,
    previous = p.from, reason = "the new version did not pass its health "
      .. "check and send a heartbeat in time" })
  local ok, rerr = run_restart(opts)
  if not ok then
    log.alert("restart after a rollback failed", { error = rerr })
  end
end


local function confirm(p, opts)
  remove(p.marker)
  state.probation = nil
  _M.record_event(opts.state_dir, { type = "applied", version = p.to,
    previous = p.from })
end


-- Checks at startup whether this process runs a new version on probation.
-- conf is the daemon config (token, internal, state_dir). opts: the
-- options of apply, plus internal_port (the bound internal port when
-- conf.internal.port is 0) and health_check (a function returning true
-- when the daemon is healthy; default a signed GET /v1/health).
--
-- Returns "probation" when it started watching (note_heartbeat and the
-- health check then confirm the update), "mismatch" when the marker names
-- another version (recorded as a failed event), or nil when there is no
-- marker. Must run in a core coroutine.
function _M.check_probation(conf, opts)
  opts = opts or {}
  opts.state_dir = opts.state_dir or conf.state_dir
  local current = opts.current_version or core.version
  local marker = path_join(opts.state_dir, MARKER)
  local text = read_all(marker)
  if not text then
    return nil
  end
  local p = json.decode(text)
  if type(p) ~= "table" or type(p.to) ~= "string" then
    log.err("invalid update probation marker; removing it",
      { path = marker })
    remove(marker)
    return nil
  end

  if p.to ~= current then
    remove(marker)
    _M.record_event(opts.state_dir, { type = "failed", version = p.to,
      previous = p.from, reason = "the daemon restarted as version "
        .. current .. ", not " .. p.to })
    return "mismatch"
  end

  p.marker = marker
  p.health_ok = false
  p.heartbeat_ok = false
  p.waiter = core.waiter()
  state.probation = p
  log.info("update on probation", { version = p.to, previous = p.from,
    deadline = p.deadline })

  local check = opts.health_check or function()
    return default_health_check(conf, opts)
  end
  core.spawn(function()
    while state.probation == p and core.time() < p.deadline do
      if not p.health_ok then
        local ok, healthy = pcall(check)
        p.health_ok = ok and healthy == true
      end
      if p.health_ok and p.heartbeat_ok then
        confirm(p, opts)
        return
      end
      p.waiter:wait(1)
    end
    if state.probation ~= p then
      return
    end
    -- The watchdog acts at the deadline; act only if it did not.
    core.sleep(ROLLBACK_GRACE)
    if state.probation == p and read_all(marker) then
      state.probation = nil
      rollback_in_process(p, opts)
    end
  end)
  return "probation"
end


-- Tells the probation check that a heartbeat reporting version was
-- accepted by the platform. Returns nothing.
function _M.note_heartbeat(version)
  local p = state.probation
  if p and version == p.to then
    p.heartbeat_ok = true
    if p.waiter:waiting() then
      p.waiter:wake()
    end
  end
end


-- Returns true while a restarted version waits for its confirmation.
function _M.on_probation()
  return state.probation ~= nil
end


-- Forgets the cooldown, the last skip and any probation; for specs.
function _M.reset()
  state.busy = false
  state.cooldown_until = nil
  state.skipped_version = nil
  state.probation = nil
end


return _M
