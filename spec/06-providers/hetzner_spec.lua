-- The Hetzner driver against tools/fake_hetzner.lua on 127.0.0.1: the
-- conformance suite, then retries, rate limits, lost responses, SSH key
-- reuse, capacity fallback, deletion and the hcloud CLI against the fake.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")
local log = require("justavps.log")
local hetzner = require("providers.hetzner")
local fake_hetzner = require("tools.fake_hetzner")
local conformance = require("06-providers.conformance")

local async = helpers.async
local crypto = core.crypto

local TOKEN = "spec-token"

-- The public half of a throw-away ed25519 key and its MD5 fingerprint,
-- as the Hetzner API reference fixture lists them.
local FIXTURE_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGT1QMWBFp2lBcHkJ5"
  .. "zyn0U0BQ7GqoXdu185t3KQJ2BM deploy@example.com"
local FIXTURE_FINGERPRINT = "52:7c:40:75:de:06:c5:e4:79:45:3d:6a:92:81:4a:7b"


-- Returns a new OpenSSH ed25519 public key line with random key bytes.
local function new_public_key()
  local kind = "ssh-ed25519"
  local blob = "\0\0\0" .. string.char(#kind) .. kind .. "\0\0\0\32"
    .. assert(crypto.random_bytes(32))
  return kind .. " " .. crypto.base64_encode(blob) .. " spec@example.test"
end


-- Sends a control or API request to the fake and returns the status and
-- decoded body.
local function call(fake, method, path, body, token)
  local res = assert(core.http.request({
    method = method, host = "127.0.0.1", port = fake:port(), path = path,
    headers = { ["Authorization"] = token and ("Bearer " .. token) or nil,
      ["Content-Type"] = "application/json" },
    body = body and json.encode(body) or nil, timeout = 5,
  }))
  local text = assert(res:read_body())
  res:close()
  return res.status, text ~= "" and json.decode(text) or nil
end


local function fault(fake, spec)
  local status = call(fake, "POST", "/__fault", spec)
  assert.equal(200, status)
end


local function state(fake)
  local _, body = call(fake, "GET", "/__state")
  return body
end


-- Returns how many requests the fake saw whose "METHOD path" is line.
local function count_requests(fake, line)
  local n = 0
  for _, seen in ipairs(state(fake).requests) do
    if seen == line then
      n = n + 1
    end
  end
  return n
end


-- Starts a fake and a driver on it. conf overrides driver settings, and
-- http replaces the driver's HTTP client. Returns fake, driver, the list
-- of sleeps the driver asked for and the log lines it wrote.
local function setup(conf, fake_opts, http)
  fake_opts = fake_opts or {}
  fake_opts.token = fake_opts.token or TOKEN
  local fake = assert(fake_hetzner.start(fake_opts))
  local settings = {
    base_url = fake:url(), token = TOKEN, timeout = 5, max_attempts = 4,
    backoff_base = 0.01, backoff_max = 0.05, action_poll_interval = 0.01,
    action_timeout = 10, rate_limit_max_wait = 2,
  }
  for k, v in pairs(conf or {}) do
    settings[k] = v
  end
  local sleeps, lines = {}, {}
  local driver = assert(hetzner.new(settings, {
    http = http,
    sleep = function(seconds)
      sleeps[#sleeps + 1] = seconds
      core.sleep(math.min(seconds, 2))
    end,
    log = log.new({
      write = function(level, msg, fields)
        lines[#lines + 1] = { level = level, msg = msg, fields = fields }
      end,
      enabled = function()
        return true
      end,
    }),
  }))
  return fake, driver, sleeps, lines
end


local function server_request(slug, overrides)
  local req = {
    slug = slug, name = slug, region = "fsn1", server_type = "cx23",
    image = "debian-13",
    ssh_key = { name = "justavps-" .. slug, public_key = new_public_key() },
    user_data = "#cloud-config\n", labels = { role = "spec" },
  }
  for k, v in pairs(overrides or {}) do
    req[k] = v
  end
  return req
end


-- Returns a conformance factory for the driver over http (nil: the
-- default client, core.curl.request when the core has it).
local function factory(http)
  return function()
    local fake, driver = setup(nil, nil, http)
    return {
      driver = driver,
      server_request = function(slug)
        return server_request(slug)
      end,
      server_count = function()
        return state(fake).servers
      end,
      close = function()
        fake:close()
      end,
    }
  end
end


conformance("hetzner", factory())
conformance("hetzner over core.http", factory(hetzner.core_http_request))


describe("hetzner driver", function()
  local fake, driver, sleeps

  before_each(function()
    fake, driver, sleeps = setup()
  end)

  after_each(function()
    fake:close()
  end)

  it("requires base_url", function()
    local d, err, code = hetzner.new({ token = TOKEN })
    assert.is_nil(d)
    assert.matches("base_url", err)
    assert.equal("invalid_request", code)
  end)

  it("computes Hetzner's MD5 key fingerprint", function()
    assert.equal(FIXTURE_FINGERPRINT, hetzner.fingerprint(FIXTURE_KEY))
    assert.is_nil(hetzner.fingerprint("not a key"))
  end)

  it("follows pagination over three pages", async(function()
    fake:close()
    fake, driver = setup({ per_page = 2 })
    local regions, err = driver:list_regions()
    assert(regions, err)
    assert.equal(6, #regions)
    assert.equal("fsn1", regions[1].id)
    assert.equal("sin", regions[6].id)
    assert.equal(3, count_requests(fake, "GET /v1/locations"))
  end))

  it("waits for RateLimit-Reset after a 429", async(function()
    fault(fake, { mode = "429", count = 1, reset_in = 1 })
    local regions, err = driver:list_regions()
    assert(regions, err)
    assert.equal(2, count_requests(fake, "GET /v1/locations"))
    assert.equal(1, #sleeps)
    assert.is_true(sleeps[1] > 0)
    assert.is_true(sleeps[1] <= 2)
  end))

  it("caps the rate-limit wait and gives up", async(function()
    fake:close()
    fake, driver, sleeps = setup({ rate_limit_max_wait = 0.05,
      max_attempts = 3 })
    fault(fake, { mode = "429", count = 10, reset_in = 3600 })
    local regions, err, code = driver:list_regions()
    assert.is_nil(regions)
    assert.matches("rate_limit_exceeded", err)
    assert.equal("rate_limited", code)
    assert.equal(3, count_requests(fake, "GET /v1/locations"))
    for _, wait in ipairs(sleeps) do
      assert.is_true(wait <= 0.05)
    end
  end))

  it("retries 500 responses", async(function()
    fake:close()
    local lines
    fake, driver, sleeps, lines = setup()
    fault(fake, { mode = "500", count = 2 })
    local types, err = driver:list_server_types()
    assert(types, err)
    assert.equal(3, count_requests(fake, "GET /v1/server_types"))
    assert.equal(2, #sleeps)
    assert.equal(2, #lines)
    assert.equal("warn", lines[1].level)
    assert.equal("hetzner request failed, retrying", lines[1].msg)
    assert.equal("GET /server_types", lines[1].fields.request)
  end))

  it("reports provider_unavailable after 500s", async(function()
    fault(fake, { mode = "500", count = 10 })
    local types, err, code = driver:list_server_types()
    assert.is_nil(types)
    assert.matches("HTTP 500", err)
    assert.equal("provider_unavailable", code)
    assert.equal(4, count_requests(fake, "GET /v1/server_types"))
  end))

  it("treats malformed JSON as unavailable", async(function()
    fault(fake, { mode = "malformed", count = 10 })
    local regions, err, code = driver:list_regions()
    assert.is_nil(regions)
    assert.matches("malformed JSON", err)
    assert.equal("provider_unavailable", code)
    assert.equal(4, count_requests(fake, "GET /v1/locations"))
  end))

  it("retries a dropped connection", async(function()
    fault(fake, { mode = "drop", count = 1 })
    local regions, err = driver:list_regions()
    assert(regions, err)
    assert.equal(6, #regions)
    assert.equal(2, count_requests(fake, "GET /v1/locations"))
  end))

  it("retries slow response after timeout", async(function()
    fake:close()
    fake, driver = setup({ timeout = 0.2 })
    fault(fake, { mode = "slow", count = 1, delay = 1 })
    local regions, err = driver:list_regions()
    assert(regions, err)
    assert.equal(2, count_requests(fake, "GET /v1/locations"))
  end))

  it("finds server after lost create response", async(function()
    fault(fake, { mode = "drop_after", count = 1,
      match = "POST /v1/servers" })
    local events = {}
    local req = server_request("lost-response",
      { on_event = function(e) events[#events + 1] = e.type end })
    local server, err = driver:create_server(req)
    assert(server, err)
    assert.equal(1, state(fake).servers)
    assert.equal(1, count_requests(fake, "POST /v1/servers"))
    assert.equal("fsn1", server.region)
    assert.truthy(table.concat(events, " "):find("server_found", 1, true))
  end))

  it("creates once after a 500 on create", async(function()
    fault(fake, { mode = "500", count = 1, match = "POST /v1/servers" })
    local server, err = driver:create_server(server_request("after-500"))
    assert(server, err)
    assert.equal(1, state(fake).servers)
    assert.equal(2, count_requests(fake, "POST /v1/servers"))
  end))

  it("reuses an SSH key with the same fingerprint", async(function()
    local status, body = call(fake, "POST", "/v1/ssh_keys",
      { name = "added-by-hand", public_key = FIXTURE_KEY }, TOKEN)
    assert.equal(201, status)
    assert.equal(FIXTURE_FINGERPRINT, body.ssh_key.fingerprint)

    local events = {}
    local req = server_request("key-reuse", {
      ssh_key = { name = "justavps-key-reuse", public_key = FIXTURE_KEY },
      on_event = function(e) events[#events + 1] = e end,
    })
    local server, err = driver:create_server(req)
    assert(server, err)
    assert.equal(1, state(fake).ssh_keys)
    assert.equal(0, count_requests(fake, "POST /v1/ssh_keys") - 1)
    local reused
    for _, e in ipairs(events) do
      if e.type == "ssh_key_reused" then
        reused = e
      end
    end
    assert.is_table(reused)
    assert.equal(body.ssh_key.id, reused.id)
  end))

  it("reuses key after lost create response", async(function()
    fault(fake, { mode = "drop_after", count = 1,
      match = "POST /v1/ssh_keys" })
    local server, err = driver:create_server(server_request("key-lost"))
    assert(server, err)
    assert.equal(1, state(fake).ssh_keys)
    assert.equal(1, count_requests(fake, "POST /v1/ssh_keys"))
  end))

  it("reports a key name taken by another key", async(function()
    local status = call(fake, "POST", "/v1/ssh_keys",
      { name = "justavps-name-clash", public_key = new_public_key() }, TOKEN)
    assert.equal(201, status)
    local server, err, code = driver:create_server(
      server_request("name-clash"))
    assert.is_nil(server)
    assert.matches("taken", err)
    assert.equal("uniqueness_conflict", code)
  end))

  it("falls back to the next region on capacity", async(function()
    local events = {}
    local req = server_request("fallback", {
      region = "sin", server_type = "cpx22",
      fallbacks = { { region = "nbg1" } },
      on_event = function(e) events[#events + 1] = e end,
    })
    local server, err = driver:create_server(req)
    assert(server, err)
    assert.equal("nbg1", server.region)
    assert.equal("cpx22", server.server_type)
    local kinds = {}
    for _, e in ipairs(events) do
      kinds[#kinds + 1] = e.type .. ":" .. tostring(e.region)
    end
    assert.same({ "ssh_key_created:nil", "create_attempt:sin",
      "capacity_unavailable:sin", "create_attempt:nbg1",
      "server_created:nbg1" }, kinds)
    assert.equal(1, state(fake).servers)
  end))

  it("returns capacity_unavailable when all fail", async(function()
    local req = server_request("no-capacity", {
      region = "sin", server_type = "cpx22",
      fallbacks = { { region = "ash", server_type = "cx23" } },
    })
    local server, err, code = driver:create_server(req)
    assert.is_nil(server)
    assert.matches("unavailable in location ash", err)
    assert.equal("capacity_unavailable", code)
    assert.equal(0, state(fake).servers)
  end))

  it("deletes the server and its SSH key", async(function()
    local server = assert(driver:create_server(server_request("to-delete")))
    assert.equal(1, state(fake).ssh_keys)
    local result, err = driver:delete_server("to-delete")
    assert(result, err)
    assert.equal(server.id, result.id)
    assert.equal(1, result.ssh_keys_deleted)
    assert.equal(0, state(fake).servers)
    assert.equal(0, state(fake).ssh_keys)

    result, err = driver:delete_server("to-delete")
    assert(result, err)
    assert.is_true(result.deleted)
    assert.equal(0, result.ssh_keys_deleted)
    result, err = driver:delete_server(server.id)
    assert(result, err)
    assert.is_true(result.deleted)
  end))

  it("deletes by id and removes the key", async(function()
    local server = assert(driver:create_server(server_request("by-id")))
    local result, err = driver:delete_server(server.id)
    assert(result, err)
    assert.equal(1, result.ssh_keys_deleted)
    assert.equal(0, state(fake).ssh_keys)
  end))

  it("maps a wrong token to unauthorized", async(function()
    local bad = assert(hetzner.new({ base_url = fake:url(),
      token = "wrong-token", backoff_base = 0.01 }))
    local regions, err, code = bad:list_regions()
    assert.is_nil(regions)
    assert.matches("HTTP 401", err)
    assert.equal("unauthorized", code)
    assert.equal(1, count_requests(fake, "GET /v1/locations"))
  end))

  it("maps invalid_input to invalid_request", async(function()
    local server, err, code = driver:create_server(
      server_request("bad-type", { server_type = "no-such-type" }))
    assert.is_nil(server)
    assert.matches("invalid_input", err)
    assert.equal("invalid_request", code)
  end))

  it("reports create_image status", async(function()
    local server = assert(driver:create_server(server_request("snap")))
    local image, err = driver:create_image(server.id,
      { description = "snap", wait = true })
    assert(image, err)
    assert.equal("available", image.status)
    assert.equal(1, state(fake).images)
  end))
end)


describe("fake hetzner", function()
  it("matches label selectors", function()
    local match = fake_hetzner.selector_matches
    local labels = { a = "1", b = "2" }
    assert.is_true(match("a=1", labels))
    assert.is_true(match("a==1,b=2", labels))
    assert.is_false(match("a=2", labels))
    assert.is_true(match("a!=2", labels))
    assert.is_true(match("a", labels))
    assert.is_false(match("!a", labels))
    assert.is_true(match("b in (3,2)", labels))
    assert.is_false(match("b notin (2,3)", labels))
  end)

  it("runs as a script and prints its port", async(function()
    local p = assert(core.proc.spawn({
      file = "luajit",
      args = { "tools/fake_hetzner.lua", "--port", "0", "--token", TOKEN },
      env = helpers.child_env({ JV_BUILD_DIR = os.getenv("JV_BUILD_DIR") }),
      stdout = "pipe",
    }))
    p.stdout:settimeout(10)
    local line = p.stdout:readuntil("\n")
    local port = tonumber(line and line:match("port=(%d+)"))
    assert(port, "no port in " .. tostring(line))
    local res = assert(core.http.request({ host = "127.0.0.1", port = port,
      path = "/v1/locations", timeout = 5,
      headers = { Authorization = "Bearer " .. TOKEN } }))
    local body = json.decode(assert(res:read_body()))
    res:close()
    p:kill("SIGTERM")
    p:wait(10)
    p.stdout:close()
    assert.equal(200, res.status)
    assert.equal(6, #body.locations)
    assert.is_string(res:header("RateLimit-Reset"))
  end, 20))
end)


-- Runs hcloud with args against the fake. Returns the exit status and
-- everything it printed.
local function hcloud(fake, home, args)
  local p = assert(core.proc.spawn({
    file = "hcloud", args = args,
    env = { PATH = os.getenv("PATH"), HOME = home,
      HCLOUD_ENDPOINT = fake:url(), HCLOUD_TOKEN = TOKEN },
    stdout = "pipe", stderr = "stdout",
  }))
  p.stdout:settimeout(30)
  local parts = {}
  while true do
    local data = p.stdout:read()
    if not data then
      break
    end
    parts[#parts + 1] = data
  end
  p.stdout:close()
  local status = p:wait(30)
  return status, table.concat(parts)
end


local have_hcloud = os.execute("command -v hcloud >/dev/null 2>&1") == 0

describe("hcloud CLI against the fake", function()
  if not have_hcloud then
    pending("hcloud is not installed (apt-get install hcloud-cli)")
    return
  end

  it("lists and creates servers", async(function()
    local fake = assert(fake_hetzner.start({ token = TOKEN }))
    local home = os.tmpname()
    os.remove(home)
    assert(os.execute("mkdir -p " .. home) == 0)

    local status, out = hcloud(fake, home, { "server", "list" })
    assert.equal(0, status, out)
    assert.matches("NAME", out)

    status, out = hcloud(fake, home, { "server", "create", "--name",
      "cli-made", "--type", "cx23", "--image", "debian-13",
      "--location", "nbg1" })
    assert.equal(0, status, out)
    assert.matches("created", out)

    status, out = hcloud(fake, home, { "server", "list", "-o",
      "columns=name,status" })
    assert.equal(0, status, out)
    assert.matches("cli%-made%s+running", out)
    assert.equal(1, state(fake).servers)

    fake:close()
    os.execute("rm -rf " .. home)
  end, 60))
end)
