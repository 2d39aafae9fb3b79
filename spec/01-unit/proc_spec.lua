-- core.proc: real children through uv_spawn, their pipes and exit status.
local core = require("justavps.core")
local helpers = require("spec.support.helpers")

local proc = core.proc

-- Reads a socket to end of stream and returns everything it delivered.
local function read_all(sock)
  local parts = {}
  while true do
    local data, _, code = sock:read()
    if not data then
      assert.equal("closed", code)
      break
    end
    parts[#parts + 1] = data
  end
  return table.concat(parts)
end

-- Returns true when pid is gone or only a zombie waiting for its parent:
-- either way it runs no more.
local function is_dead(pid)
  if not proc.kill(pid, 0) then
    return true
  end
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then
    return true
  end
  local stat = f:read("*a")
  f:close()
  return stat:match("^%d+ %b() (%a)") == "Z"
end

describe("core.proc", function()
  it("reads echo output to end of stream", helpers.async(function()
    local p = assert(proc.spawn{
      file = "/bin/echo", args = { "hello", "world" }, stdout = "pipe",
    })
    assert.is_number(p:pid())
    assert.equal("hello world\n", read_all(p.stdout))
    local code, sig = p:wait(10)
    assert.equal(0, code)
    assert.is_nil(sig)
    assert.is_true(p:exited())
    p.stdout:close()
  end))

  it("reports a non-zero exit status", helpers.async(function()
    local p = assert(proc.spawn{ file = "sh", args = { "-c", "exit 3" } })
    local code, sig = p:wait(10)
    assert.equal(3, code)
    assert.is_nil(sig)
    -- The status is kept after exit.
    assert.equal(3, (p:wait()))
  end))

  it("reports the signal that killed the child", helpers.async(function()
    local p = assert(proc.spawn{ file = "sleep", args = { "100" } })
    assert.is_true(p:kill("SIGTERM"))
    local code, sig = p:wait(10)
    assert.equal("SIGTERM", sig)
    assert.equal(128 + 15, code)
    local ok, _, err = p:kill("TERM")
    assert.is_nil(ok)
    assert.equal("ESRCH", err)
  end))

  it("lets several coroutines wait", helpers.async(function()
    local p = assert(proc.spawn{ file = "sh", args = { "-c", "sleep 0.2" } })
    local results = {}
    local done = core.waiter()
    for i = 1, 3 do
      core.spawn(function()
        results[i] = p:wait(10)
        if #results == 3 then
          done:wake()
        end
      end)
    end
    done:wait(10)
    assert.same({ 0, 0, 0 }, results)
  end))

  it("times out a wait and keeps the child", helpers.async(function()
    local p = assert(proc.spawn{ file = "sleep", args = { "100" } })
    local code, msg, err = p:wait(0.05)
    assert.is_nil(code)
    assert.is_string(msg)
    assert.equal("timeout", err)
    assert.is_false(p:exited())
    p:kill("KILL")
    assert.equal("SIGKILL", select(2, p:wait(10)))
  end))

  it("pipes stdin through cat", helpers.async(function()
    local p = assert(proc.spawn{
      file = "cat", stdin = "pipe", stdout = "pipe",
    })
    local payload = string.rep("0123456789abcdef", 20000) .. "é€🙂"
    core.spawn(function()
      assert(p.stdin:write(payload))
      assert(p.stdin:flush())
      -- Closing our end is what sends end of file to the child.
      p.stdin:close()
    end)
    local out = read_all(p.stdout)
    assert.equal(#payload, #out)
    assert.equal(payload, out)
    assert.equal(0, (p:wait(10)))
    p.stdout:close()
  end))

  it("honours env and cwd", helpers.async(function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. dir) == 0)
    local p = assert(proc.spawn{
      file = "/bin/sh",
      args = { "-c", 'printf "%s|%s|%s" "$FOO" "$PORT" "$(pwd)"' },
      env = { FOO = "bar baz", PORT = 3000 }, cwd = dir, stdout = "pipe",
    })
    assert.equal("bar baz|3000|" .. dir, read_all(p.stdout))
    assert.equal(0, (p:wait(10)))
    p.stdout:close()
    os.remove(dir)
  end))

  it("replaces the environment with env", helpers.async(function()
    local p = assert(proc.spawn{
      file = "/usr/bin/env", env = { ONLY = "1" }, stdout = "pipe",
    })
    assert.equal("ONLY=1\n", read_all(p.stdout))
    p:wait(10)
    p.stdout:close()
  end))

  it("merges stderr into stdout", helpers.async(function()
    local p = assert(proc.spawn{
      file = "sh", args = { "-c", "echo out; echo err >&2" },
      stdout = "pipe", stderr = "stdout",
    })
    assert.is_nil(p.stderr)
    assert.equal("out\nerr\n", read_all(p.stdout))
    p:wait(10)
    p.stdout:close()
  end))

  it("keeps stderr apart", helpers.async(function()
    local p = assert(proc.spawn{
      file = "sh", args = { "-c", "echo out; echo err >&2" },
      stdout = "pipe", stderr = "pipe",
    })
    assert.equal("err\n", read_all(p.stderr))
    assert.equal("out\n", read_all(p.stdout))
    p:wait(10)
    p.stdout:close()
    p.stderr:close()
  end))

  it("returns ENOENT for a missing program", helpers.async(function()
    local p, msg, err = proc.spawn{
      file = "/nonexistent/program", stdout = "pipe",
    }
    assert.is_nil(p)
    assert.equal("ENOENT", err)
    assert.matches("/nonexistent/program", msg, 1, true)
  end))

  it("returns ENOENT for a missing cwd", helpers.async(function()
    local p, _, err = proc.spawn{ file = "true", cwd = "/nonexistent/dir" }
    assert.is_nil(p)
    assert.equal("ENOENT", err)
  end))

  it("kills a detached group with its grandchildren", helpers.async(function()
    local p = assert(proc.spawn{
      file = "sh",
      args = { "-c", "sleep 100 & echo $!; sleep 100 & echo $!; wait" },
      stdout = "pipe", detached = true,
    })
    local pids = {}
    for i = 1, 2 do
      pids[i] = tonumber(assert(p.stdout:readuntil("\n")))
    end
    assert.is_true(proc.kill(pids[1], 0))
    assert.is_true(p:kill("TERM", true))
    local _, sig = p:wait(10)
    assert.equal("SIGTERM", sig)

    -- The grandchildren are reparented, so give their new parent time to
    -- reap them.
    for _ = 1, 100 do
      if is_dead(pids[1]) and is_dead(pids[2]) then
        break
      end
      core.sleep(0.05)
    end
    assert.is_true(is_dead(pids[1]))
    assert.is_true(is_dead(pids[2]))
    p.stdout:close()
  end))

  it("rejects a group kill without detached", helpers.async(function()
    local p = assert(proc.spawn{ file = "sleep", args = { "100" } })
    assert.has_error(function() p:kill("TERM", true) end)
    p:kill("KILL")
    p:wait(10)
  end))

  it("rejects bad options", function()
    assert.has_error(function() proc.spawn{} end)
    assert.has_error(function() proc.spawn{ file = "true", stdin = "file" } end)
    assert.has_error(function() proc.spawn{ file = "true", args = { {} } } end)
    assert.has_error(function()
      proc.spawn{ file = "true", env = { ["A=B"] = "x" } }
    end)
    assert.has_error(function() proc.kill(1, "SIGNOPE") end)
    assert.has_error(function() proc.kill(0, 0) end)
  end)

  it("survives collection of a running child", helpers.async(function()
    local pid
    do
      local p = assert(proc.spawn{ file = "sleep", args = { "100" } })
      pid = p:pid()
    end
    collectgarbage()
    collectgarbage()
    assert.is_true(proc.kill(pid, "KILL"))
    for _ = 1, 100 do
      if is_dead(pid) then
        break
      end
      core.sleep(0.05)
    end
    -- libuv still reaps it: the pid disappears rather than staying a
    -- zombie of ours.
    for _ = 1, 100 do
      if not proc.kill(pid, 0) then
        break
      end
      core.sleep(0.05)
    end
    assert.is_nil(proc.kill(pid, 0))
  end))

  it("returns our own pid", function()
    local f = assert(io.open("/proc/self/stat"))
    local own = tonumber(f:read("*a"):match("^(%d+)"))
    f:close()
    assert.equal(own, proc.getpid())
  end)
end)
