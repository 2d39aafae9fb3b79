-- The systemd unit that runs the daemon on a machine:
-- /etc/systemd/system/justavps-daemon.service, written by cloud-init.
--
-- The daemon serves a root shell (the /_pty terminal), runs commands and
-- background processes for the user, talks to Docker and replaces its own
-- binary on self-update. Every process the user starts from the browser
-- inherits the unit's sandbox, so the unit applies only settings that leave
-- the terminal as capable as an SSH login. docs/provisioning.md lists what
-- is applied and what is left out.
local type = type
local error = error
local pairs = pairs
local tostring = tostring
local floor = math.floor
local concat = table.concat
local smatch = string.match
local sfind = string.find

local _M = {}

_M.NAME = "justavps-daemon.service"
_M.BINARY_PATH = "/usr/local/bin/justavps-daemon"
_M.CONFIG_PATH = "/etc/justavps/config.json"

-- Default of the daemon role's --drain-timeout, in seconds.
_M.DRAIN_TIMEOUT = 10

-- Seconds systemd waits beyond the drain timeout before SIGKILL: the
-- daemon's on_stop work and the exit itself.
_M.STOP_MARGIN = 20

-- Restart pacing. The platform never logs in to a machine, so a daemon in
-- a crash loop must keep retrying rather than stay failed. Also, the update
-- watchdog rolls a bad release back with "systemctl restart", which systemd
-- rejects once the start limit has been hit. The burst is therefore higher
-- than the starts Restart= alone can make in one interval
-- (INTERVAL / RESTART_SEC + 1), so only restarts from outside, such as a
-- loop of systemctl calls, can reach the limit.
_M.RESTART_SEC = 5
_M.START_LIMIT_INTERVAL = 60
_M.START_LIMIT_BURST = 20

_M.LIMIT_NOFILE = 65536


local function invalid(message)
  return nil, message, "invalid_option"
end


-- Checks an absolute path for a unit file line. systemd expands "%"
-- specifiers and splits ExecStart= on whitespace and quotes, so only a
-- plain character set is accepted.
local function check_path(name, path)
  if type(path) ~= "string" or not smatch(path, "^/[A-Za-z0-9._/-]+$")
      or sfind(path, "//", 1, true) or sfind(path, "/%.%.?/")
      or sfind(path, "/%.%.?$") or #path > 255 then
    return invalid(name .. " must be an absolute path of letters, digits "
      .. "and . _ - / without . or .. segments, got " .. tostring(path))
  end
  return path
end


local function check_options(opts)
  local binary, err = check_path("binary_path",
    opts.binary_path or _M.BINARY_PATH)
  if not binary then
    return invalid(err)
  end

  local config_path, cerr = check_path("config_path",
    opts.config_path or _M.CONFIG_PATH)
  if not config_path then
    return invalid(cerr)
  end

  local drain = opts.drain_timeout
  if drain == nil then
    drain = _M.DRAIN_TIMEOUT
  end
  if type(drain) ~= "number" or drain ~= floor(drain) or drain < 0
      or drain > 3600 then
    return invalid("drain_timeout must be a whole number of seconds from "
      .. "0 to 3600, got " .. tostring(drain))
  end

  for key in pairs(opts) do
    if key ~= "binary_path" and key ~= "config_path"
        and key ~= "drain_timeout" then
      return invalid("unknown option " .. tostring(key)
        .. " (expected binary_path, config_path, drain_timeout)")
    end
  end

  return { binary = binary, config_path = config_path, drain = drain }
end


-- Builds the text of justavps-daemon.service. opts (all optional):
-- binary_path, config_path, drain_timeout (seconds, passed to the daemon
-- as --drain-timeout). Returns the text, or nil, message, "invalid_option".
function _M.unit(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("systemd.unit: opts must be a table, got " .. type(opts), 2)
  end

  local o, err, code = check_options(opts)
  if not o then
    return nil, err, code
  end

  local lines = {
    "# Written by JustAVPS provisioning. The platform never logs in, so",
    "# this unit must bring the daemon back on its own after any failure.",
    "[Unit]",
    "Description=JustAVPS machine daemon",
    "After=network-online.target",
    "Wants=network-online.target",
    "StartLimitIntervalSec=" .. _M.START_LIMIT_INTERVAL,
    "StartLimitBurst=" .. _M.START_LIMIT_BURST,
    "",
    "[Service]",
    -- exec: "systemctl start" fails when the binary cannot be executed,
    -- so the provisioning script stops with an error instead of
    -- reporting a started service.
    "Type=exec",
    "ExecStart=" .. o.binary .. " daemon --config " .. o.config_path
      .. " --drain-timeout " .. o.drain,
    "Restart=on-failure",
    "RestartSec=" .. _M.RESTART_SEC,
    "TimeoutStopSec=" .. (o.drain + _M.STOP_MARGIN),
    -- Only the daemon gets SIGTERM. Background processes started through
    -- the toolbox are meant to survive a daemon restart (the process table
    -- finds them again), and terminal shells end when the daemon's PTYs
    -- close, as after an SSH disconnect.
    "KillMode=process",
    -- User processes run in this unit's cgroup. The default policy (stop)
    -- would stop the daemon when the kernel OOM killer picks one of them.
    "OOMPolicy=continue",
    "LimitNOFILE=" .. _M.LIMIT_NOFILE,
    "SyslogIdentifier=justavps-daemon",
    "",
    "[Install]",
    "WantedBy=multi-user.target",
    "",
  }
  return concat(lines, "\n")
end


return _M
