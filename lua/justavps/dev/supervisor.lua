-- Child processes of `justavps dev`: the platform, edge and broker roles,
-- each started from this binary with its own config and log file, and
-- restarted with a growing delay when it exits on its own.
--
-- Each child runs in its own process group, so Ctrl-C in the terminal
-- reaches only `justavps dev`, which then stops the children in the
-- reverse order of their start. A pid file per child lets the next start
-- stop what a killed `justavps dev` left running.
local core = require("justavps.core")
local log = require("justavps.log")
local files = require("justavps.dev.files")

local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local min = math.min

local _M = {}

local FIRST_DELAY = 1
local MAX_DELAY = 30
-- A child that ran this long before it exited is restarted after
-- FIRST_DELAY again.
local STABLE_AFTER = 60

local Supervisor = {}
Supervisor.__index = Supervisor


-- Returns the argument list of pid from /proc, or nil.
local function cmdline(pid)
  local text = files.read("/proc/" .. pid .. "/cmdline")
  if not text or text == "" then
    return nil
  end
  return text
end


-- Stops the process group left by an earlier run whose pid file names a
-- live justavps process started with this config.
function Supervisor.stop_leftover(_, child)
  local pid = tonumber(files.read(child.pid_file) or "")
  if not pid then
    return
  end
  local args = cmdline(pid)
  if args and args:find(child.config, 1, true)
      and args:find("\0" .. child.name .. "\0", 1, true) then
    log.warn("stopping a process left by an earlier run",
      { role = child.name, pid = pid })
    core.proc.kill(-pid, "SIGTERM")
    for _ = 1, 100 do
      core.sleep(0.1)
      if not cmdline(pid) then
        break
      end
    end
    core.proc.kill(-pid, "SIGKILL")
  end
  files.run("rm", { "-f", "--", child.pid_file })
end


function Supervisor:spawn(child)
  -- The shell only redirects output and replaces itself with justavps, so
  -- the pid is the role's. Paths are arguments, never script text.
  local p, err = core.proc.spawn({
    file = "/bin/sh",
    args = { "-c", 'log=$1; shift; exec "$0" "$@" >>"$log" 2>&1',
      self.binary, child.log_file, child.name, "--config", child.config,
      "--access-log=" .. tostring(self.access_log) },
    detached = true,
  })
  if not p then
    return nil, "cannot start " .. child.name .. ": " .. tostring(err)
  end
  child.process = p
  child.started_at = core.now()
  files.write_private(child.pid_file, p:pid() .. "\n")
  log.info("started", { role = child.name, pid = p:pid(),
    log = child.log_file })
  return true
end


-- Restarts child each time it exits while the supervisor runs.
function Supervisor:watch(child)
  local delay = FIRST_DELAY
  while true do
    local status, signal = child.process:wait()
    if self.stopping then
      return
    end
    core.update_time()
    if core.now() - child.started_at >= STABLE_AFTER then
      delay = FIRST_DELAY
    end
    log.err("role exited; restarting it", { role = child.name,
      status = status, signal = signal, restart_in = delay,
      log = child.log_file })
    -- A failed spawn is retried with the same growing delay.
    repeat
      core.sleep(delay)
      if self.stopping then
        return
      end
      delay = min(delay * 2, MAX_DELAY)
      local ok, err = self:spawn(child)
      if not ok then
        log.err("restart failed", { role = child.name, error = err,
          retry_in = delay })
      end
    until ok
  end
end


-- Waits until child accepts TCP connections on port. Returns true, or
-- nil, message when it exits first or timeout seconds pass.
function Supervisor.wait_ready(_, child, port, timeout)
  local deadline = core.now() + timeout
  while true do
    local sock = core.tcp.connect("127.0.0.1", port, { timeout = 1 })
    if sock then
      sock:close()
      return true
    end
    if child.process:exited() then
      return nil, child.name .. " exited during start; see "
        .. child.log_file
    end
    core.update_time()
    if core.now() > deadline then
      return nil, child.name .. " did not listen on port " .. port
        .. " within " .. timeout .. " s; see " .. child.log_file
    end
    core.sleep(0.05)
  end
end


-- Starts role name with the config file config, waits up to timeout
-- seconds until it listens on port, and keeps it running. Returns true,
-- or nil, message.
function Supervisor:start(name, config, port, timeout)
  local child = {
    name = name,
    config = config,
    log_file = self.log_dir .. "/" .. name .. ".log",
    pid_file = self.run_dir .. "/" .. name .. ".pid",
  }
  self:stop_leftover(child)
  local ok, err = self:spawn(child)
  if not ok then
    return nil, err
  end
  self.children[#self.children + 1] = child
  ok, err = self:wait_ready(child, port, timeout)
  if not ok then
    return nil, err
  end
  core.spawn(function()
    self:watch(child)
  end)
  return true
end


-- Stops the children, newest first: SIGTERM to each process group, then
-- SIGKILL to what is left after timeout seconds.
function Supervisor:stop_all(timeout)
  self.stopping = true
  for i = #self.children, 1, -1 do
    local child = self.children[i]
    local p = child.process
    if p and not p:exited() then
      p:kill("SIGTERM", true)
      local status = p:wait(timeout)
      if status == nil then
        log.warn("role did not stop in time; killing it",
          { role = child.name, timeout = timeout })
      end
      p:kill("SIGKILL", true)
      log.info("stopped", { role = child.name, status = status })
    end
    files.run("rm", { "-f", "--", child.pid_file })
  end
end


-- Stops the roles that a killed `justavps dev` on dir left running, as
-- the pid files in run_dir name them. The roles' ports are checked for
-- use after this, so leftovers must go first.
function _M.stop_leftovers(dir, run_dir, names)
  for _, name in ipairs(names) do
    Supervisor.stop_leftover(nil, { name = name,
      config = dir .. "/" .. name .. ".json",
      pid_file = run_dir .. "/" .. name .. ".pid" })
  end
end


-- Returns a supervisor. opts: binary (path of justavps), log_dir,
-- run_dir, access_log (boolean passed to each role).
function _M.new(opts)
  for _, dir in ipairs({ opts.log_dir, opts.run_dir }) do
    local ok, err = files.mkdir(dir)
    if not ok then
      return nil, err
    end
  end
  return setmetatable({ binary = opts.binary, log_dir = opts.log_dir,
    run_dir = opts.run_dir, access_log = opts.access_log, children = {},
    stopping = false }, Supervisor)
end


return _M
