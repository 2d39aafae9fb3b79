-- The backend of tools/bench/chain.sh: GET / returns the same 12-byte body
-- as tools/bench/bare_server.lua, and /ws is a WebSocket that echoes every
-- message back. Prints the port it listens on, then serves until SIGTERM
-- or SIGINT. Run it from the repository root.
--
--   luajit tools/bench/chain_backend.lua [build-dir]
local build_dir = arg[1] or "build"
package.cpath = build_dir .. "/lua/?.so;" .. package.cpath
package.path = "lua/?.lua;" .. package.path

local core = require("justavps.core")
local websocket = require("justavps.websocket")

local TEXT = { ["Content-Type"] = "text/plain" }
local GREETING = "hello world\n"
-- Largest echoed message: the client sends 64 KiB messages.
local MAX_MESSAGE = 1024 * 1024


local function echo(req)
  local ok, key = websocket.check_request(req.method, function(name)
    return req:header(name)
  end)
  if not ok then
    return 400, TEXT, "expected a WebSocket handshake\n"
  end
  local sock = req:hijack()
  websocket.server_handshake(sock, key)
  local conn = websocket.wrap(sock, { role = "server",
    max_message = MAX_MESSAGE })
  while true do
    local data, kind = conn:recv()
    if not data or kind == "close" then
      break
    end
    if not conn:send(data, kind) then
      break
    end
  end
end


local server = assert(core.http.listen{
  host = "127.0.0.1",
  port = 0,
  access_log = false,
  handler = function(req)
    if req.path == "/ws" then
      return echo(req)
    end
    return 200, TEXT, GREETING
  end,
})

io.stdout:write(server:port(), "\n")
io.stdout:flush()

local function stop()
  server:close()
  core.stop()
end

core.signal.on("SIGTERM", stop)
core.signal.on("SIGINT", stop)

core.run()
