-- justavps serve: the HTTP host on its own, serving the hello app with hot
-- reload. It shows the host's request path and reload without a database,
-- and the host's benchmarks and hot-reload specs run against it.
local service = require("justavps.service")

local _M = {}

_M.summary = "the HTTP host alone, serving the hello app with hot reload"

_M.options = {
  { host = { type = "string", default = "127.0.0.1",
    description = "address to listen on (IPv4 or IPv6 literal)" } },
  { port = { type = "integer", default = 8080, between = { 0, 65535 },
    description = "TCP port to listen on; 0 picks a free one" } },
  { watch = { type = "boolean", default = true,
    description = "reload the app when a Lua file under the tree changes" } },
  { drain_timeout = { type = "duration", default = 10, between = { 0, 3600 },
    description = "seconds to let requests finish on SIGTERM or SIGINT" } },
  { access_log = { type = "boolean", default = true,
    description = "log one line per request" } },
}


function _M.run(opts)
  return service.run({
    app = "justavps.apps.hello",
    host = opts.host,
    port = opts.port,
    watch = opts.watch,
    drain_timeout = opts.drain_timeout,
    access_log = opts.access_log,
  })
end


return _M
