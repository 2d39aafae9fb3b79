-- The port watcher: reads the listening TCP sockets from /proc/net/tcp and
-- /proc/net/tcp6 on an interval, finds the process that owns each one, and
-- reports ports that start or stop listening.
--
-- A catalogue entry is { port, address, family ("ipv4" or "ipv6"), inode,
-- pid, process }. pid and process are best effort: they are nil when the
-- owner cannot be found, for example a socket of another user's process
-- when the daemon does not run as root.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local metrics = require("justavps.daemon.metrics")

local tonumber = tonumber
local tostring = tostring
local ipairs = ipairs
local pairs = pairs
local pcall = pcall
local format = string.format
local gmatch = string.gmatch
local smatch = string.match
local ssub = string.sub
local sort = table.sort
local concat = table.concat

local _M = {}

-- TCP state 0x0A in /proc/net/tcp is TCP_LISTEN.
local LISTEN = "0A"

local DEFAULT_INTERVAL = 2
-- Seconds the owner scan (find over /proc/*/fd) may take.
local OWNER_SCAN_TIMEOUT = 5


-- /proc/net/tcp prints each 32-bit word of an address as the hex of the
-- number in host byte order. Returns the 4 bytes of a word in network
-- order, assuming a little-endian host (x86-64, arm64).
-- NOTE: a big-endian host prints words in network order already; this
-- module would show those addresses byte-reversed.
local function word_bytes(hex8)
  return tonumber(ssub(hex8, 7, 8), 16), tonumber(ssub(hex8, 5, 6), 16),
    tonumber(ssub(hex8, 3, 4), 16), tonumber(ssub(hex8, 1, 2), 16)
end


local function format_ipv4(hex)
  local a, b, c, d = word_bytes(hex)
  return format("%d.%d.%d.%d", a, b, c, d)
end


-- Formats 16 bytes as RFC 5952 text: lowercase, no leading zeros, the
-- longest run of two or more zero groups shortened to "::", and
-- IPv4-mapped addresses as ::ffff:a.b.c.d.
local function format_ipv6(bytes)
  local groups = {}
  for i = 1, 16, 2 do
    groups[#groups + 1] = bytes[i] * 256 + bytes[i + 1]
  end

  local mapped = true
  for i = 1, 5 do
    mapped = mapped and groups[i] == 0
  end
  if mapped and groups[6] == 0xffff then
    return format("::ffff:%d.%d.%d.%d", bytes[13], bytes[14], bytes[15],
      bytes[16])
  end

  local best_start, best_len = nil, 1
  local i = 1
  while i <= 8 do
    if groups[i] == 0 then
      local j = i
      while j <= 8 and groups[j] == 0 do
        j = j + 1
      end
      if j - i > best_len then
        best_start, best_len = i, j - i
      end
      i = j
    else
      i = i + 1
    end
  end

  local function hex_range(from, to)
    local parts = {}
    for k = from, to do
      parts[#parts + 1] = format("%x", groups[k])
    end
    return concat(parts, ":")
  end

  if not best_start then
    return hex_range(1, 8)
  end
  return hex_range(1, best_start - 1) .. "::"
    .. hex_range(best_start + best_len, 8)
end


local function parse_address(hex)
  if #hex == 8 then
    return format_ipv4(hex), "ipv4"
  end
  if #hex == 32 then
    local bytes = {}
    for w = 0, 3 do
      local a, b, c, d = word_bytes(ssub(hex, w * 8 + 1, w * 8 + 8))
      bytes[#bytes + 1] = a
      bytes[#bytes + 1] = b
      bytes[#bytes + 1] = c
      bytes[#bytes + 1] = d
    end
    return format_ipv6(bytes), "ipv6"
  end
  return nil
end


-- A line of /proc/net/tcp or tcp6 in state 0A (TCP_LISTEN), capturing the
-- local address, the local port and the inode. Fields are separated by
-- blanks only, so a match never runs on into the next line.
local LISTEN_LINE = "[ \t]*%d+:[ \t]+(%x+):(%x+)[ \t]+%x+:%x+[ \t]+" .. LISTEN
  .. "[ \t]+%S+[ \t]+%S+[ \t]+%S+[ \t]+%d+[ \t]+%d+[ \t]+(%d+)"


local function add_listener(list, addr, port, inode)
  local address, family = parse_address(addr)
  if address then
    list[#list + 1] = { port = tonumber(port, 16), address = address,
      family = family, inode = tonumber(inode) }
  end
end


-- Parses the text of /proc/net/tcp or /proc/net/tcp6. Returns a list of
-- the listening sockets as { port, address, family, inode } in the order
-- of the file. Lines in other states, and malformed lines, are skipped.
-- The pattern matches listening lines only, so the other lines, most of
-- the file on a busy machine, make no garbage strings.
function _M.parse(text)
  local list = {}
  local addr, port, inode = smatch(text, "^" .. LISTEN_LINE)
  if addr then
    add_listener(list, addr, port, inode)
  end
  for a, p, i in gmatch(text, "\n" .. LISTEN_LINE) do
    add_listener(list, a, p, i)
  end
  return list
end


-- Appends the listening sockets in the file at path to list, as parse
-- does, and returns false when the file cannot be read. core.fs reads the
-- file in C and returns only the listening lines: on a machine with
-- thousands of sockets /proc/net/tcp has hundreds of KiB, and a Lua
-- string per line made that much garbage every scan.
local function read_listeners(path, list)
  local found = core.fs.tcp_listeners(path)
  if not found then
    return false
  end
  for i = 1, #found, 3 do
    local address, family = parse_address(found[i])
    if address then
      list[#list + 1] = { port = found[i + 1], address = address,
        family = family, inode = found[i + 2] }
    end
  end
  return true
end


-- Parses lines "PATH socket:[INODE]" as printed by the owner scan.
-- Returns a table of inode to pid; the lowest pid wins when processes
-- share a socket (a parent and the children it forked).
function _M.parse_owner_lines(text)
  local owners = {}
  for pid, inode in gmatch(text, "/proc/(%d+)/fd/%d+ socket:%[(%d+)%]") do
    pid, inode = tonumber(pid), tonumber(inode)
    if not owners[inode] or pid < owners[inode] then
      owners[inode] = pid
    end
  end
  return owners
end


-- The owner scan walks only /proc/PID/fd/*: find prunes every other
-- directory at depths 1 and 2, and prints the socket links at depth 3.
local FIND_ARGS = {
  "/proc", "-mindepth", "1", "-maxdepth", "3",
  "-regextype", "posix-extended",
  "(", "-regex", "/proc/[^/]+", "!", "-regex", "/proc/[0-9]+", "-prune",
  ")", "-o",
  "(", "-regex", "/proc/[0-9]+/[^/]+", "!", "-name", "fd", "-prune", ")",
  "-o",
  "(", "-regex", "/proc/[0-9]+/fd/[0-9]+", "-lname", "socket:*",
  "-printf", "%p %l\\n", ")",
}


-- Runs the owner scan. Returns a table of inode to pid, or nil, message.
-- find exits with status 1 when it cannot read some directories (other
-- users' fd lists), so its output is used whatever the status.
local function scan_owners()
  local p, err = core.proc.spawn({ file = "find", args = FIND_ARGS,
    stdout = "pipe" })
  if not p then
    return nil, "find: " .. tostring(err)
  end
  p.stdout:settimeout(OWNER_SCAN_TIMEOUT)
  local parts = {}
  while true do
    local chunk, _, code = p.stdout:read()
    if not chunk then
      if code ~= "closed" then
        p:kill("SIGKILL")
      end
      break
    end
    parts[#parts + 1] = chunk
  end
  p.stdout:close()
  if not p:wait(OWNER_SCAN_TIMEOUT) then
    p:kill("SIGKILL")
  end
  return _M.parse_owner_lines(concat(parts))
end


local function process_name(pid)
  local comm = metrics.read_file("/proc/" .. pid .. "/comm")
  return comm and smatch(comm, "^([^\n]*)") or nil
end


local function entry_key(e)
  return e.family .. " " .. e.address .. " " .. e.port
end


local function sort_entries(list)
  sort(list, function(a, b)
    if a.port ~= b.port then
      return a.port < b.port
    end
    if a.family ~= b.family then
      return a.family < b.family
    end
    return a.address < b.address
  end)
end


-- Reads the listening sockets. opts.proc_dir (default "/proc") is for
-- specs; opts.owners (default true) looks up the owning processes, and
-- opts.owner_cache (a table of inode to { pid, process }) is reused and
-- updated so that known sockets need no new scan. Returns the catalogue
-- sorted by port, family and address. Must run in a core coroutine when
-- owners are looked up.
function _M.scan(opts)
  opts = opts or {}
  local proc_dir = opts.proc_dir or "/proc"
  local list = json.array()
  for _, name in ipairs({ "tcp", "tcp6" }) do
    read_listeners(proc_dir .. "/net/" .. name, list)
  end

  if opts.owners ~= false then
    local cache = opts.owner_cache or {}
    local unknown = false
    for _, e in ipairs(list) do
      if not cache[e.inode] then
        unknown = true
      end
    end
    if unknown then
      local owners, err = scan_owners()
      if not owners then
        log.warn("cannot find the processes that own listening sockets",
          { error = err })
        owners = {}
      end
      for _, e in ipairs(list) do
        if not cache[e.inode] then
          local pid = owners[e.inode]
          -- false marks a socket whose owner was looked for and not found.
          cache[e.inode] = pid and { pid = pid, process = process_name(pid) }
            or false
        end
      end
    end
    local live = {}
    for _, e in ipairs(list) do
      local owner = cache[e.inode]
      if owner then
        e.pid, e.process = owner.pid, owner.process
      end
      live[e.inode] = true
    end
    for inode in pairs(cache) do
      if not live[inode] then
        cache[inode] = nil
      end
    end
  end

  sort_entries(list)
  return list
end


-- Compares two catalogues. Returns the lists of entries added and removed
-- (by family, address and port).
function _M.diff(old, new)
  local before, after = {}, {}
  for _, e in ipairs(old) do
    before[entry_key(e)] = e
  end
  for _, e in ipairs(new) do
    after[entry_key(e)] = e
  end
  local added, removed = json.array(), json.array()
  for _, e in ipairs(new) do
    if not before[entry_key(e)] then
      added[#added + 1] = e
    end
  end
  for _, e in ipairs(old) do
    if not after[entry_key(e)] then
      removed[#removed + 1] = e
    end
  end
  return added, removed
end


-- The running watcher. Every user of this module (the internal API,
-- heartbeats) reads its one catalogue.
local watcher = nil


-- Starts the watcher. opts: interval (seconds, default 2), on_change
-- (function(added, removed, catalogue), run in the watcher's coroutine),
-- proc_dir. A second start replaces the first. Returns nothing.
function _M.start(opts)
  opts = opts or {}
  _M.stop()

  local w = {
    catalogue = json.array(),
    updated_at = nil,
    owner_cache = {},
    running = true,
  }
  watcher = w

  local function tick()
    local ok, list = pcall(_M.scan, { proc_dir = opts.proc_dir,
      owner_cache = w.owner_cache })
    if not ok then
      log.err("port scan failed", { error = list })
      return
    end
    local added, removed = _M.diff(w.catalogue, list)
    w.catalogue = list
    w.updated_at = core.time()
    if (#added > 0 or #removed > 0) and opts.on_change and w.running then
      local cok, err = pcall(opts.on_change, added, removed, list)
      if not cok then
        log.err("port change callback failed", { error = err })
      end
    end
  end

  local interval = opts.interval or DEFAULT_INTERVAL
  w.waiter = core.waiter()
  core.spawn(function()
    while w.running do
      tick()
      if w.running then
        w.waiter:wait(interval)
      end
    end
  end)
end


-- Stops the watcher. Returns nothing.
function _M.stop()
  if watcher then
    watcher.running = false
    if watcher.waiter and watcher.waiter:waiting() then
      watcher.waiter:wake()
    end
    watcher = nil
  end
end


-- Returns the catalogue and the time of its scan (Unix seconds): the
-- watcher's when it is at most max_age seconds old (default 0.5), else a
-- fresh scan. Must run in a core coroutine.
function _M.catalogue(max_age)
  max_age = max_age or 0.5
  if watcher and watcher.updated_at
      and core.time() - watcher.updated_at <= max_age then
    return watcher.catalogue, watcher.updated_at
  end
  -- The watcher's last scan is too old for a caller that just opened a
  -- port: read the kernel's table now.
  return _M.scan(), core.time()
end


-- Returns true while a watcher runs.
function _M.watching()
  return watcher ~= nil
end


return _M
