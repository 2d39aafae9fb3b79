-- Self-update in a temp dir: fake "binaries" are shell scripts that print
-- `justavps X.Y.Z` for --version, served by a fake release server on
-- loopback. The restart command appends to a file instead of restarting.
local core = require("justavps.core")
local helpers = require("support.helpers")
local json = require("justavps.json")
local updater = require("justavps.daemon.updater")

local async = helpers.async
local crypto = core.crypto

local OLD = "1.0.0"
local NEW = "2.0.0"


local function read_file(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local data = f:read("*a")
  f:close()
  return data
end


local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end


local function fake_binary(reported)
  return "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'justavps " .. reported
    .. "'; exit 0; fi\nexit 0\n"
end


local function sha256_hex(s)
  return crypto.hex_encode(crypto.sha256(s))
end


local function wait_until(fn, seconds)
  local deadline = core.now() + seconds
  while not fn() and core.now() < deadline do
    core.sleep(0.05)
  end
  return fn()
end


local function event_types(dir)
  local types = {}
  for _, e in ipairs((updater.pending_events(dir))) do
    types[#types + 1] = e.type
  end
  return types
end


local function has_event(dir, kind)
  for _, t in ipairs(event_types(dir)) do
    if t == kind then
      return true
    end
  end
  return false
end


describe("updater", function()
  local dir, installed, server, files, downloads, opts

  before_each(function()
    updater.reset()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/bin " .. dir .. "/state") == 0)
    installed = dir .. "/bin/justavps-daemon"
    write_file(installed, fake_binary(OLD))
    assert(os.execute("chmod 755 " .. installed) == 0)

    files, downloads = {}, 0
    server = assert(core.http.listen({
      host = "127.0.0.1", port = 0, access_log = false,
      handler = function(req)
        local body = files[req.path]
        if not body then
          return 404, {}, "not found"
        end
        downloads = downloads + 1
        return 200, { ["Content-Type"] = "application/octet-stream" }, body
      end,
    }))

    opts = {
      state_dir = dir .. "/state",
      installed_path = installed,
      restart_command = { "sh", "-c", "echo restarted >> " .. dir .. "/restarts" },
      watchdog = "detached",
      probation = 2,
      cooldown = 60,
      current_version = OLD,
    }
  end)

  after_each(function()
    server:close()
    updater.reset()
    os.execute("rm -rf " .. dir)
  end)

  local function offer(name, content, sha)
    files["/" .. name] = content
    return { version = NEW, url = "http://127.0.0.1:" .. server:port() .. "/" .. name,
      sha256 = sha or sha256_hex(content) }
  end

  local function restarts()
    local text = read_file(dir .. "/restarts") or ""
    local _, n = text:gsub("restarted", "")
    return n
  end

  it("installs a good update and keeps .bak", async(function()
    local new_binary = fake_binary(NEW)
    local ok, state = updater.apply(offer("good", new_binary), opts)
    assert.is_true(ok, state)
    assert.equal("restarting", state)
    assert.equal(new_binary, read_file(installed))
    assert.equal(fake_binary(OLD), read_file(installed .. ".bak"))
    assert.equal(1, restarts())
    assert.truthy(read_file(dir .. "/state/update-probation.json"))

    -- The "restarted" daemon confirms itself.
    local conf = { state_dir = dir .. "/state", token = ("t"):rep(32),
      internal = { host = "127.0.0.1", port = 1 } }
    local result = updater.check_probation(conf, { current_version = NEW,
      installed_path = installed, restart_command = opts.restart_command,
      health_check = function() return true end })
    assert.equal("probation", result)
    assert.is_true(updater.on_probation())
    updater.note_heartbeat(NEW)
    assert.is_true(wait_until(function() return has_event(dir .. "/state", "applied") end, 10))
    assert.is_nil(read_file(dir .. "/state/update-probation.json"))
    assert.is_false(updater.on_probation())

    -- Past the probation time the watchdog must leave the new binary.
    core.sleep(opts.probation + 1.5)
    assert.equal(new_binary, read_file(installed))
    assert.equal(1, restarts())
    assert.is_false(has_event(dir .. "/state", "rolled_back"))
  end, 30))

  it("rejects a wrong --version output", async(function()
    local ok, msg, code = updater.apply(offer("liar", fake_binary("9.9.9")), opts)
    assert.is_nil(ok)
    assert.equal("failed", code)
    assert.truthy(msg:find("justavps 9.9.9", 1, true), msg)
    assert.equal(fake_binary(OLD), read_file(installed))
    assert.is_nil(read_file(installed .. ".bak"))
    assert.equal(0, restarts())
    assert.same({ "failed" }, event_types(dir .. "/state"))
    -- No temporary file is left beside the binary.
    local p = io.popen("ls " .. dir .. "/bin")
    local listing = p:read("*a")
    p:close()
    assert.equal("justavps-daemon\n", listing)
  end, 30))

  it("rejects a bad checksum", async(function()
    local ok, msg, code = updater.apply(offer("tampered", fake_binary(NEW),
      sha256_hex("something else")), opts)
    assert.is_nil(ok)
    assert.equal("failed", code)
    assert.truthy(msg:find("checksum", 1, true), msg)
    assert.equal(fake_binary(OLD), read_file(installed))
    local events = updater.pending_events(dir .. "/state")
    assert.equal("failed", events[1].type)
    assert.equal(NEW, events[1].version)
    assert.equal(OLD, events[1].previous)
  end, 30))

  it("skips the running version once", async(function()
    local same = offer("same", fake_binary(OLD))
    same.version = OLD
    local ok, _, code = updater.apply(same, opts)
    assert.is_nil(ok)
    assert.equal("skipped", code)
    _, _, code = updater.apply(same, opts)
    assert.equal("skipped", code)
    assert.same({ "skipped" }, event_types(dir .. "/state"))
    assert.equal(0, downloads)
  end, 30))

  it("rejects a malformed offer", async(function()
    local ok, _, code = updater.apply({ version = "2.0.0; rm -rf /",
      url = "http://127.0.0.1:1/x", sha256 = ("0"):rep(64) }, opts)
    assert.is_nil(ok)
    assert.equal("failed", code)
    assert.equal(0, downloads)
  end, 30))

  it("rolls back a binary that fails to come up", async(function()
    opts.probation = 1
    local new_binary = fake_binary(NEW)
    assert.is_true(updater.apply(offer("broken", new_binary), opts))
    assert.equal(new_binary, read_file(installed))

    -- Nothing confirms the update; the watchdog restores the old binary.
    assert.is_true(wait_until(function()
      return read_file(installed) == fake_binary(OLD)
        and has_event(dir .. "/state", "rolled_back")
    end, 20), "no rollback; events: " .. table.concat(event_types(dir .. "/state"), ","))
    assert.is_nil(read_file(dir .. "/state/update-probation.json"))
    assert.is_true(wait_until(function() return restarts() == 2 end, 10))

    local events = updater.pending_events(dir .. "/state")
    assert.equal(NEW, events[#events].version)
    assert.equal(OLD, events[#events].previous)

    -- The rollback starts a cooldown that survives a restart.
    updater.reset()
    local ok, _, code = updater.apply(offer("again", new_binary), opts)
    assert.is_nil(ok)
    assert.equal("cooldown", code)
  end, 30))

  it("puts the old binary back when the restart fails", async(function()
    opts.restart_command = { "false" }
    local ok, msg, code = updater.apply(offer("norestart", fake_binary(NEW)), opts)
    assert.is_nil(ok)
    assert.equal("failed", code)
    assert.truthy(msg:find("restart", 1, true), msg)
    assert.equal(fake_binary(OLD), read_file(installed))
    assert.is_nil(read_file(dir .. "/state/update-probation.json"))
  end, 30))

  it("enforces a cooldown after failure", async(function()
    local bad = offer("cool", fake_binary(NEW), sha256_hex("x"))
    assert.is_nil((updater.apply(bad, opts)))
    assert.equal(1, downloads)
    local good = offer("cool2", fake_binary(NEW))
    local ok, msg, code = updater.apply(good, opts)
    assert.is_nil(ok)
    assert.equal("cooldown", code)
    assert.truthy(msg:find("next attempt", 1, true))
    assert.equal(1, downloads)
    assert.equal(fake_binary(OLD), read_file(installed))

    -- After the cooldown the next offer is tried.
    updater.reset()
    write_file(dir .. "/state/update-cooldown", "0\n")
    assert.is_true(updater.apply(good, opts))
    assert.equal(2, downloads)
  end, 30))

  it("records a restart into another version", async(function()
    write_file(dir .. "/state/update-probation.json", json.encode({ from = OLD,
      to = NEW, installed_path = installed, backup_path = installed .. ".bak",
      deadline = math.floor(core.time()) + 60 }))
    local conf = { state_dir = dir .. "/state" }
    assert.equal("mismatch", updater.check_probation(conf, { current_version = OLD }))
    assert.same({ "failed" }, event_types(dir .. "/state"))
    assert.is_nil(updater.check_probation(conf, { current_version = OLD }))
  end, 30))

  it("acknowledges events", function()
    local state_dir = dir .. "/state"
    for i = 1, 3 do
      updater.record_event(state_dir, { type = "failed", version = "1." .. i })
    end
    local events, lines = updater.pending_events(state_dir)
    assert.equal(3, #events)
    updater.ack_events(state_dir, 2)
    events = updater.pending_events(state_dir)
    assert.equal(1, #events)
    assert.equal("1.3", events[1].version)
    updater.ack_events(state_dir, lines)
    assert.equal(0, #updater.pending_events(state_dir))
  end)
end)
