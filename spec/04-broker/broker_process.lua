-- Spec support for the broker: a real `justavps broker` process, a
-- loopback backend that reports what it received, and a signer written
-- from the wire contract alone. The signer does not use justavps.edge_sig,
-- so a mistake in the shared module cannot hide on both sides.
local core = require("justavps.core")
local json = require("justavps.json")
local websocket = require("justavps.websocket")

local crypto = core.crypto

local _M = {}

_M.BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

_M.SECRET = "spec-secret-0123456789abcdef0123456789"
_M.BROKER_ID = "spec-broker"

-- The eight headers in signing order, with the field each carries.
_M.HEADERS = {
  { "ip", "X-JustAVPS-Target-IP" },
  { "port", "X-JustAVPS-Target-Port" },
  { "slug", "X-JustAVPS-Slug" },
  { "client", "X-JustAVPS-Client-IP" },
  { "ts", "X-JustAVPS-Timestamp" },
  { "nonce", "X-JustAVPS-Nonce" },
  { "broker", "X-JustAVPS-Broker" },
  { "sig", "X-JustAVPS-Signature" },
}


local function sh(cmd)
  assert(os.execute(cmd) == 0, "command failed: " .. cmd)
end


function _M.temp_dir()
  local dir = os.tmpname()
  os.remove(dir)
  sh("mkdir -p " .. dir)
  return dir
end


-- Starts a broker with the config table conf. Returns a handle with
-- port, lines (every stderr line so far), process and dir.
function _M.start(conf, args)
  local dir = _M.temp_dir()
  local path = dir .. "/broker.json"
  local f = assert(io.open(path, "w"))
  f:write(assert(json.encode(conf)))
  f:close()

  local argv = { "broker", "--config", path }
  for _, a in ipairs(args or {}) do
    argv[#argv + 1] = a
  end
  local p = assert(core.proc.spawn{
    file = _M.BIN,
    args = argv,
    env = { PATH = os.getenv("PATH") },
    stdin = "null", stdout = "null", stderr = "pipe",
  })

  local handle = { process = p, lines = {}, dir = dir }
  local ready = core.waiter()
  local ended = false
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      handle.lines[#handle.lines + 1] = line
      local port = line:match("msg=listening .*port=(%d+)")
      if port then
        handle.port = tonumber(port)
        ready:wake()
      end
    end
    ended = true
    ready:wake()
  end)

  if not handle.port and not ended then
    ready:wait(10)
  end
  handle.ended = function()
    return ended
  end
  return handle
end


function _M.stop(handle)
  handle.process:kill("SIGTERM")
  local status = handle.process:wait(10)
  os.execute("rm -rf " .. handle.dir)
  return status
end


-- Returns the stderr lines of handle that contain text, as one string.
function _M.log_matching(handle, text)
  local out = {}
  for _, line in ipairs(handle.lines) do
    if line:find(text, 1, true) then
      out[#out + 1] = line
    end
  end
  return table.concat(out, "\n")
end


-- A backend on 127.0.0.1 that reports the method, target and headers it
-- received as JSON, with a few paths for streaming, WebSocket and
-- slowness.
function _M.backend()
  return assert(core.http.listen{
    host = "127.0.0.1",
    port = 0,
    access_log = false,
    handler = function(req)
      if req.path == "/sse" then
        req:send_head(200, { ["Content-Type"] = "text/event-stream" })
        for i = 1, 3 do
          req:write("data: event " .. i .. "\n\n")
          core.sleep(0.05)
        end
        return
      end

      if req.path == "/ws" then
        local ok, key = websocket.check_request(req.method, function(name)
          return req:header(name)
        end)
        assert(ok)
        local seen = req:headers()
        local sock = req:hijack()
        websocket.server_handshake(sock, key)
        local conn = websocket.wrap(sock, { role = "server" })
        -- The first message back reports the handshake's headers.
        conn:send(json.encode(seen), "text")
        while true do
          local data, kind = conn:recv()
          if not data or kind == "close" then
            break
          end
          conn:send(data, kind)
        end
        return
      end

      if req.path == "/slow" then
        core.sleep(4)
        return 200, nil, "late\n"
      end

      local total = 0
      while true do
        local data = req:read()
        if not data then
          break
        end
        total = total + #data
      end

      return 200, { ["Content-Type"] = "application/json",
        ["Connection"] = "X-Private", ["X-Private"] = "hop",
        ["X-Kept"] = "yes" },
        json.encode({
          method = req.method,
          target = req.target,
          headers = req:headers(),
          body_bytes = total,
        })
    end,
  })
end


-- Returns a fresh set of request fields with defaults for backend_port.
-- Every value is a string, as on the wire.
function _M.fields(backend_port, overrides)
  local f = {
    method = "GET",
    host = "app-1.example.test",
    target = "/",
    ip = "127.0.0.1",
    port = tostring(backend_port),
    slug = "spec-machine",
    client = "198.51.100.7",
    ts = tostring(math.floor(core.time())),
    nonce = assert(crypto.random_token(24)),
    broker = _M.BROKER_ID,
  }
  for k, v in pairs(overrides or {}) do
    f[k] = v
  end
  return f
end


-- Signs f by hand from the contract: eleven lines joined by "\n", the
-- host lowercased, HMAC-SHA256 under the secret, "v1=" and lowercase hex.
function _M.sign(f, secret)
  local text = table.concat({
    "JUSTAVPS-HMAC-SHA256-V1",
    f.method,
    f.host:lower(),
    f.target,
    f.ip,
    f.port,
    f.slug,
    f.client,
    f.ts,
    f.nonce,
    f.broker,
  }, "\n")
  local mac = assert(crypto.hmac_sha256(secret or _M.SECRET, text))
  return "v1=" .. crypto.hex_encode(mac)
end


-- Returns a copy of f, signed unless it already carries a signature.
function _M.signed(f)
  local out = {}
  for k, v in pairs(f) do
    out[k] = v
  end
  out.sig = out.sig or _M.sign(out)
  return out
end


-- Returns the request headers for f (Host and the eight), leaving out the
-- header named skip, plus extra.
function _M.headers(f, skip, extra)
  local h = { Host = f.host }
  for _, entry in ipairs(_M.HEADERS) do
    if entry[2] ~= skip then
      h[entry[2]] = f[entry[1]]
    end
  end
  for k, v in pairs(extra or {}) do
    h[k] = v
  end
  return h
end


-- Sends f (signed when it has no signature) to the broker on port.
-- opts: skip (a header to leave out), headers (extra headers), body,
-- tls and server_name. Returns the response, its body and the decoded
-- JSON body (or nil).
function _M.send(port, f, opts)
  opts = opts or {}
  local s = _M.signed(f)
  local res, err = core.http.request{
    method = s.method,
    host = "127.0.0.1",
    port = port,
    path = s.target,
    headers = _M.headers(s, opts.skip, opts.headers),
    body = opts.body,
    tls = opts.tls,
    server_name = opts.server_name,
    timeout = 10,
  }
  assert(res, err)
  local body = assert(res:read_body())
  res:close()
  return res, body, json.decode(body)
end


return _M
