-- Opens count keep-alive connections to an HTTP server on 127.0.0.1, sends
-- one GET / on each and reads the whole response, then keeps them all open
-- and idle. Prints "ready <count>" once every connection has its response,
-- then waits until SIGTERM, SIGINT or hold-seconds pass, and closes them.
--
--   luajit tools/bench/hold_conns.lua port count [hold-seconds] [build-dir]
--
-- hold-seconds defaults to 60; build-dir defaults to "build". The process
-- needs count file descriptors more than its default, so raise `ulimit -n`.
local port = tonumber(arg[1])
local count = tonumber(arg[2])
local hold_seconds = tonumber(arg[3]) or 60
local build_dir = arg[4] or "build"
package.cpath = build_dir .. "/lua/?.so;" .. package.cpath

if not port or not count then
  io.stderr:write("usage: luajit tools/bench/hold_conns.lua port count ",
    "[hold-seconds] [build-dir]\n")
  os.exit(2)
end

local core = require("justavps.core")

local REQUEST = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
local socks = {}
local status = 0


local function fail(i, step, err)
  io.stderr:write(string.format("hold_conns: connection %d: %s failed: %s\n",
    i, step, tostring(err)))
  status = 1
end


-- Sends one request on sock and reads the response head and its
-- Content-Length body. Returns true, or nil and what failed.
local function request(sock)
  local ok, err = sock:write(REQUEST)
  if not ok then
    return nil, "write: " .. tostring(err)
  end

  local head
  head, err = sock:readuntil("\r\n\r\n")
  if not head then
    return nil, "read head: " .. tostring(err)
  end

  local length = tonumber(head:lower():match("\r\ncontent%-length:%s*(%d+)"))
  if not length then
    return nil, "response has no Content-Length: " .. head
  end

  local body
  body, err = sock:readn(length)
  if not body then
    return nil, "read body: " .. tostring(err)
  end
  return true
end


local function close_all()
  for _, sock in ipairs(socks) do
    sock:close()
  end
  core.stop()
end


core.spawn(function()
  for i = 1, count do
    local sock, err = core.tcp.connect("127.0.0.1", port)
    if not sock then
      fail(i, "connect", err)
      return close_all()
    end
    socks[i] = sock

    local ok
    ok, err = request(sock)
    if not ok then
      fail(i, "request", err)
      return close_all()
    end
  end

  io.stdout:write("ready ", #socks, "\n")
  io.stdout:flush()

  core.sleep(hold_seconds)
  close_all()
end)

core.signal.on("SIGTERM", close_all)
core.signal.on("SIGINT", close_all)

core.run()
os.exit(status)
