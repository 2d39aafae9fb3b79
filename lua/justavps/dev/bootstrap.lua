-- The demo data of `justavps dev`, made through the platform's own API as
-- a user would: an account (signup, or login when it exists), an API key
-- with every scope, and one machine on the local provider. A second start
-- reuses what var/dev/stack.json names when the platform still accepts it.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local files = require("justavps.dev.files")

local ipairs = ipairs
local format = string.format
local tostring = tostring
local type = type

local _M = {}

_M.DEMO_EMAIL = "demo@justavps.localhost"
_M.DEMO_MACHINE = "demo"
_M.KEY_SCOPES = { "read", "write", "delete", "exec", "proxy" }
_M.KEY_NAME = "justavps dev"

local Client = {}
Client.__index = Client


-- Sends one request to the platform. Returns status, decoded body (or
-- the raw text when it is not JSON), response; or nil, message.
function Client:call(method, path, opts)
  opts = opts or {}
  local headers = { Accept = "application/json" }
  if opts.key then
    headers.Authorization = "Bearer " .. opts.key
  end
  if opts.cookie then
    headers.Cookie = opts.cookie
    headers["X-CSRF-Token"] = opts.csrf
  end
  local body
  if opts.body then
    body = json.encode(opts.body)
    headers["Content-Type"] = "application/json"
  end
  local res, err = core.http.request({ method = method, host = self.host,
    port = self.port, path = path, headers = headers, body = body,
    timeout = 30 })
  if not res then
    return nil, method .. " " .. path .. " failed: " .. tostring(err)
  end
  local parts = {}
  while true do
    local chunk, rerr = res:read()
    if not chunk then
      if rerr then
        res:close()
        return nil, method .. " " .. path .. ": " .. tostring(rerr)
      end
      break
    end
    parts[#parts + 1] = chunk
  end
  res:close()
  local text = table.concat(parts)
  local decoded = json.decode(text)
  return res.status, decoded == nil and text or decoded, res
end


-- Returns a message for an unexpected reply of the platform.
local function unexpected(what, status, body)
  local detail = type(body) == "table" and type(body.error) == "table"
    and (tostring(body.error.code) .. ": " .. tostring(body.error.message))
    or tostring(body)
  return format("%s: unexpected status %s (%s)", what, tostring(status),
    detail)
end


-- Signs the demo user in, creating the account on first use. Returns the
-- Cookie header value and the CSRF token, or nil, message.
function Client:sign_in(password)
  local creds = { email = _M.DEMO_EMAIL, password = password }
  local status, body, res = self:call("POST", "/api/v1/auth/signup",
    { body = { email = creds.email, password = creds.password,
      name = "Demo" } })
  if status == 409 then
    status, body, res = self:call("POST", "/api/v1/auth/login",
      { body = creds })
  end
  if status ~= 200 and status ~= 201 then
    return nil, unexpected("demo sign-in", status, body)
  end
  local set_cookie = res:header("Set-Cookie") or ""
  local cookie = set_cookie:match("^([^;]+)")
  if not cookie or type(body) ~= "table" or not body.csrf_token then
    return nil, "demo sign-in: no session cookie or CSRF token in the reply"
  end
  return cookie, body.csrf_token
end


-- Returns the API key of the previous run when the platform still
-- accepts it, else a new one. Returns key, or nil, message.
function Client:ensure_key(previous, password)
  if type(previous) == "string" then
    local status = self:call("GET", "/api/v1/me", { key = previous })
    if status == 200 then
      return previous
    end
    log.info("the saved API key is no longer valid; making a new one",
      { status = status })
  end
  local cookie, csrf = self:sign_in(password)
  if not cookie then
    return nil, csrf
  end
  local status, body = self:call("POST", "/api/v1/api-keys",
    { cookie = cookie, csrf = csrf,
      body = { name = _M.KEY_NAME, scopes = _M.KEY_SCOPES } })
  if status ~= 201 or type(body) ~= "table" or not body.key then
    return nil, unexpected("API key creation", status, body)
  end
  log.info("demo API key created", { prefix = body.prefix })
  self:revoke_other_keys(body.key, body.id)
  return body.key
end


-- Revokes the demo account's other keys named KEY_NAME, which earlier
-- runs made and whose stack.json is gone, so one valid dev key remains.
function Client:revoke_other_keys(key, keep_id)
  local status, body = self:call("GET", "/api/v1/api-keys?limit=100",
    { key = key })
  if status ~= 200 or type(body) ~= "table" then
    log.warn("cannot list the demo API keys", { status = status })
    return
  end
  -- The list contains unrevoked keys only.
  for _, item in ipairs(body.api_keys or {}) do
    if item.name == _M.KEY_NAME and item.id ~= keep_id then
      local revoked = self:call("DELETE", "/api/v1/api-keys/" .. item.id,
        { key = key })
      log.info("older demo API key revoked", { key_id = item.id,
        status = revoked })
    end
  end
end


-- Polls the machine until its stage is services_ready. Returns the
-- machine, or nil, message when it fails or timeout seconds pass.
function Client:wait_ready(key, slug, timeout)
  local deadline = core.now() + timeout
  local last
  while true do
    local status, body = self:call("GET", "/api/v1/machines/" .. slug,
      { key = key })
    if status ~= 200 then
      return nil, unexpected("machine " .. slug, status, body)
    end
    if body.stage == "services_ready" then
      return body
    end
    if body.stage == "failed" or body.stage == "deleted" then
      return nil, "machine " .. slug .. " reached stage " .. body.stage
    end
    if body.stage ~= last then
      log.info("waiting for the demo machine", { slug = slug,
        stage = body.stage })
      last = body.stage
    end
    core.update_time()
    if core.now() > deadline then
      return nil, "machine " .. slug .. " was still at " .. body.stage
        .. " after " .. timeout .. " s"
    end
    core.sleep(0.1)
  end
end


-- Returns the slug of a live machine named DEMO_MACHINE, made by an
-- earlier run whose stack.json is gone, or nil.
function Client:find_demo_machine(key)
  local status, body = self:call("GET", "/api/v1/machines?limit=100",
    { key = key })
  if status ~= 200 or type(body) ~= "table" then
    return nil
  end
  for _, m in ipairs(body.items or {}) do
    if m.name == _M.DEMO_MACHINE and m.stage ~= "deleting"
        and m.stage ~= "deleted" and m.stage ~= "failed" then
      return m.slug
    end
  end
  return nil
end


-- Returns the machine of the previous run when it still exists, else a
-- new machine created with POST /machines. Returns machine, or nil,
-- message.
function Client:ensure_machine(key, previous_slug, timeout)
  if type(previous_slug) ~= "string" then
    previous_slug = self:find_demo_machine(key)
  end
  if type(previous_slug) == "string" then
    local status, body = self:call("GET", "/api/v1/machines/"
      .. previous_slug, { key = key })
    if status == 200 and body.stage ~= "deleting"
        and body.stage ~= "deleted" and body.stage ~= "failed" then
      return self:wait_ready(key, previous_slug, timeout)
    end
  end
  local status, body = self:call("POST", "/api/v1/machines", { key = key,
    body = { name = _M.DEMO_MACHINE, provider = "local", region = "local",
      server_type = "local" } })
  if status ~= 202 or type(body) ~= "table" or not body.slug then
    return nil, unexpected("machine creation", status, body)
  end
  log.info("demo machine created", { slug = body.slug })
  return self:wait_ready(key, body.slug, timeout)
end


-- Makes or reuses the demo data on the platform at host:port. previous
-- is the decoded stack.json of the last run, or nil. Returns
-- { api_key, machine }, or nil, message.
function _M.run(host, port, secrets, previous, opts)
  local client = setmetatable({ host = host, port = port }, Client)
  previous = type(previous) == "table" and previous or {}
  local key, err = client:ensure_key(previous.api_key,
    secrets.demo_password)
  if not key then
    return nil, err
  end
  if not opts.machine then
    return { api_key = key }
  end
  local previous_slug = type(previous.machine) == "table"
    and previous.machine.slug or nil
  local machine
  machine, err = client:ensure_machine(key, previous_slug, opts.timeout)
  if not machine then
    return nil, err
  end
  return { api_key = key, machine = machine }
end


-- Returns the daemon config (token, listeners) that the local provider
-- wrote for machine slug, or nil when it cannot be read.
function _M.local_machine(machines_dir, slug)
  local text = files.read(machines_dir .. "/" .. slug .. "/config.json")
  local conf = text and json.decode(text)
  if type(conf) ~= "table" then
    return nil
  end
  return conf
end


return _M
