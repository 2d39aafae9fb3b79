-- The daemon's configuration: /etc/justavps/config.json on a machine
-- (written by cloud-init, mode 0600), a file the local provider writes in
-- development, plus JUSTAVPS_DAEMON_* environment overrides.
local ffi = require("ffi")
local config = require("justavps.config")
local routing = require("policies.daemon_routing")

local ipairs = ipairs
local pcall = pcall

local _M = {}

local function listen_record(host, port, what)
  return { type = "record", description = what, fields = {
    { host = { type = "string", default = host,
      description = "address to listen on (IPv4 or IPv6 literal)" } },
    { port = { type = "integer", default = port, between = { 0, 65535 },
      description = "TCP port; 0 picks a free one" } },
  } }
end

_M.schema = config.schema({ fields = {
  { slug = { type = "string", required = true, match = "^[a-z0-9-]+$",
    len_min = 3, len_max = 40, description = "this machine's slug" } },
  { token = { type = "string", required = true, len_min = 16,
    description = "machine token shared with the platform; signs the "
      .. "internal API and heartbeats" } },
  { platform_url = { type = "string", default = "",
    description = "base URL of the platform API for heartbeats; empty "
      .. "turns heartbeats, and so self-update, off" } },
  { public = listen_record("0.0.0.0", 80,
    "listener for traffic from brokers") },
  { internal = listen_record("127.0.0.1", 7777,
    "listener for the machine-signed internal API") },
  { broker_cidrs = { type = "array", default = {},
    elements = { type = "string" },
    description = "networks brokers connect from; everyone else gets 403" } },
  { routing = { type = "record", fields = routing.schema,
    description = "routing policy settings" } },
  { toolbox_root = { type = "string", default = "/root",
    description = "directory the file API is confined to" } },
  { state_dir = { type = "string", default = "/var/lib/justavps",
    description = "directory for process logs and daemon state" } },
  { shell = { type = "string", default = "/bin/bash",
    description = "login shell for the terminal" } },
  { heartbeat_interval = { type = "duration", default = 30,
    between = { 1, 3600 }, description = "seconds between heartbeats" } },
  { services = { type = "array", elements = { type = "string" },
    default = { "justavps-daemon.service", "docker.service", "ssh.service" },
    description = "systemd units /v1/services reports on" } },
  { disk_path = { type = "string", default = "/",
    description = "file system /v1/system reports disk usage for" } },
  { ports_interval = { type = "duration", default = 2, between = { 0.1, 3600 },
    description = "seconds between scans of listening ports" } },
  { platform_ca = { type = "string",
    description = "CA file for an https platform_url (default: system)" } },
  { update = { type = "record", description = "self-update", fields = {
    { installed_path = { type = "string",
      default = "/usr/local/bin/justavps-daemon",
      description = "path of the daemon binary that updates replace" } },
    { probation = { type = "duration", default = 120, between = { 5, 3600 },
      description = "seconds a new release has to report healthy before "
        .. "the old one returns" } },
  } } },
  { terminal = { type = "record", description = "the /_pty terminal",
    fields = {
      { buffer_size = { type = "size", default = 2 * 1024 * 1024,
        between = { 4096, 256 * 1024 * 1024 },
        description = "output kept per session for reattaching clients" } },
      { reattach_window = { type = "duration", default = 300,
        between = { 1, 86400 },
        description = "seconds a session without a client keeps running" } },
      { idle_timeout = { type = "duration", default = 0,
        between = { 0, 86400 },
        description = "seconds without input or output before a session "
          .. "ends; 0 for no limit" } },
      { ping_interval = { type = "duration", default = 30,
        between = { 0, 3600 },
        description = "seconds between WebSocket pings; 0 for none" } },
      { kill_grace = { type = "duration", default = 5, between = { 0, 600 },
        description = "seconds between SIGHUP and SIGKILL at session end" } },
      { max_sessions = { type = "integer", default = 32,
        between = { 1, 10000 },
        description = "terminal sessions that may exist at once" } },
    } } },
} })


-- Another module may have declared getcwd already, which ffi.cdef rejects.
pcall(ffi.cdef, "char *getcwd(char *buf, size_t size);")


local function current_dir()
  local buf = ffi.new("char[4096]")
  if ffi.C.getcwd(buf, 4096) == nil then
    error("getcwd failed with errno " .. ffi.errno())
  end
  return ffi.string(buf)
end


-- Loads and validates the config file at path. Returns the config or nil,
-- message, code.
function _M.load(path)
  local conf, err, code = config.load({ schema = _M.schema, path = path,
    env_prefix = "JUSTAVPS_DAEMON" })
  if not conf then
    return nil, err, code
  end
  -- Processes and the shell run in other directories, so a relative path
  -- would point elsewhere for them: it is taken from the start directory.
  for _, key in ipairs({ "state_dir", "toolbox_root" }) do
    if conf[key]:sub(1, 1) ~= "/" then
      conf[key] = current_dir() .. "/" .. conf[key]
    end
  end
  return conf
end


return _M
