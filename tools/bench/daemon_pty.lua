-- Measures the daemon's /_pty terminal from a WebSocket client: keystroke
-- echo latency and output throughput. Run it from the repository root:
--
--   luajit tools/bench/daemon_pty.lua port file [samples] [warmup] [runs]
--                                     [build-dir]
--
-- port is the daemon's public port on 127.0.0.1, and file is a text file
-- for `cat` to print (the throughput part). samples (default 1000) are
-- timed keystrokes after warmup (default 200) untimed ones, and runs
-- (default 3) is how often the file is printed. build-dir defaults to
-- "build"; core.so is loaded from build-dir/lua/justavps/core.so and the
-- Lua modules from lua/.
--
-- Echo latency: the client sends one printable byte as a binary frame and
-- stops the clock when that byte comes back in an output frame. The shell
-- echoes it itself (bash's readline, or the terminal's line discipline
-- for a shell without line editing). After each timed byte the client
-- sends DEL and waits, untimed, for its echo, so the command line stays
-- empty and no line wrapping adds output.
--
-- Throughput: the client types `cat FILE; echo END_$((40+2))` and counts
-- the output bytes until END_42 appears. The clock runs from the send of
-- the command to the marker, so it includes starting cat.
--
-- Prints key=value lines on stdout, for tools/bench/daemon.sh to read:
--   echo_us min=.. p50=.. p90=.. p99=.. p999=.. max=.. mean=.. n=..
--   cat run=N file_bytes=.. output_bytes=.. seconds=..
-- and exits with status 1, with the reason on stderr, when a step fails
-- or stalls for 10 s.
local port = tonumber(arg[1])
local file = arg[2]
local samples = tonumber(arg[3]) or 1000
local warmup = tonumber(arg[4]) or 200
local runs = tonumber(arg[5]) or 3
local build_dir = arg[6] or "build"

if not port or not file then
  io.stderr:write("usage: luajit tools/bench/daemon_pty.lua port file ",
    "[samples] [warmup] [runs] [build-dir]\n")
  os.exit(2)
end

package.cpath = build_dir .. "/lua/?.so;" .. package.cpath
package.path = "lua/?.lua;" .. package.path

local ffi = require("ffi")
local core = require("justavps.core")
local json = require("justavps.json")
local websocket = require("justavps.websocket")

ffi.cdef([[
struct daemon_pty_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clock_id, struct daemon_pty_timespec *tp);
]])

local CLOCK_MONOTONIC = 1
local STALL_SECONDS = 10
local ts = ffi.new("struct daemon_pty_timespec")

-- Monotonic time in microseconds. core.now() steps in milliseconds, too
-- coarse for one keystroke.
local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local status = 0


local function fail(message)
  io.stderr:write("daemon_pty: ", message, "\n")
  status = 1
  error("daemon_pty: " .. message, 0)
end


-- Receives the next binary frame; text frames (session, reset, exit) are
-- skipped. Fails on a timeout or a closed connection.
local function recv_output(conn, what)
  while true do
    local data, kind, code = conn:recv()
    if data == nil then
      fail(string.format("no output while waiting for %s: %s (%s)", what,
        tostring(kind), tostring(code)))
    end
    if kind == "binary" then
      return data
    end
    if kind == "close" then
      fail("the daemon closed the connection while waiting for " .. what)
    end
  end
end


-- Receives output until it contains needle; returns the output from the
-- call on. Keeps only the tail of long output, because the throughput
-- part prints megabytes.
local function wait_for(conn, needle, what)
  local seen = ""
  local total = 0
  while true do
    local data = recv_output(conn, what)
    total = total + #data
    seen = seen .. data
    if seen:find(needle, 1, true) then
      return seen, total
    end
    if #seen > 4096 then
      seen = seen:sub(-#needle)
    end
  end
end


-- Waits for second after first, where seen is the output returned by
-- wait_for(conn, first, ...): second may have come in the same frame.
local function wait_after(conn, seen, first, second, what)
  local after = seen:sub(seen:find(first, 1, true) + #first)
  if not after:find(second, 1, true) then
    wait_for(conn, second, what)
  end
end


local function percentile(sorted, p)
  local i = math.ceil(p * #sorted)
  if i < 1 then
    i = 1
  end
  return sorted[i]
end


local function measure_echo(conn)
  local times = {}
  local letters = "abcdefghijklmnopqrstuvwxyz"
  for i = 1, warmup + samples do
    local k = (i - 1) % #letters + 1
    local ch = letters:sub(k, k)

    local started = now_us()
    assert(conn:send(ch, "binary"))
    wait_for(conn, ch, "the echo of '" .. ch .. "'")
    local elapsed = now_us() - started
    if i > warmup then
      times[#times + 1] = elapsed
    end

    -- Both bash's readline ("\b\27[K") and a terminal in canonical mode
    -- with ECHOE ("\b \b") erase the last character starting with BS.
    assert(conn:send("\127", "binary"))
    wait_for(conn, "\b", "the echo of DEL")
  end

  local sum = 0
  for _, t in ipairs(times) do
    sum = sum + t
  end
  table.sort(times)
  print(string.format("echo_us min=%.0f p50=%.0f p90=%.0f p99=%.0f "
    .. "p999=%.0f max=%.0f mean=%.0f n=%d", times[1],
    percentile(times, 0.5), percentile(times, 0.9),
    percentile(times, 0.99), percentile(times, 0.999), times[#times],
    sum / #times, #times))
end


local function measure_cat(conn)
  local f = assert(io.open(file, "rb"))
  local file_bytes = f:seek("end")
  f:close()

  for run = 1, runs do
    local started = now_us()
    -- The typed line contains END_$((40+2)), so only the output of echo
    -- matches END_42.
    assert(conn:send("cat " .. file .. "; echo END_$((40+2))\n", "binary"))
    local seen, total = wait_for(conn, "END_42", "the end of cat's output")
    local seconds = (now_us() - started) / 1e6
    print(string.format("cat run=%d file_bytes=%d output_bytes=%d "
      .. "seconds=%.4f", run, file_bytes, total, seconds))
    io.stdout:flush()
    -- The prompt after the marker belongs to this run. Wait for it, so the
    -- next run starts at an empty command line.
    wait_after(conn, seen, "END_42", "P> ", "the prompt after cat")
  end
end


local function main()
  local sock, err = core.tcp.connect("127.0.0.1", port)
  if not sock then
    fail("cannot connect to 127.0.0.1:" .. port .. ": " .. tostring(err))
  end
  sock:settimeout(STALL_SECONDS)
  local ok, herr, hcode = websocket.client_handshake(sock,
    { host = "127.0.0.1", path = "/_pty?cols=120&rows=40" })
  if not ok then
    fail("WebSocket handshake failed: " .. tostring(herr) .. " ("
      .. tostring(hcode) .. ")")
  end
  local conn = websocket.wrap(sock, { role = "client" })
  conn:settimeout(STALL_SECONDS)

  local first, kind = conn:recv()
  local session = first and kind == "text" and json.decode(first)
  if type(session) ~= "table" or session.type ~= "session" then
    fail("expected the session frame first, got " .. tostring(kind) .. " "
      .. tostring(first))
  end

  -- A known prompt marks the end of each command's output.
  assert(conn:send("PS1='P> '; echo SYNC_$((20+1))\n", "binary"))
  local seen = wait_for(conn, "SYNC_21", "the shell to start")
  wait_after(conn, seen, "SYNC_21", "P> ", "the first prompt")

  measure_echo(conn)
  io.stdout:flush()
  measure_cat(conn)

  assert(conn:send("exit\n", "binary"))
  while true do
    local data, rkind = conn:recv()
    if data == nil or rkind == "close" then
      break
    end
  end
end


core.spawn(function()
  local ok, err = pcall(main)
  if not ok and status == 0 then
    io.stderr:write("daemon_pty: ", tostring(err), "\n")
    status = 1
  end
  core.stop()
end)
core.run()
os.exit(status)
