-- Connected sockets on loopback for specs of socket-level code (pipes,
-- streams). Call from a coroutine (helpers.run or helpers.async).
local core = require("justavps.core")

local _M = {}


-- Returns two connected TCP sockets on 127.0.0.1: the dialed end and the
-- end the listener accepted. With timeout, both get it for later reads
-- and writes.
function _M.pair(timeout)
  local accepted
  local got = core.waiter()
  local listener = assert(core.tcp.listen({ host = "127.0.0.1", port = 0,
    on_accept = function(sock)
      accepted = sock
      got:wake()
    end }))
  local client = assert(core.tcp.connect("127.0.0.1", listener:port()))
  if not accepted then
    got:wait(5)
  end
  listener:close()
  assert(accepted, "no connection accepted")
  if timeout then
    client:settimeout(timeout)
    accepted:settimeout(timeout)
  end
  return client, accepted
end


-- Runs pipe(a, b, opts) in a coroutine of its own (pipe defaults to
-- core.pipe). Returns a table whose wait([seconds]) returns the list of
-- the pipe's return values once it has finished, and raises when it has
-- not finished within seconds (default 30).
function _M.start_pipe(a, b, opts, pipe)
  pipe = pipe or core.pipe
  local result = { done = core.waiter() }
  core.spawn(function()
    result.values = { pipe(a, b, opts) }
    result.finished = true
    result.done:wake()
  end)
  function result.wait(seconds)
    if not result.finished then
      result.done:wait(seconds or 30)
    end
    assert(result.finished, "pipe did not finish")
    return result.values
  end
  return result
end


-- Returns what arrives on sock within seconds, as one string. The socket
-- keeps the last read timeout it was given.
function _M.read_for(sock, seconds)
  core.update_time()
  local deadline = core.now() + seconds
  local parts = {}
  while true do
    core.update_time()
    local left = deadline - core.now()
    if left <= 0 then
      break
    end
    sock:settimeout(left)
    local data = sock:read()
    if not data then
      break
    end
    parts[#parts + 1] = data
  end
  return table.concat(parts)
end


return _M
