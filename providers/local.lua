-- The local provider: each "server" is a `justavps daemon` process on
-- this host, for development and tests.
--
-- A machine gets its own loopback address 127.0.0.x from a pool, with
-- fixed public and internal ports on it, and a directory
-- ROOT/<slug>/ containing:
--   config.json  the daemon config that the user-data would write to
--                /etc/justavps/config.json, with the listeners, state
--                directory and toolbox root moved into this directory
--                (mode 0600: it contains the machine token)
--   daemon.pid   "PID STARTTIME": the daemon's pid and its start time
--                from /proc/PID/stat, so a reused pid is not mistaken
--                for the daemon
--   daemon.log   the daemon's stdout and stderr
--   state/, root/  the daemon's state_dir and toolbox_root
-- ROOT/.claims/<address>/ marks an address as taken. mkdir is atomic, so
-- two platform processes never hand out the same address.
--
-- Daemons are started detached (a new session and process group), so
-- they outlive a platform restart, and found again through their pid
-- files. delete_server signals the whole process group.
local ffi = require("ffi")
local config = require("justavps.config")
local json = require("justavps.json")
local cloud_init = require("justavps.provision.cloud_init")
local daemon_config = require("justavps.daemon.config")

local type = type
local pcall = pcall
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local io_open = io.open
local os_getenv = os.getenv
local smatch = string.match
local ssub = string.sub
local format = string.format
local concat = table.concat

local _M = {}

-- Another module may have declared readlink already, which ffi.cdef
-- rejects.
pcall(ffi.cdef,
  "long readlink(const char *path, char *buf, unsigned long size);")

_M.name = "local"

-- The daemon runs from this host's binary, so the user-data's download
-- URL and checksum are never used.
_M.downloads_daemon = false

_M.REGION = "local"
_M.SERVER_TYPE = "local"

-- Field declarations, also embedded in the platform config as
-- provision.providers.local.
_M.config_fields = {
  { root_dir = { type = "string", default = "var/local-machines",
    len_min = 1, description = "directory that contains one directory per "
      .. "local machine" } },
  { binary = { type = "string", default = "",
    description = "justavps binary the daemons run; empty runs the "
      .. "binary of the calling process" } },
  { address_first = { type = "integer", default = 2, between = { 2, 254 },
    description = "last byte of the first loopback address 127.0.0.x "
      .. "handed out" } },
  { address_count = { type = "integer", default = 64, between = { 1, 253 },
    description = "size of the loopback address pool" } },
  { public_port = { type = "integer", default = 8000,
    between = { 1, 65535 },
    description = "port of each daemon's public listener" } },
  { internal_port = { type = "integer", default = 7777,
    between = { 1, 65535 },
    description = "port of each daemon's internal API listener" } },
  { boot_delay = { type = "duration", default = 0, between = { 0, 3600 },
    description = "seconds create_server waits before it starts the "
      .. "daemon, to imitate a slow cloud" } },
  { stop_timeout = { type = "duration", default = 5, between = { 0, 600 },
    description = "seconds between SIGTERM and SIGKILL on delete" } },
}

_M.schema = config.schema({ fields = _M.config_fields })

local ERR_INVALID = "invalid_request"
local ERR_NOT_FOUND = "not_found"
local ERR_UNAVAILABLE = "provider_unavailable"


local function fail(code, message)
  return nil, message, code
end


local function valid_slug(slug)
  return type(slug) == "string" and #slug >= 3 and #slug <= 40
    and smatch(slug, "^[a-z0-9-]+$") ~= nil
end


local function read_file(path)
  local f = io_open(path, "rb")
  if not f then
    return nil
  end
  local text = f:read("*a")
  f:close()
  return text
end


-- Runs a program (no shell) and waits for it. Returns true, or nil,
-- message, code.
local function run(core, file, args)
  local p, err, code = core.proc.spawn({ file = file, args = args,
    stdout = "pipe", stderr = "stdout" })
  if not p then
    return nil, file .. ": " .. tostring(err), code
  end
  local parts = {}
  p.stdout:settimeout(30)
  while true do
    local chunk = p.stdout:read()
    if not chunk then
      break
    end
    parts[#parts + 1] = chunk
  end
  p.stdout:close()
  local out = concat(parts)
  local status = p:wait(30)
  if status == nil then
    p:kill("SIGKILL")
  end
  if status ~= 0 then
    return nil, format("%s exited with status %s: %s", file,
      tostring(status), out), ERR_UNAVAILABLE
  end
  return true, out
end


-- Returns the start time (field 22 of /proc/PID/stat, in clock ticks
-- since boot) of a live process, or nil for a missing or zombie process.
local function start_time(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if not stat then
    return nil
  end
  -- The command name (field 2) may contain spaces and ")", so the fields
  -- are counted after the last ")".
  local rest = smatch(stat, ".*%)%s+(.*)$")
  if not rest then
    return nil
  end
  local fields = {}
  for word in rest:gmatch("%S+") do
    fields[#fields + 1] = word
  end
  if fields[1] == "Z" or fields[1] == "X" then
    return nil
  end
  return fields[20]
end


local Driver = {}
Driver.__index = Driver


function Driver:dir(slug)
  return self.root .. "/" .. slug
end


-- Resolves root_dir and binary to absolute paths once, because each
-- daemon runs in its own directory.
function Driver:resolve()
  if self.root then
    return true
  end
  local core = self.core
  local ok, out = run(core, "mkdir", { "-p", "-m", "0700",
    self.conf.root_dir, self.conf.root_dir .. "/.claims" })
  if not ok then
    return nil, out
  end
  ok, out = run(core, "realpath", { "-e", "--", self.conf.root_dir })
  if not ok then
    return nil, out
  end
  self.root = smatch(out, "^(.-)%s*$")

  -- /proc/PID/exe of this process: a program reading /proc/self/exe in
  -- a child would find the child's binary instead.
  local binary = self.conf.binary
  if binary == "" then
    binary = "/proc/" .. core.proc.getpid() .. "/exe"
  end
  ok, out = run(core, "realpath", { "-e", "--", binary })
  if not ok then
    self.root = nil
    return nil, out
  end
  self.binary = smatch(out, "^(.-)%s*$")
  return true
end


-- Returns pid, alive for the machine's daemon: alive only when the pid
-- file's start time matches the running process.
function Driver:daemon_pid(slug)
  local text = read_file(self:dir(slug) .. "/daemon.pid")
  local pid, started = smatch(text or "", "^(%d+) (%d+)")
  if not pid then
    return nil, false
  end
  pid = tonumber(pid)
  return pid, start_time(pid) == started
end


-- Returns the machine's address from its config.json, or nil.
function Driver:address_of(slug)
  local conf = json.decode(read_file(self:dir(slug) .. "/config.json")
    or "null")
  if type(conf) == "table" and type(conf.public) == "table" then
    return conf.public.host
  end
  return nil
end


-- Returns true when a listener can bind host:port now.
function Driver:port_free(host, port)
  local listener = self.core.tcp.listen({ host = host, port = port,
    on_accept = function(sock)
      sock:close()
    end })
  if not listener then
    return false
  end
  listener:close()
  return true
end


-- Claims a free loopback address for slug. An address is skipped when a
-- claim exists or when something outside this provider already listens
-- on one of the two ports there.
function Driver:claim_address(slug)
  local conf = self.conf
  for i = 0, conf.address_count - 1 do
    local last = conf.address_first + i
    if last > 254 then
      break
    end
    local address = "127.0.0." .. last
    local claim = self.root .. "/.claims/" .. address
    if run(self.core, "mkdir", { "-m", "0700", claim }) then
      if self:port_free(address, conf.public_port)
          and self:port_free(address, conf.internal_port) then
        local f = io_open(claim .. "/slug", "wb")
        if f then
          f:write(slug, "\n")
          f:close()
        end
        return address
      end
      run(self.core, "rm", { "-rf", "--", claim })
    end
  end
  return fail("capacity_unavailable", format("no free loopback address in "
    .. "127.0.0.%d to 127.0.0.%d", conf.address_first,
    math.min(254, conf.address_first + conf.address_count - 1)))
end


-- Returns the daemon config table from the user-data's write_files entry
-- for the config path, or nil, message.
local function config_from_user_data(user_data)
  if type(user_data) ~= "string" then
    return nil, "user_data is required: the local provider starts the "
      .. "daemon with the config file it contains"
  end
  local header = cloud_init.HEADER .. "\n"
  local doc
  if ssub(user_data, 1, #header) == header then
    doc = json.decode(ssub(user_data, #header + 1))
  end
  if type(doc) ~= "table" or type(doc.write_files) ~= "table" then
    return nil, "user_data is not a #cloud-config JSON document with "
      .. "write_files"
  end
  for _, file in ipairs(doc.write_files) do
    if type(file) == "table" and file.path == cloud_init.CONFIG_PATH then
      local conf = json.decode(file.content or "")
      if type(conf) == "table" then
        return conf
      end
      return nil, "the user_data entry for " .. cloud_init.CONFIG_PATH
        .. " is not a JSON object"
    end
  end
  return nil, "user_data writes no " .. cloud_init.CONFIG_PATH
end


-- Writes text to path with mode 0600: the file is made empty and
-- restricted before the token is written into it.
function Driver:write_private(path, text)
  local f, err = io_open(path, "wb")
  if not f then
    return nil, err
  end
  f:close()
  local ok, cerr = run(self.core, "chmod", { "0600", "--", path })
  if not ok then
    return nil, cerr
  end
  f, err = io_open(path, "wb")
  if not f then
    return nil, err
  end
  f:write(text)
  f:close()
  return true
end


-- Creates ROOT/<slug> with its config.json for the daemon config conf,
-- on address, or on a newly claimed address when address is nil.
function Driver:prepare(slug, conf, address)
  if not address then
    local err, code
    address, err, code = self:claim_address(slug)
    if not address then
      return nil, err, code
    end
  end

  local dir = self:dir(slug)
  local ok, merr = run(self.core, "mkdir", { "-p", "-m", "0700", dir,
    dir .. "/state", dir .. "/root" })
  if not ok then
    return fail(ERR_UNAVAILABLE, merr)
  end

  -- Paths are relative to the machine directory, the daemon's working
  -- directory. installed_path names a file that never exists, so the
  -- daemon's self-update cannot replace the shared binary.
  conf.public = { host = address, port = self.conf.public_port }
  conf.internal = { host = address, port = self.conf.internal_port }
  conf.state_dir = "state"
  conf.toolbox_root = "root"
  conf.update = conf.update or {}
  conf.update.installed_path = "justavps-daemon"
  conf.services = {}

  local valid, verr = config.validate(daemon_config.schema, conf)
  if not valid then
    return fail(ERR_INVALID, "the daemon config in user_data is invalid: "
      .. verr)
  end
  local written, werr = self:write_private(dir .. "/config.json",
    json.encode(conf) .. "\n")
  if not written then
    return fail(ERR_UNAVAILABLE, "cannot write " .. dir .. "/config.json: "
      .. tostring(werr))
  end
  return address
end


-- Starts the daemon of slug detached and writes its pid file.
function Driver:start_daemon(slug)
  local dir = self:dir(slug)
  -- The shell only redirects output and then replaces itself with the
  -- daemon, so the pid is the daemon's. The binary path is an argument
  -- ($0), never part of the script text.
  local p, err = self.core.proc.spawn({
    file = "/bin/sh",
    args = { "-c", 'exec "$0" daemon --config config.json '
      .. '--access-log=false >>daemon.log 2>&1', self.binary },
    cwd = dir,
    env = { PATH = os_getenv("PATH") or "/usr/bin:/bin",
      HOME = os_getenv("HOME") or "/" },
    detached = true,
  })
  if not p then
    return fail(ERR_UNAVAILABLE, "cannot start the daemon of " .. slug
      .. ": " .. tostring(err))
  end
  local pid = p:pid()
  local started = start_time(pid)
  if not started then
    return fail(ERR_UNAVAILABLE, "the daemon of " .. slug
      .. " exited at once; see " .. dir .. "/daemon.log")
  end
  local f, ferr = io_open(dir .. "/daemon.pid", "wb")
  if not f then
    p:kill("SIGKILL", true)
    return fail(ERR_UNAVAILABLE, "cannot write the pid file: "
      .. tostring(ferr))
  end
  f:write(pid, " ", started, "\n")
  f:close()
  self.children[slug] = p
  return pid
end


local function server_result(slug, status, address)
  return { id = slug, status = status, ipv4 = address,
    region = _M.REGION, server_type = _M.SERVER_TYPE }
end


-- Creates the machine req.slug, or returns the one that exists. A
-- machine directory without a live daemon (a platform killed during
-- create, a daemon that exited) keeps its address and gets the request's
-- config and a new daemon.
function Driver:create_server(req)
  if type(req) ~= "table" or not valid_slug(req.slug) then
    return fail(ERR_INVALID, "slug must be 3 to 40 characters of a-z, "
      .. "0-9 and -")
  end
  for _, field in ipairs({ "name", "region", "server_type", "image" }) do
    if type(req[field]) ~= "string" or req[field] == "" then
      return fail(ERR_INVALID, field .. " is required")
    end
  end
  if req.region ~= _M.REGION then
    return fail(ERR_INVALID, "unknown region " .. req.region
      .. "; the local provider has only " .. _M.REGION)
  end
  if req.server_type ~= _M.SERVER_TYPE then
    return fail(ERR_INVALID, "unknown server type " .. req.server_type
      .. "; the local provider has only " .. _M.SERVER_TYPE)
  end
  local daemon_conf, cerr = config_from_user_data(req.user_data)
  if not daemon_conf then
    return fail(ERR_INVALID, cerr)
  end
  if daemon_conf.slug ~= req.slug then
    return fail(ERR_INVALID, "the daemon config is for slug "
      .. tostring(daemon_conf.slug) .. ", not " .. req.slug)
  end
  -- The same progress event a cloud driver reports, so the stage history
  -- looks alike for every provider.
  if type(req.on_event) == "function" then
    req.on_event({ type = "create_attempt", attempt = 1,
      region = req.region, server_type = req.server_type })
  end
  local ok, rerr = self:resolve()
  if not ok then
    return fail(ERR_UNAVAILABLE, rerr)
  end

  -- The config is written again for a machine without a live daemon,
  -- because the request may carry a new platform_url.
  local slug = req.slug
  local address = self:address_of(slug)
  if address then
    local _, alive = self:daemon_pid(slug)
    if alive then
      return server_result(slug, "running", address)
    end
  end
  local err, code
  address, err, code = self:prepare(slug, daemon_conf, address)
  if not address then
    return nil, err, code
  end

  if self.conf.boot_delay > 0 then
    self.core.sleep(self.conf.boot_delay)
    -- Another create or a delete may have acted during the wait.
    if not self:address_of(slug) then
      return fail(ERR_NOT_FOUND, "machine " .. slug
        .. " was deleted while it was created")
    end
    local _, alive = self:daemon_pid(slug)
    if alive then
      return server_result(slug, "running", address)
    end
  end

  local pid
  pid, err, code = self:start_daemon(slug)
  if not pid then
    return nil, err, code
  end
  return server_result(slug, "starting", address)
end


function Driver.list_server_types()
  return { {
    id = _M.SERVER_TYPE, name = "daemon process on this host", cores = 1,
    memory_gb = 0, disk_gb = 0, prices = {}, locations = { _M.REGION },
  } }
end


function Driver.list_regions()
  return { { id = _M.REGION, name = "this host", city = "localhost",
    country = "--" } }
end


-- Returns running while the daemon process lives, off when its directory
-- exists without a live daemon.
function Driver:get_server_status(id)
  if not valid_slug(id) then
    return fail(ERR_NOT_FOUND, "no local machine " .. tostring(id))
  end
  local ok, rerr = self:resolve()
  if not ok then
    return fail(ERR_UNAVAILABLE, rerr)
  end
  local address = self:address_of(id)
  if not address then
    return fail(ERR_NOT_FOUND, "no local machine " .. id)
  end
  local _, alive = self:daemon_pid(id)
  return { id = id, status = alive and "running" or "off", ipv4 = address }
end


-- NOTE: a local machine has no disk of its own, so no snapshot is taken:
-- the image id only names the machine it came from.
function Driver:create_image(id)
  local status, err, code = self:get_server_status(id)
  if not status then
    return nil, err, code
  end
  return { image_id = "local-" .. id .. "-" .. self.core.time(),
    status = "available" }
end


-- Stops the daemon's process group: SIGTERM, up to stop_timeout seconds
-- for the daemon to exit, then SIGKILL to whatever is left in the group.
function Driver:stop_daemon(slug)
  local core = self.core
  local pid, alive = self:daemon_pid(slug)
  if not pid or not alive then
    return
  end
  core.proc.kill(-pid, "SIGTERM")
  local deadline = core.now() + self.conf.stop_timeout
  while core.now() < deadline do
    core.sleep(0.05)
    core.update_time()
    local _, still = self:daemon_pid(slug)
    if not still then
      break
    end
  end
  -- The group id stays reserved while any member lives, so this reaches
  -- only what the daemon started.
  core.proc.kill(-pid, "SIGKILL")
  for _ = 1, 100 do
    local _, still = self:daemon_pid(slug)
    if not still then
      break
    end
    core.sleep(0.02)
  end
end


-- Returns the target of /proc/PID/cwd, or nil.
local function process_cwd(pid)
  local buf = ffi.new("char[4096]")
  local n = tonumber(ffi.C.readlink("/proc/" .. pid .. "/cwd", buf, 4096))
  if n < 0 then
    return nil
  end
  return ffi.string(buf, n)
end


-- Stops what the machine's users left running after its daemon stopped:
-- background processes, whose wrapper names the machine's state
-- directory in its arguments and leads their process group, and any
-- other process whose working directory lies in the machine's directory.
-- A cloud server takes its processes with it; local machines share this
-- host, so they are found here.
-- NOTE: a process that changed to a directory outside the machine's, and
-- does not belong to a background process group, is not found.
function Driver:stop_machine_processes(slug)
  local core = self.core
  local dir = self:dir(slug)
  local listed, out = run(core, "ls", { "-1", "/proc" })
  if not listed then
    return
  end
  local own = core.proc.getpid()
  local groups, singles = {}, {}
  for pid in out:gmatch("%d+") do
    if tonumber(pid) ~= own then
      local cmdline = read_file("/proc/" .. pid .. "/cmdline") or ""
      local cwd = process_cwd(pid)
      if cmdline:find("\0" .. dir .. "/state/", 1, true) then
        groups[#groups + 1] = tonumber(pid)
      elseif cwd and (cwd == dir or ssub(cwd, 1, #dir + 1) == dir .. "/") then
        singles[#singles + 1] = tonumber(pid)
      end
    end
  end
  for _, signal in ipairs({ "SIGTERM", "SIGKILL" }) do
    for _, pid in ipairs(groups) do
      core.proc.kill(-pid, signal)
    end
    for _, pid in ipairs(singles) do
      core.proc.kill(pid, signal)
    end
    if signal == "SIGTERM" and (#groups > 0 or #singles > 0) then
      core.sleep(0.2)
    end
  end
end


-- Stops the machine's daemon and removes its directory and address
-- claim. A machine that does not exist counts as deleted.
function Driver:delete_server(id_or_slug)
  if not valid_slug(id_or_slug) then
    return fail(ERR_INVALID, "id must be a machine slug, got "
      .. json.encode(tostring(id_or_slug)))
  end
  local ok, rerr = self:resolve()
  if not ok then
    return fail(ERR_UNAVAILABLE, rerr)
  end
  local slug = id_or_slug
  local address = self:address_of(slug)
  self:stop_daemon(slug)
  self:stop_machine_processes(slug)
  self.children[slug] = nil

  local removed, err = run(self.core, "rm", { "-rf", "--", self:dir(slug) })
  if not removed then
    return fail(ERR_UNAVAILABLE, err)
  end
  if address and smatch(address, "^127%.0%.0%.%d+$") then
    run(self.core, "rm", { "-rf", "--", self.root .. "/.claims/" .. address })
  end
  return { deleted = true, id = slug }
end


-- Returns the slugs of the machines in the root directory, for specs.
function Driver:list_machines()
  local ok = self:resolve()
  if not ok then
    return {}
  end
  local done, out = run(self.core, "ls", { "-1", "--", self.root })
  local slugs = {}
  if done then
    for name in out:gmatch("[^\n]+") do
      if valid_slug(name) then
        slugs[#slugs + 1] = name
      end
    end
  end
  return slugs
end


-- Returns a driver for conf (the fields of config_fields). deps.core
-- replaces justavps.core, for specs.
function _M.new(conf, deps)
  local valid, err = config.validate(_M.schema, conf or {})
  if not valid then
    return nil, "local: " .. err, ERR_INVALID
  end
  deps = deps or {}
  local self = {
    conf = valid,
    core = deps.core or require("justavps.core"),
    children = {},
  }
  return setmetatable(self, Driver)
end


return _M
