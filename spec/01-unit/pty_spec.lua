-- core.pty: a real shell on a pseudo-terminal.
local core = require("justavps.core")
local helpers = require("spec.support.helpers")

local pty = core.pty

-- Reads from t until the output so far contains needle (a Lua pattern
-- when is_pattern is true); returns it all. Fails on end of stream or after
-- the socket timeout.
local function read_until_seen(t, needle, is_pattern)
  local seen = ""
  while not seen:find(needle, 1, not is_pattern) do
    local data, msg = t:read()
    assert(data, "no '" .. needle .. "' before: " .. tostring(msg)
           .. "; output so far: " .. seen)
    seen = seen .. data
  end
  return seen
end

-- Reads to end of stream and returns the last error code.
local function drain(t)
  while true do
    local data, _, code = t:read()
    if not data then
      return code
    end
  end
end

local function spawn_sh(opts)
  opts = opts or {}
  opts.file = opts.file or "/bin/sh"
  local t = assert(pty.spawn(opts))
  t:settimeout(10)
  return t
end

describe("core.pty", function()
  it("runs a shell that echoes", helpers.async(function()
    local t = spawn_sh()
    assert.is_number(t:pid())
    -- The quotes keep the terminal's echo of the input from matching.
    assert(t:write('echo h""i-there\n'))
    read_until_seen(t, "hi-there")
    assert(t:write("exit\n"))
    assert.equal(0, (t:wait(10)))
    t:close()
  end))

  it("reports the shell's exit status", helpers.async(function()
    local t = spawn_sh()
    assert(t:write("exit 5\n"))
    local code, sig = t:wait(10)
    assert.equal(5, code)
    assert.is_nil(sig)
    assert.is_true(t:exited())
    -- The master reads EIO once the slave side is gone: end of stream.
    assert.equal("closed", drain(t))
    t:close()
  end))

  it("sets and changes the window size", helpers.async(function()
    local t = spawn_sh{ cols = 100, rows = 30 }
    assert(t:write("stty size; echo do''ne1\n"))
    local out = read_until_seen(t, "done1")
    assert.matches("30 100", out, 1, true)

    assert.is_true(t:resize(132, 43))
    assert(t:write("stty size; echo do''ne2\n"))
    out = read_until_seen(t, "done2")
    assert.matches("43 132", out, 1, true)

    assert(t:write("exit\n"))
    t:wait(10)
    t:close()
  end))

  it("passes multibyte UTF-8 intact", helpers.async(function()
    local t = spawn_sh()
    -- printf joins the halves, so only real output has them together.
    assert(t:write("printf '%s%s\\n' 'A:é€' '🙂:B'\n"))
    read_until_seen(t, "A:é€🙂:B")
    assert(t:write("exit\n"))
    t:wait(10)
    t:close()
  end))

  it("sets TERM unless env names one", helpers.async(function()
    local t = spawn_sh{ env = { PATH = "/usr/bin:/bin" } }
    assert(t:write('echo "T=$TERM"\n'))
    read_until_seen(t, "T=xterm-256color")
    assert(t:write("exit\n"))
    t:wait(10)
    t:close()

    t = spawn_sh{ env = { TERM = "dumb", PATH = "/usr/bin:/bin" } }
    assert(t:write('echo "T=$TERM."\n'))
    read_until_seen(t, "T=dumb.")
    assert(t:write("exit\n"))
    t:wait(10)
    t:close()
  end))

  it("runs a command with args in cwd", helpers.async(function()
    local t = spawn_sh{ args = { "-c", "pwd; exit 7" }, cwd = "/tmp" }
    local out = read_until_seen(t, "/tmp")
    assert.matches("/tmp\r\n", out, 1, true)
    assert.equal(7, (t:wait(10)))
    t:close()
  end))

  it("reports a cwd that does not exist", helpers.async(function()
    local t, msg, code = pty.spawn{ file = "/bin/sh", cwd = "/nonexistent/x" }
    assert.is_nil(t)
    assert.equal("ENOENT", code)
    assert.matches("chdir", msg, 1, true)
  end))

  it("reports a missing program", helpers.async(function()
    local t, msg, code = pty.spawn{ file = "no-such-program-here" }
    assert.is_nil(t)
    assert.equal("ENOENT", code)
    assert.matches("exec", msg, 1, true)
  end))

  it("kills the session with a signal", helpers.async(function()
    local t = spawn_sh()
    assert(t:write("sleep 100\n"))
    core.sleep(0.2)
    assert.is_true(t:kill("SIGKILL"))
    local code, sig = t:wait(10)
    assert.equal("SIGKILL", sig)
    assert.equal(128 + 9, code)
    t:close()
  end))

  it("signals the foreground job's group", helpers.async(function()
    local t = spawn_sh()
    -- An interactive shell runs the job in its own process group and
    -- ignores SIGTERM itself.
    assert(t:write("sh -c 'echo JOB=$$; exec sleep 100'\n"))
    local out = read_until_seen(t, "JOB=%d+\r", true)
    local job = tonumber(out:match("JOB=(%d+)"))
    for _ = 1, 100 do
      if t:kill("SIGTERM") and not core.proc.kill(job, 0) then
        break
      end
      core.sleep(0.05)
    end
    assert.is_nil(core.proc.kill(job, 0))
    assert.is_false(t:exited())
    t:kill("SIGKILL")
    t:wait(10)
    t:close()
  end))

  it("runs a login shell", helpers.async(function()
    local t = spawn_sh{
      file = "/bin/bash", login = true,
      args = { "-c", "shopt -q login_shell && echo LOG''IN" },
    }
    read_until_seen(t, "LOGIN")
    assert.equal(0, (t:wait(10)))
    t:close()
  end))

  it("coexists with uv_spawn children", helpers.async(function()
    local t = spawn_sh{ args = { "-c", "sleep 0.3; exit 4" } }
    local p = assert(core.proc.spawn{ file = "sh", args = { "-c", "exit 6" } })
    local q = assert(core.proc.spawn{
      file = "sh", args = { "-c", "sleep 0.5; exit 8" },
    })
    local t2 = spawn_sh{ args = { "-c", "exit 2" } }
    assert.equal(6, (p:wait(10)))
    assert.equal(4, (t:wait(10)))
    assert.equal(8, (q:wait(10)))
    assert.equal(2, (t2:wait(10)))
    t:close()
    t2:close()
  end))

  it("exposes the socket as io", helpers.async(function()
    local t = spawn_sh{ args = { "-c", "echo via-io" } }
    assert.equal("userdata", type(t.io))
    read_until_seen(t.io, "via-io")
    t:wait(10)
    t:close()
    assert.is_true(t:closed())
    assert.is_nil(t:resize(80, 24))
  end))

  it("rejects bad options", function()
    assert.has_error(function() pty.spawn{} end)
    assert.has_error(function() pty.spawn{ file = "sh", cols = 0 } end)
    assert.has_error(function() pty.spawn{ file = "sh", rows = "x" } end)
  end)
end)
