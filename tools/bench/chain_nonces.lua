-- Sends count signed requests (lua/justavps/edge_sig.lua, each with a
-- fresh nonce) to a broker on 127.0.0.1, over 8 keep-alive connections,
-- so that the broker records count nonces. Run it from the repository
-- root.
--
--   luajit tools/bench/chain_nonces.lua broker-port count broker-id secret
--                                       target-port slug [build-dir]
--
-- The requests are GET / signed for target 127.0.0.1:target-port. Every
-- response must be 200 or 403 (target_denied, when the broker's policy
-- denies the port, which it checks after recording the nonce). Prints
-- "sent N" on stdout; exits with status 1 and the reason on stderr when a
-- request fails or gets another status.
local port = tonumber(arg[1])
local count = tonumber(arg[2])
local broker_id, secret = arg[3], arg[4]
local target_port = tonumber(arg[5])
local slug = arg[6]
local build_dir = arg[7] or "build"

if not port or not count or not secret or not target_port or not slug then
  io.stderr:write("usage: luajit tools/bench/chain_nonces.lua broker-port ",
    "count broker-id secret target-port slug [build-dir]\n")
  os.exit(2)
end

package.cpath = build_dir .. "/lua/?.so;" .. package.cpath
package.path = "lua/?.lua;" .. package.path

local core = require("justavps.core")
local edge_sig = require("justavps.edge_sig")

local CONNECTIONS = 8
local HOST = slug .. ".chain.test"

local next_index = 0
local sent = 0
local failure
local running = CONNECTIONS
local done = core.waiter()


local function request_text()
  local headers = edge_sig.sign(secret, {
    method = "GET", host = HOST, target = "/", target_ip = "127.0.0.1",
    target_port = target_port, slug = slug, client_ip = "127.0.0.1",
    broker_id = broker_id,
  })
  local lines = { "GET / HTTP/1.1", "Host: " .. HOST }
  for name, value in pairs(headers) do
    lines[#lines + 1] = name .. ": " .. value
  end
  lines[#lines + 1] = "\r\n"
  return table.concat(lines, "\r\n")
end


-- Sends one request and reads its response. Returns true or nil, reason.
local function exchange(sock)
  local ok, err = sock:write(request_text())
  if not ok then
    return nil, "write: " .. tostring(err)
  end
  local head
  head, err = sock:readuntil("\r\n\r\n")
  if not head then
    return nil, "read head: " .. tostring(err)
  end
  local code = head:match("^HTTP/1%.1 (%d+)")
  if code ~= "200" and code ~= "403" then
    return nil, "unexpected response: " .. head
  end
  local length = tonumber(head:lower():match("\r\ncontent%-length:%s*(%d+)"))
  if not length then
    return nil, "response has no Content-Length: " .. head
  end
  if length > 0 then
    local body
    body, err = sock:readn(length)
    if not body then
      return nil, "read body: " .. tostring(err)
    end
  end
  return true
end


local function worker()
  local sock, err = core.tcp.connect("127.0.0.1", port)
  if not sock then
    failure = "connect failed: " .. tostring(err)
  else
    sock:settimeout(10)
    while not failure and next_index < count do
      next_index = next_index + 1
      local ok, reason = exchange(sock)
      if not ok then
        failure = reason
        break
      end
      sent = sent + 1
    end
    sock:close()
  end
  running = running - 1
  if running == 0 then
    done:wake()
  end
end


core.spawn(function()
  for _ = 1, CONNECTIONS do
    core.spawn(worker)
  end
  done:wait()
  core.stop()
end)
core.run()

if failure then
  io.stderr:write("chain_nonces: ", failure, " (after ", sent,
    " requests)\n")
  os.exit(1)
end
io.stdout:write("sent ", sent, "\n")
