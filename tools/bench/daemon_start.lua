-- Measures the daemon's start-up time and idle memory. Run it from the
-- repository root:
--
--   luajit tools/bench/daemon_start.lua binary config port cpu [starts]
--                                       [settle] [build-dir]
--
-- binary is the justavps executable, config a daemon config file whose
-- public listener is 127.0.0.1:port, and cpu the CPU that taskset pins
-- the daemon to. starts (default 10) is the number of timed starts, and
-- settle (default 2) the seconds between start-up and the memory reading.
-- build-dir defaults to "build"; core.so is loaded from
-- build-dir/lua/justavps/core.so. The daemon inherits this process's
-- environment.
--
-- Start-up time runs from just before the spawn of
-- `taskset -c CPU binary daemon --config CONFIG --access-log=false` to
-- the first TCP connection that the public port accepts. The client
-- retries the connection without pausing, so the result is late by at
-- most one refused connect. The same spawn of `taskset -c CPU true`,
-- timed to its exit, estimates what taskset and the spawn itself add.
--
-- Idle memory: 3 more daemons are started one after another and detected
-- by their "listening" log lines, without any connection to them, and
-- /proc/PID/status and /proc/PID/smaps are read settle seconds later.
--
-- Prints key=value lines on stdout, for tools/bench/daemon.sh to read:
--   start run=N ms=..
--   spawn_true run=N ms=..
--   memory run=N vmrss_kib=.. rss_anon_kib=.. rss_file_kib=..
--          vmhwm_kib=.. pss_kib=..
--   mapping rss_kib=.. pss_kib=.. name=..  (the last daemon's 12 largest)
-- and exits with status 1, with the reason and the daemon's log on
-- stderr, when a daemon does not start within 10 s.
local binary = arg[1]
local config = arg[2]
local port = tonumber(arg[3])
local cpu = arg[4]
local starts = tonumber(arg[5]) or 10
local settle = tonumber(arg[6]) or 2
local build_dir = arg[7] or "build"

if not (binary and config and port and cpu) then
  io.stderr:write("usage: luajit tools/bench/daemon_start.lua binary ",
    "config port cpu [starts] [settle] [build-dir]\n")
  os.exit(2)
end

package.cpath = build_dir .. "/lua/?.so;" .. package.cpath

local ffi = require("ffi")
local core = require("justavps.core")

ffi.cdef([[
struct daemon_start_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clock_id, struct daemon_start_timespec *tp);
]])

local CLOCK_MONOTONIC = 1
local START_TIMEOUT_US = 10e6
local MAPPINGS_SHOWN = 12
local MEMORY_RUNS = 3
local ts = ffi.new("struct daemon_start_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local status = 0
-- The daemon started last. SIGTERM or SIGINT to this script sends it SIGTERM.
local running = nil


local function fail(message, lines)
  io.stderr:write("daemon_start: ", message, "\n")
  if lines and #lines > 0 then
    io.stderr:write("daemon log:\n", table.concat(lines, "\n"), "\n")
  end
  status = 1
  error("daemon_start: " .. message, 0)
end


-- Spawns the daemon pinned to cpu and collects its stderr lines in a
-- coroutine. Returns the process and the line table.
local function spawn_daemon()
  local p, err = core.proc.spawn({
    file = "taskset",
    args = { "-c", cpu, binary, "daemon", "--config", config,
      "--access-log=false" },
    stdin = "null", stdout = "null", stderr = "pipe",
  })
  if not p then
    fail("cannot spawn " .. binary .. ": " .. tostring(err))
  end

  running = p
  local lines = {}
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      lines[#lines + 1] = line
    end
  end)
  return p, lines
end


local function stop_daemon(p, lines)
  p:kill("SIGTERM")
  local code, err = p:wait(15)
  if code == nil then
    p:kill("SIGKILL")
    p:wait(5)
    fail("the daemon did not exit within 15 s of SIGTERM: "
      .. tostring(err), lines)
  end
end


local function time_start(run)
  local started = now_us()
  local p, lines = spawn_daemon()
  while true do
    local sock = core.tcp.connect("127.0.0.1", port)
    -- A connect from an ephemeral port equal to port connects to itself
    -- when nothing listens yet, so that does not count.
    local _, local_port = nil, nil
    if sock then
      _, local_port = sock:sockname()
    end
    if sock and local_port ~= port then
      local elapsed = now_us() - started
      sock:close()
      print(string.format("start run=%d ms=%.2f", run, elapsed / 1e3))
      break
    end
    if sock then
      sock:close()
    end
    if p:exited() then
      fail("the daemon exited before its public port accepted", lines)
    end
    if now_us() - started > START_TIMEOUT_US then
      stop_daemon(p, lines)
      fail("127.0.0.1:" .. port .. " did not accept within 10 s", lines)
    end
  end
  stop_daemon(p, lines)
end


local function time_spawn_true(run)
  local started = now_us()
  local p = assert(core.proc.spawn({ file = "taskset",
    args = { "-c", cpu, "true" } }))
  p:wait(10)
  print(string.format("spawn_true run=%d ms=%.2f", run,
    (now_us() - started) / 1e3))
end


-- Reads the named fields of /proc/pid/status, in KiB.
local function proc_status(pid)
  local f = assert(io.open("/proc/" .. pid .. "/status", "r"))
  local text = f:read("*a")
  f:close()
  local out = {}
  for name, kib in text:gmatch("(%w+):%s+(%d+) kB") do
    out[name] = tonumber(kib)
  end
  return out
end


-- Sums Rss and Pss of /proc/pid/smaps by mapped file, with "[anon]" for
-- unnamed mappings. Returns a list of { name, rss, pss } in KiB, largest
-- Rss first.
local function memory_by_mapping(pid)
  local f = assert(io.open("/proc/" .. pid .. "/smaps", "r"))
  local by_name, list = {}, {}
  local current
  for line in f:lines() do
    local name = line:match("^%x+%-%x+ %S+ %x+ %S+ %d+%s*(.*)$")
    if name then
      if name == "" then
        name = "[anon]"
      end
      current = by_name[name]
      if not current then
        current = { name = name, rss = 0, pss = 0 }
        by_name[name] = current
        list[#list + 1] = current
      end
    else
      local field, kib = line:match("^(%a+):%s+(%d+) kB")
      if field == "Rss" then
        current.rss = current.rss + tonumber(kib)
      elseif field == "Pss" then
        current.pss = current.pss + tonumber(kib)
      end
    end
  end
  f:close()
  table.sort(list, function(a, b)
    return a.rss > b.rss
  end)
  return list
end


local function measure_memory(run, show_mappings)
  local p, lines = spawn_daemon()
  local started = now_us()
  local ready = false
  while not ready do
    local public, internal = false, false
    for _, line in ipairs(lines) do
      if line:find("msg=listening .*listener=public") then
        public = true
      elseif line:find("msg=listening .*listener=internal") then
        internal = true
      end
    end
    ready = public and internal
    if p:exited() then
      fail("the daemon exited before it logged its listeners", lines)
    end
    if not ready and now_us() - started > START_TIMEOUT_US then
      stop_daemon(p, lines)
      fail("the daemon logged no listeners within 10 s", lines)
    end
    core.sleep(0.01)
  end

  core.sleep(settle)
  local st = proc_status(p:pid())
  local mappings = memory_by_mapping(p:pid())
  local pss = 0
  for _, m in ipairs(mappings) do
    pss = pss + m.pss
  end
  print(string.format("memory run=%d vmrss_kib=%d rss_anon_kib=%d "
    .. "rss_file_kib=%d vmhwm_kib=%d pss_kib=%d", run, st.VmRSS,
    st.RssAnon, st.RssFile, st.VmHWM, pss))
  if show_mappings then
    for i = 1, math.min(MAPPINGS_SHOWN, #mappings) do
      local m = mappings[i]
      print(string.format("mapping rss_kib=%d pss_kib=%d name=%s", m.rss,
        m.pss, m.name))
    end
  end
  stop_daemon(p, lines)
end


local function main()
  for run = 1, starts do
    time_start(run)
    io.stdout:flush()
  end
  for run = 1, starts do
    time_spawn_true(run)
  end
  for run = 1, MEMORY_RUNS do
    measure_memory(run, run == MEMORY_RUNS)
  end
end


local function interrupt()
  if running and not running:exited() then
    running:kill("SIGTERM")
  end
  os.exit(1)
end

core.signal.on("SIGTERM", interrupt)
core.signal.on("SIGINT", interrupt)

core.spawn(function()
  local ok, err = pcall(main)
  if not ok and status == 0 then
    io.stderr:write("daemon_start: ", tostring(err), "\n")
    status = 1
  end
  core.stop()
end)
core.run()
os.exit(status)
