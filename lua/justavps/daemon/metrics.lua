-- Machine metrics for the internal API and heartbeats: parsers of /proc
-- files and of `df` and `systemctl show` output (pure functions over text),
-- and the collectors that read the files and run the commands.
--
-- Linux only: the formats are those of proc(5), df -P (POSIX output
-- format) and systemctl show.
local core = require("justavps.core")
local json = require("justavps.json")

local floor = math.floor
local min = math.min
local tonumber = tonumber
local tostring = tostring
local ipairs = ipairs
local type = type
local open = io.open
local gmatch = string.gmatch
local smatch = string.match
local sfind = string.find
local concat = table.concat

local _M = {}

-- Clock ticks per second of the times in /proc/[pid]/stat. Linux fixes
-- USER_HZ at 100 for user space on every architecture it supports.
_M.CLOCK_TICKS = 100

-- A CPU sample older than this is not used as the base of a delta.
local CPU_SAMPLE_MAX_AGE = 120
-- Seconds between two samples when there is no usable earlier one.
local CPU_SAMPLE_GAP = 0.25

local MAX_FILE_BYTES = 1024 * 1024
-- Bytes per read in read_file. LuaJIT's f:read(n) allocates a buffer of n
-- bytes first, and the collector counts it as heap growth, so reading a
-- 10-byte /proc file in one f:read(MAX_FILE_BYTES) counted as 1 MiB.
local READ_CHUNK = 16384
local COMMAND_TIMEOUT = 10


local function round(x, places)
  local m = 10 ^ (places or 2)
  return floor(x * m + 0.5) / m
end


-- Parses /proc/uptime. Returns the system uptime and the summed idle time
-- of all CPUs, in seconds, or nil.
function _M.parse_uptime(text)
  local up, idle = smatch(text, "^%s*([%d.]+)%s+([%d.]+)")
  if not up then
    return nil
  end
  return tonumber(up), tonumber(idle)
end


-- Parses /proc/[pid]/stat. Returns the process start time in clock ticks
-- after boot (field 22), or nil. The command name (field 2) may contain
-- spaces and parentheses, so fields are counted from its last ")".
function _M.parse_process_start(text)
  local rest = smatch(text, "^.*%)%s+(.*)$")
  if not rest then
    return nil
  end
  local i = 2
  for field in gmatch(rest, "%S+") do
    i = i + 1
    if i == 22 then
      return tonumber(field)
    end
  end
  return nil
end


-- Parses the "cpu" lines of /proc/stat. Returns { total, idle, cores } in
-- clock ticks summed over all CPUs (idle includes iowait), or nil.
function _M.parse_cpu(text)
  local sample = nil
  local cores = 0
  for line in gmatch(text, "[^\n]+") do
    local name, values = smatch(line, "^(cpu%d*)%s+(.*)$")
    if name == "cpu" then
      local fields = {}
      for v in gmatch(values, "%d+") do
        fields[#fields + 1] = tonumber(v)
      end
      -- user nice system idle iowait irq softirq steal; guest and
      -- guest_nice are already counted in user and nice.
      local total = 0
      for i = 1, 8 do
        total = total + (fields[i] or 0)
      end
      sample = { total = total, idle = (fields[4] or 0) + (fields[5] or 0) }
    elseif name then
      cores = cores + 1
    end
  end
  if sample then
    sample.cores = cores
  end
  return sample
end


-- Returns the busy share of CPU time between two parse_cpu samples, in
-- percent of all CPUs, or nil when no time passed between them.
function _M.cpu_usage(before, after)
  local total = after.total - before.total
  if total <= 0 then
    return nil
  end
  local busy = total - (after.idle - before.idle)
  return round(100 * busy / total, 1)
end


-- Parses /proc/loadavg. Returns { load1, load5, load15, running, total }
-- (runnable and total scheduling entities), or nil.
function _M.parse_loadavg(text)
  local l1, l5, l15, running, total =
    smatch(text, "^%s*([%d.]+)%s+([%d.]+)%s+([%d.]+)%s+(%d+)/(%d+)")
  if not l1 then
    return nil
  end
  return { load1 = tonumber(l1), load5 = tonumber(l5),
    load15 = tonumber(l15), running = tonumber(running),
    total = tonumber(total) }
end


-- Parses /proc/meminfo. Returns sizes in bytes: total, free, available,
-- used (total - available), buffers, cached, swap_total, swap_free.
-- Fields missing from the text are nil; available falls back to
-- free + buffers + cached on kernels before 3.14.
function _M.parse_meminfo(text)
  local kb = {}
  for name, value in gmatch(text, "([%w_()]+):%s+(%d+)") do
    kb[name] = tonumber(value)
  end

  local function bytes(name)
    return kb[name] and kb[name] * 1024 or nil
  end

  local m = {
    total = bytes("MemTotal"),
    free = bytes("MemFree"),
    available = bytes("MemAvailable"),
    buffers = bytes("Buffers"),
    cached = bytes("Cached"),
    swap_total = bytes("SwapTotal"),
    swap_free = bytes("SwapFree"),
  }
  if not m.available and m.free then
    m.available = m.free + (m.buffers or 0) + (m.cached or 0)
  end
  if m.total and m.available then
    m.used = m.total - m.available
  end
  return m
end


-- Parses /proc/net/dev. Returns a list of { name, rx_bytes, rx_packets,
-- rx_errors, rx_dropped, tx_bytes, tx_packets, tx_errors, tx_dropped },
-- in the order of the file.
function _M.parse_net_dev(text)
  local list = json.array()
  for line in gmatch(text, "[^\n]+") do
    local name, values = smatch(line, "^%s*([^%s:|]+):%s*(.*)$")
    if name then
      local f = {}
      for v in gmatch(values, "%d+") do
        f[#f + 1] = tonumber(v)
      end
      if #f >= 12 then
        list[#list + 1] = { name = name,
          rx_bytes = f[1], rx_packets = f[2], rx_errors = f[3],
          rx_dropped = f[4],
          tx_bytes = f[9], tx_packets = f[10], tx_errors = f[11],
          tx_dropped = f[12] }
      end
    end
  end
  return list
end


-- Parses the output of `df -P -B1 PATH`. Returns { filesystem,
-- total_bytes, used_bytes, available_bytes, mount }, or nil.
function _M.parse_df(text)
  local line = smatch(text, "^[^\n]*\n([^\n]+)")
  if not line then
    return nil
  end
  local fs, total, used, avail, mount =
    smatch(line, "^(.-)%s+(%d+)%s+(%d+)%s+(%d+)%s+%d+%%%s+(.+)$")
  if not fs then
    return nil
  end
  return { filesystem = fs, total_bytes = tonumber(total),
    used_bytes = tonumber(used), available_bytes = tonumber(avail),
    mount = mount }
end


-- Parses `systemctl show` output: one Key=Value per line. Returns a table
-- of keys to values.
function _M.parse_systemctl_show(text)
  local props = {}
  for line in gmatch(text, "[^\n]+") do
    local k, v = smatch(line, "^([%w]+)=(.*)$")
    if k then
      props[k] = v
    end
  end
  return props
end


-- Reads a whole small file (as /proc files are), up to MAX_FILE_BYTES.
-- Returns the text or nil, message.
function _M.read_file(path)
  local f, err = open(path, "rb")
  if not f then
    return nil, err
  end
  local parts = {}
  local total = 0
  while total < MAX_FILE_BYTES do
    local chunk = f:read(min(READ_CHUNK, MAX_FILE_BYTES - total))
    if not chunk then
      break
    end
    parts[#parts + 1] = chunk
    total = total + #chunk
  end
  f:close()
  if #parts == 1 then
    return parts[1]
  end
  return concat(parts)
end


-- Runs a command and returns its standard output, or nil, message, code.
-- A command that exits with a non-zero status returns nil and its output
-- as the message. Must run in a core coroutine.
function _M.run_command(file, args, timeout)
  local p, err, code = core.proc.spawn({ file = file, args = args,
    stdout = "pipe", stderr = "stdout" })
  if not p then
    return nil, file .. ": " .. err, code
  end

  local parts = {}
  p.stdout:settimeout(timeout or COMMAND_TIMEOUT)
  while true do
    local chunk, rerr, rcode = p.stdout:read()
    if not chunk then
      if rcode ~= "closed" then
        p:kill("SIGKILL")
        p.stdout:close()
        return nil, file .. " output: " .. tostring(rerr), rcode
      end
      break
    end
    parts[#parts + 1] = chunk
  end
  p.stdout:close()

  local status, werr, wcode = p:wait(timeout or COMMAND_TIMEOUT)
  if not status then
    p:kill("SIGKILL")
    return nil, file .. " did not exit: " .. tostring(werr), wcode
  end
  local output = concat(parts)
  if status ~= 0 then
    return nil, file .. " exited with status " .. status .. ": "
      .. output:sub(1, 500), "failed"
  end
  return output
end


-- Returns { system_s, daemon_s }: seconds since boot and since this
-- process started, or nil, message.
function _M.uptime(proc_dir)
  proc_dir = proc_dir or "/proc"
  local text, err = _M.read_file(proc_dir .. "/uptime")
  if not text then
    return nil, err
  end
  local system = _M.parse_uptime(text)
  if not system then
    return nil, "cannot parse " .. proc_dir .. "/uptime"
  end

  local result = { system_s = round(system, 2) }
  local stat = _M.read_file(proc_dir .. "/self/stat")
  local start = stat and _M.parse_process_start(stat)
  if start then
    result.daemon_s = round(system - start / _M.CLOCK_TICKS, 2)
  end
  return result
end


local cpu_previous = nil


-- Returns { usage_percent, cores, interval_s }: the CPU busy share since
-- the previous call (at most CPU_SAMPLE_MAX_AGE seconds back), else over a
-- short pause. Must run in a core coroutine.
function _M.cpu(proc_dir)
  local path = (proc_dir or "/proc") .. "/stat"
  core.update_time()
  local base = cpu_previous
  if not base or core.now() - base.at > CPU_SAMPLE_MAX_AGE then
    local text = _M.read_file(path)
    base = text and _M.parse_cpu(text)
    if not base then
      return nil, "cannot read " .. path
    end
    base.at = core.now()
    core.sleep(CPU_SAMPLE_GAP)
    core.update_time()
  end

  local text = _M.read_file(path)
  local sample = text and _M.parse_cpu(text)
  if not sample then
    return nil, "cannot read " .. path
  end
  sample.at = core.now()
  cpu_previous = sample

  return { usage_percent = _M.cpu_usage(base, sample), cores = sample.cores,
    interval_s = round(sample.at - base.at, 3) }
end


-- Returns the disk usage of the file system holding path, from df. Must
-- run in a core coroutine.
function _M.disk(path)
  local out, err, code = _M.run_command("df", { "-P", "-B1", path })
  if not out then
    return nil, err, code
  end
  local d = _M.parse_df(out)
  if not d then
    return nil, "cannot parse df output: " .. out:sub(1, 200)
  end
  d.path = path
  return d
end


local function read_parsed(path, parse)
  local text, err = _M.read_file(path)
  if not text then
    return { error = err }
  end
  return parse(text) or { error = "cannot parse " .. path }
end


-- Collects CPU, load, memory, disk and network figures. opts.disk_path
-- (default "/") picks the file system; opts.proc_dir (default "/proc")
-- is for specs. A part that cannot be read becomes { error = message }.
-- Must run in a core coroutine.
function _M.system(opts)
  opts = opts or {}
  local proc_dir = opts.proc_dir or "/proc"

  local cpu, cerr = _M.cpu(proc_dir)
  local disk, derr = _M.disk(opts.disk_path or "/")
  local net = read_parsed(proc_dir .. "/net/dev", _M.parse_net_dev)
  if net.error == nil then
    net = { interfaces = net }
  end

  return {
    cpu = cpu or { error = cerr },
    load = read_parsed(proc_dir .. "/loadavg", _M.parse_loadavg),
    memory = read_parsed(proc_dir .. "/meminfo", _M.parse_meminfo),
    disk = disk or { error = derr },
    network = net,
  }
end


-- Returns true when systemd is the running init system: the test of
-- sd_booted(3), the existence of /run/systemd/system/.
function _M.systemd_running(dir)
  local f = open((dir or "/run/systemd/system") .. "/.", "r")
  if f then
    f:close()
    return true
  end
  return false
end


local SHOW_PROPERTIES = "Id,LoadState,ActiveState,SubState,UnitFileState,"
  .. "MainPID,ActiveEnterTimestamp"


-- Returns the state of each unit in units from `systemctl show`, as
-- { available = true, units = { { unit, load_state, active_state,
-- sub_state, unit_file_state, main_pid, active_since }, ... } }, or
-- { available = false, reason } without systemd. opts.systemctl and
-- opts.systemd_dir replace the command and the directory that shows
-- systemd runs. Must run in a core coroutine.
function _M.services(units, opts)
  opts = opts or {}
  if not _M.systemd_running(opts.systemd_dir) then
    return { available = false,
      reason = "systemd is not the init system of this machine "
        .. "(no /run/systemd/system)" }
  end

  local list = json.array()
  for _, unit in ipairs(units) do
    local entry = { unit = unit }
    if type(unit) ~= "string" or sfind(unit, "^%-") then
      entry.error = "invalid unit name"
    else
      local out, err = _M.run_command(opts.systemctl or "systemctl",
        { "show", unit, "--property=" .. SHOW_PROPERTIES })
      if out then
        local p = _M.parse_systemctl_show(out)
        entry.load_state = p.LoadState
        entry.active_state = p.ActiveState
        entry.sub_state = p.SubState
        entry.unit_file_state = p.UnitFileState
        entry.main_pid = tonumber(p.MainPID)
        entry.active_since = p.ActiveEnterTimestamp
      else
        entry.error = err
      end
    end
    list[#list + 1] = entry
  end
  return { available = true, units = list }
end


return _M
