-- A stand-in platform API for daemon benchmarks: answers every request
-- with 200 and the JSON body {}, which the daemon's heartbeat loop takes
-- as an accepted heartbeat with nothing to do. The benchmarked daemon
-- points platform_url here, so its heartbeats stay on a server that the
-- benchmark started. Prints the port it listens on, then serves until
-- SIGTERM or SIGINT.
--
--   luajit tools/bench/daemon_platform.lua [build-dir]
--
-- build-dir defaults to "build"; the module is loaded from
-- build-dir/lua/justavps/core.so.
local build_dir = arg[1] or "build"
package.cpath = build_dir .. "/lua/?.so;" .. package.cpath

local core = require("justavps.core")

local JSON = { ["Content-Type"] = "application/json" }

local server = assert(core.http.listen({
  host = "127.0.0.1",
  port = 0,
  access_log = false,
  handler = function(req)
    -- Read the heartbeat body so that the connection stays reusable.
    while req:read() do
    end
    return 200, JSON, "{}"
  end,
}))

io.stdout:write(server:port(), "\n")
io.stdout:flush()

local function stop()
  server:close()
  core.stop()
end

core.signal.on("SIGTERM", stop)
core.signal.on("SIGINT", stop)

core.run()
