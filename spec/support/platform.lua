-- A real `justavps platform` for specs: a fresh database migrated by the
-- executable, the platform process started on a free port, and the HTTP
-- and SQL calls that platform specs make. Call everything from a
-- coroutine (helpers.run or helpers.async).
--
--   local platform = require("support.platform")
--   local db = platform.database()              -- CREATE DATABASE, migrate
--   local p = platform.start(db, { env = { JUSTAVPS_PLATFORM_X = "1" } })
--   local status, body, headers = p:request("GET", "/healthz")
--   local s = p:signup("ada@example.com")       -- { cookie, csrf, ... }
--   p:stop()
--   db:drop()
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")
local spec_pg = require("support.pg")

local _M = {}

_M.BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

_M.PASSWORD = "correct horse battery"


-- Opens a connection to database name (default: the cluster's own).
function _M.connect(name)
  local settings = spec_pg.settings()
  return assert(core.pg.connect({ host = settings.PGHOST,
    port = settings.PGPORT, user = settings.PGUSER,
    dbname = name or settings.PGDATABASE }, { timeout = 30 }))
end


local Database = {}
Database.__index = Database


-- Databases created by this process, which keeps their names apart.
local created = 0


-- Returns a new database, created and migrated with `justavps migrate`.
-- Its name contains the time, this process's id and a count.
function _M.database()
  created = created + 1
  local name = string.format("justavps_spec_%d_%d_%d", os.time(),
    core.proc.getpid(), created)
  local c = _M.connect()
  assert(c:query('CREATE DATABASE "' .. name .. '"'))
  c:close()

  local db = setmetatable({ name = name }, Database)
  local m = assert(core.proc.spawn{ file = _M.BIN, args = { "migrate" },
    env = db:env(), stdout = "null", stderr = "null" })
  local status = m:wait(60)
  if status ~= 0 then
    error("justavps migrate exited with " .. tostring(status), 2)
  end
  return db
end


-- Returns a child environment whose libpq settings name this database,
-- with the entries of extra.
function Database:env(extra)
  local settings = spec_pg.settings()
  local env = helpers.child_env({ PGHOST = settings.PGHOST,
    PGPORT = settings.PGPORT, PGUSER = settings.PGUSER,
    PGDATABASE = self.name })
  for k, v in pairs(extra or {}) do
    env[k] = v
  end
  return env
end


function Database:connect()
  return _M.connect(self.name)
end


-- Runs one statement on a connection of its own and returns the rows.
function Database:sql(query, params)
  local c = self:connect()
  local rows = assert(c:query(query, params))
  c:close()
  return rows
end


function Database:drop()
  local c = _M.connect()
  c:query('DROP DATABASE IF EXISTS "' .. self.name .. '" WITH (FORCE)')
  c:close()
end


local Platform = {}
Platform.__index = Platform


-- Starts `justavps platform --access-log=false` on db with a free port.
-- opts.env: more environment entries; opts.args: more arguments. Waits up
-- to 20 s for its "listening" line and returns the platform: port, proc
-- and lines, every line it has logged so far.
function _M.start(db, opts)
  opts = opts or {}
  local env = db:env(opts.env)
  env.JUSTAVPS_PLATFORM_LISTEN_PORT = env.JUSTAVPS_PLATFORM_LISTEN_PORT
    or "0"
  local args = { "platform", "--access-log=false" }
  for _, a in ipairs(opts.args or {}) do
    args[#args + 1] = a
  end

  local proc = assert(core.proc.spawn{ file = _M.BIN, args = args,
    env = env, stdout = "null", stderr = "pipe" })
  local self = setmetatable({ proc = proc, db = db, lines = {} }, Platform)
  local ready = core.waiter()
  core.spawn(function()
    while true do
      local line = proc.stderr:readuntil("\n", 1024 * 1024)
      if not line then
        break
      end
      self.lines[#self.lines + 1] = line
      local n = line:match("msg=listening .*port=(%d+)")
      if n and not self.port then
        self.port = tonumber(n)
        ready:wake()
      end
    end
    ready:wake()
  end)
  if not self.port then
    ready:wait(20)
  end
  if not self.port then
    proc:kill("SIGKILL")
    proc:wait(5)
    error("the platform did not start; its log:\n"
      .. table.concat(self.lines, "\n"), 2)
  end
  return self
end


-- Stops the platform with SIGTERM and waits for it to exit.
function Platform:stop()
  if self.proc then
    self.proc:kill("SIGTERM")
    self.proc:wait(10)
    self.proc = nil
  end
end


-- Sends one request to 127.0.0.1:port. Returns the status, the body text
-- and the response headers.
function _M.raw_port(port, method, path, headers, body)
  local res = assert(core.http.request{ method = method, host = "127.0.0.1",
    port = port, path = path, headers = headers, body = body,
    timeout = 20 })
  local res_headers = res:headers()
  local text = res:read_body()
  res:close()
  return res.status, text, res_headers
end


-- As raw_port, with the body decoded from JSON (the raw text when it is
-- not JSON or empty).
function _M.request_port(port, method, path, headers, body)
  local status, text, res_headers = _M.raw_port(port, method, path, headers,
    body)
  local decoded = text ~= "" and json.decode(text) or nil
  return status, decoded or text, res_headers
end


-- raw_port and request_port on this platform's port.
function Platform:raw(method, path, headers, body)
  return _M.raw_port(self.port, method, path, headers, body)
end


function Platform:request(method, path, headers, body)
  return _M.request_port(self.port, method, path, headers, body)
end


-- A dashboard session from a reply that set the session cookie.
local function session(body, headers)
  local set_cookie = headers["set-cookie"]
  if type(set_cookie) == "table" then
    set_cookie = set_cookie[1]
  end
  local token = set_cookie:match("^__justavps_session=([^;]+)")
  return { cookie = "__justavps_session=" .. token, csrf = body.csrf_token,
    account_id = body.account and body.account.id, body = body }
end


-- Raises unless a reply has the expected status.
local function expect(want, status, body)
  if status ~= want then
    error("expected HTTP " .. want .. ", got " .. tostring(status) .. ": "
      .. (type(body) == "table" and json.encode(body) or tostring(body)), 3)
  end
end


-- Signs up email (password _M.PASSWORD unless given) and returns its
-- session: cookie, csrf, account_id and the reply body.
function Platform:signup(email, password)
  local status, body, headers = self:request("POST", "/api/v1/auth/signup",
    { ["Content-Type"] = "application/json" },
    json.encode({ email = email, password = password or _M.PASSWORD }))
  expect(201, status, body)
  return session(body, headers)
end


-- Logs email in and returns a new session, as signup does.
function Platform:login(email, password)
  local status, body, headers = self:request("POST", "/api/v1/auth/login",
    { ["Content-Type"] = "application/json" },
    json.encode({ email = email, password = password or _M.PASSWORD }))
  expect(200, status, body)
  return session(body, headers)
end


-- Creates an API key for session s and returns the reply (key, id, ...).
function Platform:create_key(s, name, scopes)
  local status, body = self:request("POST", "/api/v1/api-keys",
    _M.as_session(s), json.encode({ name = name, scopes = scopes }))
  expect(201, status, body)
  return body
end


-- Returns the headers of a machine-signed call, computed here from the
-- wire contract in DESIGN.md rather than with the code under test:
-- v1= + hex HMAC-SHA256(token, "JUSTAVPS-MACHINE-V1\nMETHOD\ntarget\nts\n"
-- .. "nonce\n" .. hex(sha256(body))). ts (Unix seconds) and nonce default
-- to now and 24 random characters.
function _M.sign_machine(token, method, target, body, ts, nonce)
  local crypto = core.crypto
  ts = tostring(ts or os.time())
  nonce = nonce or crypto.random_token(24)
  local s = table.concat({ "JUSTAVPS-MACHINE-V1", method, target, ts, nonce,
    crypto.hex_encode(crypto.sha256(body or "")) }, "\n")
  return {
    ["X-JustAVPS-Machine-Timestamp"] = ts,
    ["X-JustAVPS-Machine-Nonce"] = nonce,
    ["X-JustAVPS-Machine-Signature"] = "v1="
      .. crypto.hex_encode(crypto.hmac_sha256(token, s)),
    ["Content-Type"] = "application/json",
  }
end


-- Headers of a cookie write for session s.
function _M.as_session(s)
  return { Cookie = s.cookie, ["X-CSRF-Token"] = s.csrf,
    ["Content-Type"] = "application/json" }
end


-- Headers of a call with API key key.
function _M.as_key(key)
  return { Authorization = "Bearer " .. key,
    ["Content-Type"] = "application/json" }
end


return _M
