-- The daemon starts OpenSSL without its error strings, to stay small at
-- idle, and loads them on its first error. A heartbeat to a platform
-- whose certificate the daemon cannot verify must still log the reason
-- in words.
local core = require("justavps.core")
local helpers = require("support.helpers")
local json = require("justavps.json")

local async = helpers.async

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")


describe("daemon OpenSSL errors", function()
  it("log a readable TLS reason", async(function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/state " .. dir .. "/home")
      == 0)

    -- A platform with a certificate from a CA the daemon does not trust.
    assert(core.tls.generate{ ca = true, cn = "untrusted ca",
      cert_out = dir .. "/ca.pem", key_out = dir .. "/ca.key" })
    assert(core.tls.generate{ names = { "127.0.0.1" }, cn = "127.0.0.1",
      cert_out = dir .. "/platform.pem", key_out = dir .. "/platform.key",
      issuer_cert = dir .. "/ca.pem", issuer_key = dir .. "/ca.key" })
    local ctx = assert(core.tls.server_context{ cert = dir .. "/platform.pem",
      key = dir .. "/platform.key" })
    local platform = assert(core.tcp.listen{ port = 0, tls = ctx,
      on_accept = function(sock)
        sock:settimeout(5)
        sock:read()
        sock:close()
      end })

    local f = assert(io.open(dir .. "/config.json", "w"))
    f:write(json.encode({
      slug = "spec-machine", token = "openssl-spec-token-0123456789",
      platform_url = "https://127.0.0.1:" .. platform:port(),
      public = { host = "127.0.0.1", port = 0 },
      internal = { host = "127.0.0.1", port = 0 },
      state_dir = dir .. "/state", toolbox_root = dir .. "/home",
    }))
    f:close()

    local p = assert(core.proc.spawn({
      file = BIN, args = { "daemon", "--config", dir .. "/config.json" },
      env = { PATH = os.getenv("PATH"), HOME = dir .. "/home" },
      stdin = "null", stdout = "null", stderr = "pipe",
    }))
    local lines = {}
    core.spawn(function()
      while true do
        local line = p.stderr:readuntil("\n", 1024 * 1024)
        if not line then
          break
        end
        lines[#lines + 1] = line
      end
    end)

    local found = helpers.eventually(10, function()
      for _, line in ipairs(lines) do
        if line:find("certificate verify failed", 1, true) then
          return line
        end
      end
      return nil
    end)
    p:kill("SIGTERM")
    p:wait(10)
    platform:close()
    os.execute("rm -rf " .. dir)
    assert.truthy(found, "no readable reason in the log:\n"
      .. table.concat(lines, "\n"))
  end, 30))
end)
