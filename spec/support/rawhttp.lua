-- A deliberately small HTTP/1.1 client over core.tcp for specs: it sends
-- bytes exactly as given and parses responses independently of the
-- server's own code, so smuggling and framing cases can be checked.
local core = require("justavps.core")

local tonumber = tonumber

local _M = {}

function _M.connect(port, host)
  local sock = assert(core.tcp.connect(host or "127.0.0.1", port))
  sock:settimeout(5)
  return sock
end

-- Reads one response from sock. Returns a table {status, headers (lower-case
-- names, last value wins), body} or nil, err when the peer closed first.
function _M.read_response(sock, opts)
  opts = opts or {}
  local head, err = sock:readuntil("\r\n\r\n", 65536)
  if not head then
    return nil, err
  end

  local status_line, rest = head:match("^([^\r\n]*)\r\n(.*)$")
  status_line = status_line or head
  local status = tonumber(status_line:match("^HTTP/1%.[01] (%d%d%d)"))
  local headers = {}
  for name, value in (rest or ""):gmatch("([^:\r\n]+):%s*([^\r\n]*)") do
    headers[name:lower()] = value
  end

  local res = { status = status, headers = headers, status_line = status_line }
  if opts.head or status == 204 or status == 304 or (status and status < 200) then
    res.body = ""
    return res
  end

  if headers["transfer-encoding"] == "chunked" then
    local parts = {}
    while true do
      local size_line = assert(sock:readuntil("\r\n"))
      local size = tonumber(size_line:match("^%x+"), 16)
      if size == 0 then
        assert(sock:readuntil("\r\n"))
        break
      end
      parts[#parts + 1] = assert(sock:readn(size))
      assert(sock:readn(2))
    end
    res.body = table.concat(parts)
  elseif headers["content-length"] then
    res.body = assert(sock:readn(tonumber(headers["content-length"])))
  else
    local parts = {}
    while true do
      local d = sock:read()
      if not d then
        break
      end
      parts[#parts + 1] = d
    end
    res.body = table.concat(parts)
  end

  return res
end

-- Returns true when the server has closed the connection: a read yields
-- end of stream rather than data.
function _M.is_closed(sock)
  local data, _, code = sock:read()
  return data == nil and (code == "closed" or code == "ECONNRESET")
end

return _M
