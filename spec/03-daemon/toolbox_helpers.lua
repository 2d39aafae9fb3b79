-- Helpers for the toolbox specs: a real `justavps daemon` process on
-- loopback with a temporary toolbox root and state directory, and an HTTP
-- client for /_toolbox.
local core = require("justavps.core")
local json = require("justavps.json")

local _M = {}

_M.BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")


function _M.sh(cmd)
  assert(os.execute(cmd) == 0, "command failed: " .. cmd)
end


function _M.tmpdir()
  local dir = os.tmpname()
  os.remove(dir)
  _M.sh("mkdir -p " .. dir)
  return dir
end


function _M.read_file(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local data = f:read("*a")
  f:close()
  return data
end


function _M.write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end


-- Returns the names in dir, as `ls -A` lists them.
function _M.ls(dir)
  local names = {}
  local p = io.popen("ls -A '" .. dir .. "'")
  for line in p:lines() do
    names[#names + 1] = line
  end
  p:close()
  return names
end


-- Starts a daemon whose toolbox root is base/root and whose state
-- directory is base/state, with its config in base/daemon.json. Returns
-- an object with port, proc, lines (its stderr), log() and stop().
function _M.start_daemon(base)
  local root, state_dir = base .. "/root", base .. "/state"
  _M.sh("mkdir -p " .. root .. " " .. state_dir)
  local conf_path = base .. "/daemon.json"
  _M.write_file(conf_path, json.encode({
    slug = "spec-1",
    token = "0123456789abcdef0123",
    public = { host = "127.0.0.1", port = 0 },
    internal = { host = "127.0.0.1", port = 0 },
    broker_cidrs = { "127.0.0.0/8" },
    toolbox_root = root,
    state_dir = state_dir,
  }))

  local p = assert(core.proc.spawn({
    file = _M.BIN,
    args = { "daemon", "--config", conf_path, "--access-log=false" },
    env = { PATH = os.getenv("PATH"), HOME = os.getenv("HOME") },
    stdin = "null", stdout = "null", stderr = "pipe",
  }))

  local d = { proc = p, lines = {}, conf_path = conf_path }
  local got_port = core.waiter()
  core.spawn(function()
    while true do
      local line = p.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      d.lines[#d.lines + 1] = line
      local n = line:match("msg=listening .*listener=public .*port=(%d+)")
      if n and not d.port then
        d.port = tonumber(n)
        got_port:wake()
      end
    end
  end)
  if not d.port then
    got_port:wait(15)
  end
  assert(d.port, "the daemon did not report its public port; log:\n"
    .. table.concat(d.lines, "\n"))

  function d.log()
    return table.concat(d.lines, "\n")
  end

  function d.stop()
    p:kill("SIGTERM")
    local status = p:wait(20)
    if not status then
      p:kill("SIGKILL")
      p:wait(5)
    end
    return status
  end

  return d
end


-- Sends a request to /_toolbox/PATH on daemon d and reads the whole body.
-- Returns res, body or nil, message, code.
function _M.request(d, method, path, opts)
  opts = opts or {}
  local res, err, code = core.http.request({
    method = method, host = "127.0.0.1", port = d.port,
    path = "/_toolbox" .. path, headers = opts.headers, body = opts.body,
    body_reader = opts.body_reader, timeout = opts.timeout or 60,
  })
  if not res then
    return nil, err, code
  end
  local body, berr, bcode = res:read_body(256 * 1024 * 1024)
  res:close()
  if not body then
    return nil, berr, bcode
  end
  return res, body
end


-- Like request, with a JSON body (when value is given) and a JSON reply.
-- Returns res, decoded.
function _M.call(d, method, path, value)
  local res, body = _M.request(d, method, path, {
    body = value ~= nil and json.encode(value) or nil,
    headers = value ~= nil and { ["Content-Type"] = "application/json" }
      or nil,
  })
  assert(res, "request " .. method .. " " .. path .. " failed: "
    .. tostring(body))
  local decoded = json.decode(body)
  assert(decoded ~= nil, "reply to " .. method .. " " .. path
    .. " is not JSON: " .. body)
  return res, decoded
end


-- Opens a streamed response. Returns res, to be read with read_until.
function _M.open(d, method, path, value)
  local res = assert(core.http.request({
    method = method, host = "127.0.0.1", port = d.port,
    path = "/_toolbox" .. path,
    body = value ~= nil and json.encode(value) or nil, timeout = 60,
  }))
  return res
end


-- Reads res until pred(text so far) is true or the body ends. Returns the
-- text and whether the body ended.
function _M.read_until(res, text, pred)
  while not pred(text) do
    local piece = res:read()
    if not piece then
      return text, true
    end
    text = text .. piece
  end
  return text, false
end


-- Decodes NDJSON text into a list of values.
function _M.ndjson(text)
  local out = {}
  for line in text:gmatch("([^\n]+)\n") do
    out[#out + 1] = assert(json.decode(line), "not JSON: " .. line)
  end
  return out
end


-- Polls fn every 0.1 s until it returns a true value or seconds pass.
-- Returns that value, or nil.
function _M.eventually(seconds, fn)
  local deadline = core.now() + seconds
  while true do
    local v = fn()
    if v then
      return v
    end
    core.update_time()
    if core.now() > deadline then
      return nil
    end
    core.sleep(0.1)
  end
end


-- Returns true when no process has pid (kill(pid, 0) fails with ESRCH).
function _M.gone(pid)
  local ok, _, code = core.proc.kill(pid, 0)
  return not ok and code == "ESRCH"
end


return _M
