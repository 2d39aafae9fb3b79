-- The bare core HTTP server for benchmarks: core.http.listen with a handler
-- that returns the same 12-byte body as the dev role, without the router,
-- the reload machinery or the access log. Prints the port it listens on,
-- then serves until SIGTERM or SIGINT.
--
--   luajit tools/bench/bare_server.lua [build-dir] [port]
--
-- build-dir defaults to "build"; the module is loaded from
-- build-dir/lua/justavps/core.so. port defaults to 0 (a free port).
local build_dir = arg[1] or "build"
package.cpath = build_dir .. "/lua/?.so;" .. package.cpath

local core = require("justavps.core")

local port = tonumber(arg[2]) or 0
local TEXT = { ["Content-Type"] = "text/plain" }
local GREETING = "hello world\n"

local server = assert(core.http.listen{
  host = "127.0.0.1",
  port = port,
  access_log = false,
  handler = function()
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
