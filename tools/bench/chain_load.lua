-- Sends a fixed number of GET / requests to one hop of the proxy chain on
-- 127.0.0.1, spread over keep-alive connections, and prints
-- "done=N failed=M". tools/bench/chain.sh --cost uses it where wrk does
-- not fit: a hop under callgrind, which needs a request count instead of
-- a duration. Run it from the repository root.
--
--   luajit tools/bench/chain_load.lua build-dir MODE port count conns host
--                                     [MODE arguments]
--
-- MODE is one of:
--   plain   GET / with Host host, for the daemon's public port
--   edge    also Authorization: the next argument (for example
--           "Bearer sk_live_...")
--   broker  signed with lua/justavps/edge_sig.lua, fresh nonce each time,
--           for target 127.0.0.1:target-port; arguments: secret broker-id
--           slug target-port
-- Exits with status 1 when a connection fails. A response other than 200
-- counts as failed.
local build_dir, mode = arg[1], arg[2]
local port, count, conns = tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5])
local host = arg[6]

if not build_dir or not port or not count or not conns or not host
    or (mode ~= "plain" and mode ~= "edge" and mode ~= "broker") then
  io.stderr:write("usage: luajit tools/bench/chain_load.lua build-dir ",
    "plain|edge|broker port count conns host [mode arguments]\n")
  os.exit(2)
end

package.cpath = build_dir .. "/lua/?.so;" .. package.cpath
package.path = "lua/?.lua;" .. package.path

local core = require("justavps.core")
local edge_sig = require("justavps.edge_sig")

local concat = table.concat


local function request_head()
  if mode == "plain" then
    return "GET / HTTP/1.1\r\nHost: " .. host .. "\r\n\r\n"
  end
  if mode == "edge" then
    return "GET / HTTP/1.1\r\nHost: " .. host .. "\r\nAuthorization: "
      .. arg[7] .. "\r\n\r\n"
  end
  local signed = edge_sig.sign(arg[7], {
    method = "GET",
    host = host,
    target = "/",
    target_ip = "127.0.0.1",
    target_port = tonumber(arg[10]),
    slug = arg[9],
    client_ip = "127.0.0.1",
    broker_id = arg[8],
  })
  local lines = { "GET / HTTP/1.1", "Host: " .. host }
  for name, value in pairs(signed) do
    lines[#lines + 1] = name .. ": " .. value
  end
  return concat(lines, "\r\n") .. "\r\n\r\n"
end


local done, failed = 0, 0
local broken

for c = 1, conns do
  -- The first connections take the remainder, so count requests go out.
  local share = math.floor(count / conns) + (c <= count % conns and 1 or 0)
  core.spawn(function()
    local sock, err = core.tcp.connect("127.0.0.1", port, { timeout = 30 })
    if not sock then
      broken = err
      return
    end
    for _ = 1, share do
      local head
      local ok, werr = sock:write(request_head())
      if ok then
        head, werr = sock:readuntil("\r\n\r\n")
      end
      if not head then
        broken = werr
        break
      end
      local length = tonumber(head:match("[Cc]ontent%-[Ll]ength: *(%d+)"))
      if length and length > 0 and not sock:readn(length) then
        broken = "connection closed in a response body"
        break
      end
      if head:find("^HTTP/1%.1 200 ") then
        done = done + 1
      else
        failed = failed + 1
      end
    end
    sock:close()
  end)
end

core.run()
print(string.format("done=%d failed=%d", done, failed))
if broken then
  io.stderr:write("chain_load.lua: ", tostring(broken), "\n")
  os.exit(1)
end
