-- Measures WebSocket echo throughput for tools/bench/chain.sh: opens one
-- WebSocket to 127.0.0.1:port/ws, sends 64 KiB binary messages for the
-- given seconds with up to 8 of them unanswered at a time, and counts the
-- bytes that come back. Run it from the repository root.
--
--   luajit tools/bench/chain_ws.lua port seconds [host] [authorization]
--                                   [build-dir]
--
-- host (default 127.0.0.1) is sent as Host, and Origin is http://HOST,
-- which is what the edge requires of a WebSocket handshake.
-- authorization, when given and not empty, is sent as the Authorization
-- header. build-dir defaults to "build".
--
-- Prints one line on stdout, for chain.sh to read:
--   ws messages=N bytes=N seconds=S mb_per_s=X
-- where bytes counts the echoed payload received (one direction) and MB
-- is 10^6 bytes. Exits with status 1, with the reason on stderr, when the
-- handshake fails, an echo differs in size, or nothing comes back for 10 s.
local port = tonumber(arg[1])
local seconds = tonumber(arg[2])
local host = arg[3] or "127.0.0.1"
local authorization = arg[4]
local build_dir = arg[5] or "build"

if not port or not seconds then
  io.stderr:write("usage: luajit tools/bench/chain_ws.lua port seconds ",
    "[host] [authorization] [build-dir]\n")
  os.exit(2)
end

package.cpath = build_dir .. "/lua/?.so;" .. package.cpath
package.path = "lua/?.lua;" .. package.path

local core = require("justavps.core")
local websocket = require("justavps.websocket")

local MESSAGE_SIZE = 64 * 1024
local WINDOW = 8
local STALL_SECONDS = 10

local status = 1


local function fail(message)
  io.stderr:write("chain_ws: ", message, "\n")
end


local function measure()
  local sock, err = core.tcp.connect("127.0.0.1", port)
  if not sock then
    return fail("connect to 127.0.0.1:" .. port .. " failed: "
      .. tostring(err))
  end
  sock:settimeout(STALL_SECONDS)
  local headers = { Origin = "http://" .. host }
  if authorization and authorization ~= "" then
    headers.Authorization = authorization
  end
  local ok, _, code, response_status = websocket.client_handshake(sock,
    { host = host, path = "/ws", headers = headers })
  if not ok then
    sock:close()
    return fail("handshake failed: " .. tostring(code) .. " "
      .. tostring(response_status))
  end
  local conn = websocket.wrap(sock, { role = "client",
    max_message = 2 * MESSAGE_SIZE })

  local payload = string.rep("\171", MESSAGE_SIZE)
  local in_flight = 0
  local sending = true
  local send_failed
  local slot = core.waiter()

  -- The sender keeps at most WINDOW messages unanswered, so that neither
  -- side buffers without bound.
  core.spawn(function()
    local deadline = core.now() + seconds
    while core.now() < deadline do
      while in_flight >= WINDOW do
        slot:wait()
      end
      in_flight = in_flight + 1
      local sent, serr = conn:send(payload, "binary")
      if not sent then
        send_failed = tostring(serr)
        break
      end
    end
    sending = false
  end)

  local started = core.now()
  local messages, bytes = 0, 0
  while sending or in_flight > 0 do
    if send_failed then
      return fail("send failed: " .. send_failed)
    end
    local data, kind = conn:recv()
    if not data then
      return fail("receive failed after " .. messages .. " messages: "
        .. tostring(kind))
    end
    if #data ~= MESSAGE_SIZE then
      return fail("echo of " .. #data .. " bytes, expected " .. MESSAGE_SIZE)
    end
    messages = messages + 1
    bytes = bytes + #data
    in_flight = in_flight - 1
    slot:wake()
  end
  local elapsed = core.now() - started
  conn:close()

  io.stdout:write(string.format(
    "ws messages=%d bytes=%d seconds=%.3f mb_per_s=%.1f\n",
    messages, bytes, elapsed, bytes / elapsed / 1e6))
  status = 0
end


core.spawn(function()
  local ok, err = pcall(measure)
  if not ok then
    fail(tostring(err))
  end
  core.stop()
end)
core.run()
os.exit(status)
