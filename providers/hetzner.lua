-- Hetzner Cloud driver (API v1).
--
-- Every request goes through one injected function `http(req)` (see
-- `default_http`), so the driver opens no socket itself. The driver
-- retries 5xx responses, connection failures and malformed JSON with
-- exponential backoff and jitter, waits out 429 responses until
-- RateLimit-Reset, follows meta.pagination.next_page on lists and polls
-- GET /actions/{id} until an action ends. A create is never sent twice
-- blindly: before a retry of POST /servers it looks for the server by
-- its justavps-slug label.
local config = require("justavps.config")
local json = require("justavps.json")
local bit = require("bit")

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local pcall = pcall
local setmetatable = setmetatable
local format = string.format
local byte = string.byte
local char = string.char
local rep = string.rep
local lower = string.lower
local concat = table.concat
local floor = math.floor
local min = math.min
local max = math.max
local random = math.random
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local lshift, rshift, rol, tobit = bit.lshift, bit.rshift, bit.rol, bit.tobit

local _M = {}

_M.name = "hetzner"

-- Label that ties a server and its SSH key to a machine slug.
_M.SLUG_LABEL = "justavps-slug"

_M.schema = config.schema({
  fields = {
    { base_url = { type = "string", required = true,
      match = "^https?://[^/]+/.*[^/]$",
      description = "API base URL without a trailing slash; production " ..
        "sets https://api.hetzner.cloud/v1" } },
    { token = { type = "string", required = true, len_min = 1,
      description = "API token sent as Authorization: Bearer" } },
    { timeout = { type = "duration", default = 30, min = 0.001,
      unit = "seconds", description = "limit for one HTTP request" } },
    { max_attempts = { type = "integer", default = 5, between = { 1, 20 },
      description = "tries of one request, counting the first" } },
    { backoff_base = { type = "duration", default = 0.5, min = 0,
      unit = "seconds",
      description = "first retry delay, doubled on each retry" } },
    { backoff_max = { type = "duration", default = 10, min = 0,
      unit = "seconds", description = "maximum retry delay" } },
    { rate_limit_max_wait = { type = "duration", default = 60, min = 0,
      unit = "seconds",
      description = "maximum wait for RateLimit-Reset after a 429" } },
    { action_poll_interval = { type = "duration", default = 1, min = 0,
      unit = "seconds", description = "delay between action polls" } },
    { action_timeout = { type = "duration", default = 600, min = 0,
      unit = "seconds", description = "maximum wait for one action" } },
    { per_page = { type = "integer", default = 50, between = { 1, 50 },
      description = "page size for list requests" } },
    { max_pages = { type = "integer", default = 100, between = { 1, 10000 },
      description = "pages read from one list before giving up" } },
  },
})


-- HTTP transport ---------------------------------------------------------


-- Sends req through core.http.request, which takes only http:// URLs with
-- an IP literal host because it resolves no names. Returns the response
-- as {status, headers, body}, or nil, message, code.
function _M.core_http_request(req)
  local core = require("justavps.core")
  local scheme, authority, path = req.url:match("^(%a+)://([^/]+)(.*)$")
  if scheme ~= "http" then
    return nil, "core.http supports only http:// URLs", "unsupported"
  end
  local host, port = authority:match("^%[(.+)%]:?(%d*)$")
  if not host then
    host, port = authority:match("^([^:]+):?(%d*)$")
  end
  local res, err, code = core.http.request({
    method = req.method,
    host = host,
    port = tonumber(port) or 80,
    path = path ~= "" and path or "/",
    headers = req.headers,
    body = req.body,
    timeout = req.timeout,
  })
  if not res then
    return nil, err, code
  end
  local body
  body, err, code = res:read_body(json.MAX_SIZE)
  local headers = res:headers()
  res:close()
  if not body then
    return nil, err, code
  end
  return { status = res.status, headers = headers, body = body }
end


-- Returns core.curl.request when the core has it (names, TLS), else
-- _M.core_http_request.
local function default_http()
  local core = require("justavps.core")
  if core.curl and core.curl.request then
    return core.curl.request
  end
  return _M.core_http_request
end


-- Returns the value of header name in res.headers, matching any case.
local function header(res, name)
  local headers = res.headers
  if type(headers) ~= "table" then
    return nil
  end
  local value = headers[name] or headers[lower(name)]
  if value == nil then
    name = lower(name)
    for key, v in pairs(headers) do
      if lower(key) == name then
        value = v
        break
      end
    end
  end
  if type(value) == "table" then
    value = value[1]
  end
  return value
end


-- SSH key fingerprint ----------------------------------------------------


local MD5_SHIFTS = {
  7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
  5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
  4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
  6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
}

local MD5_CONSTANTS = {}
for i = 1, 64 do
  MD5_CONSTANTS[i] = tobit(floor(math.abs(math.sin(i)) * 2 ^ 32) % 2 ^ 32)
end


local function le32(n)
  return char(band(n, 255), band(rshift(n, 8), 255),
    band(rshift(n, 16), 255), band(rshift(n, 24), 255))
end


-- Returns the raw 16-byte MD5 digest of s (RFC 1321). The core's crypto
-- module has no MD5, and Hetzner names SSH keys by their MD5 fingerprint.
local function md5(s)
  local bits = #s * 8
  s = s .. "\128" .. rep("\0", (55 - #s) % 64)
    .. le32(tobit(bits % 2 ^ 32)) .. le32(tobit(floor(bits / 2 ^ 32)))
  local a0, b0 = 0x67452301, tobit(0xefcdab89)
  local c0, d0 = tobit(0x98badcfe), 0x10325476
  local words = {}
  for offset = 1, #s, 64 do
    for i = 0, 15 do
      local b1, b2, b3, b4 = byte(s, offset + i * 4, offset + i * 4 + 3)
      words[i] = bor(b1, lshift(b2, 8), lshift(b3, 16), lshift(b4, 24))
    end
    local a, b, c, d = a0, b0, c0, d0
    for i = 0, 63 do
      local f, g
      if i < 16 then
        f, g = bor(band(b, c), band(bnot(b), d)), i
      elseif i < 32 then
        f, g = bor(band(d, b), band(bnot(d), c)), (5 * i + 1) % 16
      elseif i < 48 then
        f, g = bxor(b, c, d), (3 * i + 5) % 16
      else
        f, g = bxor(c, bor(b, bnot(d))), (7 * i) % 16
      end
      f = tobit(f + a + MD5_CONSTANTS[i + 1] + words[g])
      a, d, c = d, c, b
      b = tobit(b + rol(f, MD5_SHIFTS[i + 1]))
    end
    a0, b0 = tobit(a0 + a), tobit(b0 + b)
    c0, d0 = tobit(c0 + c), tobit(d0 + d)
  end
  return le32(a0) .. le32(b0) .. le32(c0) .. le32(d0)
end

_M.md5 = md5


-- Returns the MD5 fingerprint of an OpenSSH public key line in the form
-- Hetzner reports ("52:7c:40:..."), or nil, message.
function _M.fingerprint(public_key)
  local crypto = require("justavps.core").crypto
  local blob = type(public_key) == "string"
    and public_key:match("^%s*[%w@.-]+%s+([%w+/=]+)")
  if not blob then
    return nil, "public key is not in OpenSSH format (type base64 comment)"
  end
  local raw = crypto.base64_decode(blob)
  if not raw then
    return nil, "public key has invalid base64"
  end
  local digest = md5(raw)
  local parts = {}
  for i = 1, #digest do
    parts[i] = format("%02x", byte(digest, i))
  end
  return concat(parts, ":")
end


-- Requests and retries ---------------------------------------------------


-- Hetzner error codes mapped to the provider error codes. Codes missing
-- here map by HTTP status in `map_error`.
local ERROR_MAP = {
  unauthorized = "unauthorized",
  forbidden = "unauthorized",
  token_readonly = "unauthorized",
  invalid_input = "invalid_request",
  json_error = "invalid_request",
  invalid_server_type = "invalid_request",
  not_found = "not_found",
  uniqueness_error = "uniqueness_conflict",
  resource_limit_exceeded = "quota_exceeded",
  rate_limit_exceeded = "rate_limited",
  -- NOTE: Hetzner's error reference lists resource_unavailable and
  -- placement_error for missing capacity. Which code the live API returns
  -- for a location that does not offer a server type is not verified.
  resource_unavailable = "capacity_unavailable",
  placement_error = "capacity_unavailable",
}

-- Hetzner error codes worth a retry besides 5xx and 429, as both official
-- clients (hcloud-go, hcloud-python) retry them.
local RETRY_CODES = { conflict = true, bad_gateway = true, timeout = true }


local function map_error(status, hcode)
  if ERROR_MAP[hcode] then
    return ERROR_MAP[hcode]
  end
  if status == 401 or status == 403 then
    return "unauthorized"
  elseif status == 404 then
    return "not_found"
  elseif status == 409 then
    return "uniqueness_conflict"
  elseif status == 429 then
    return "rate_limited"
  elseif status >= 400 and status < 500 then
    return "invalid_request"
  end
  return "provider_unavailable"
end


local Driver = {}
Driver.__index = Driver


function Driver:event(on_event, event)
  if on_event then
    local ok, err = pcall(on_event, event)
    if not ok then
      self.log.warn("provider on_event callback failed",
        { provider = "hetzner", error = tostring(err) })
    end
  end
end


-- Returns the delay before retry number attempt (1 for the first retry):
-- backoff_base doubled per retry, at most backoff_max, times a random
-- factor in [0.5, 1) so that clients retrying together spread out.
function Driver:backoff(attempt)
  local conf = self.conf
  local delay = min(conf.backoff_max, conf.backoff_base * 2 ^ (attempt - 1))
  return delay * (0.5 + self.random() * 0.5)
end


-- Returns the seconds to wait after a 429: until RateLimit-Reset (Unix
-- seconds), at most rate_limit_max_wait, or the backoff when the header
-- is missing or already past.
function Driver:rate_limit_wait(res, attempt)
  local reset = tonumber(header(res, "RateLimit-Reset"))
  local wait
  if reset then
    wait = reset - self.time()
  end
  if not wait or wait <= 0 then
    wait = self:backoff(attempt)
  end
  return min(wait, self.conf.rate_limit_max_wait)
end


-- Decodes a response into its JSON body or an error. Returns body, or
-- nil, message, code, retry where retry says whether another attempt may
-- help.
local function parse_response(what, res)
  local status = tonumber(res.status) or 0
  local text = res.body or ""
  local body, derr
  if text ~= "" then
    body, derr = json.decode(text)
  end

  if status >= 200 and status < 300 then
    if text ~= "" and body == nil then
      return nil, format("%s: malformed JSON in %d response: %s", what,
        status, derr), "provider_unavailable", true
    end
    return body or {}
  end

  local perr = type(body) == "table" and type(body.error) == "table"
    and body.error or {}
  local hcode = type(perr.code) == "string" and perr.code or "unknown"
  local message = format("%s failed: HTTP %d %s: %s", what, status, hcode,
    tostring(perr.message or "no error body"))
  local retry = status >= 500 or status == 429 or RETRY_CODES[hcode]
  return nil, message, map_error(status, hcode), retry, hcode
end


-- Sends one API request with retries. opts: query (string after "?"),
-- body (a table, sent as JSON), before_retry (function called before
-- each retry of a request that must not be repeated blindly; a non-nil
-- result ends the call with that result). Returns the decoded body, or
-- nil, message, code, hetzner_code.
function Driver:request(method, path, opts)
  opts = opts or {}
  local conf = self.conf
  local url = conf.base_url .. path
  if opts.query and opts.query ~= "" then
    url = url .. "?" .. opts.query
  end
  local what = method .. " " .. path
  local headers = {
    ["Authorization"] = "Bearer " .. conf.token,
    ["Accept"] = "application/json",
    ["User-Agent"] = "justavps-hetzner",
  }
  local payload
  if opts.body ~= nil then
    local err
    payload, err = json.encode(opts.body)
    if not payload then
      return nil, what .. ": cannot encode body: " .. err, "invalid_request"
    end
    headers["Content-Type"] = "application/json"
  end

  local message, code, hcode
  for attempt = 1, conf.max_attempts do
    if attempt > 1 and opts.before_retry then
      local found, ferr, fcode = opts.before_retry()
      if found ~= nil then
        return found
      elseif ferr and fcode ~= "not_found" then
        return nil, ferr, fcode
      end
    end

    -- libcurl sends a request again on a fresh connection when a reused
    -- one closes before any response, POST included; with reuse off only
    -- this loop decides about retries.
    local res, err, ecode = self.http({
      method = method, url = url, headers = headers, body = payload,
      timeout = conf.timeout, reuse = false,
    })
    local wait, retry
    if not res then
      message = format("%s failed: %s (%s)", what, tostring(err),
        tostring(ecode))
      code, retry = "provider_unavailable", true
      wait = self:backoff(attempt)
    else
      local body
      body, message, code, retry, hcode = parse_response(what, res)
      if body then
        return body
      end
      if tonumber(res.status) == 429 then
        wait = self:rate_limit_wait(res, attempt)
      else
        wait = self:backoff(attempt)
      end
    end

    if not retry or attempt == conf.max_attempts then
      break
    end
    self.log.warn("hetzner request failed, retrying", {
      provider = "hetzner", request = what, attempt = attempt,
      error = message, code = code, wait_s = wait,
    })
    self.sleep(wait)
  end
  return nil, message, code, hcode
end


-- Lists every item of key at path, following meta.pagination.next_page.
-- query is extra query text such as "name=x". Returns the list, or nil,
-- message, code.
function Driver:list(path, key, query)
  local items = {}
  local page = 1
  for _ = 1, self.conf.max_pages do
    local q = format("page=%d&per_page=%d", page, self.conf.per_page)
    if query and query ~= "" then
      q = query .. "&" .. q
    end
    local body, err, code = self:request("GET", path, { query = q })
    if not body then
      return nil, err, code
    end
    if type(body[key]) ~= "table" then
      return nil, format("GET %s: response has no %s list", path, key),
        "provider_unavailable"
    end
    for _, item in ipairs(body[key]) do
      items[#items + 1] = item
    end
    local pagination = type(body.meta) == "table"
      and type(body.meta.pagination) == "table" and body.meta.pagination
    local next_page = pagination and tonumber(pagination.next_page)
    if not next_page then
      return items
    end
    if next_page <= page then
      return nil, format("GET %s: next_page %d does not advance past %d",
        path, next_page, page), "provider_unavailable"
    end
    page = next_page
  end
  return nil, format("GET %s: more than %d pages", path,
    self.conf.max_pages), "provider_unavailable"
end


-- Polls action until it succeeds or fails, at most action_timeout seconds.
-- Returns the final action, or nil, message, code.
function Driver:wait_action(action)
  if type(action) ~= "table" or action.id == nil then
    return nil, "response has no action", "provider_unavailable"
  end
  local deadline = self.now() + self.conf.action_timeout
  while true do
    if action.status == "success" then
      return action
    elseif action.status == "error" then
      local aerr = type(action.error) == "table" and action.error or {}
      return nil, format("action %s %s failed: %s: %s",
        tostring(action.command), tostring(action.id),
        tostring(aerr.code), tostring(aerr.message)),
        map_error(0, aerr.code)
    end
    if self.now() >= deadline then
      return nil, format("action %s %s still %s after %g s",
        tostring(action.command), tostring(action.id),
        tostring(action.status), self.conf.action_timeout),
        "provider_unavailable"
    end
    self.sleep(self.conf.action_poll_interval)
    local body, err, code = self:request("GET",
      "/actions/" .. tostring(action.id))
    if not body then
      return nil, err, code
    end
    action = body.action
    if type(action) ~= "table" then
      return nil, "GET /actions: response has no action",
        "provider_unavailable"
    end
  end
end


-- Result shapes ----------------------------------------------------------


local STATUSES = {
  initializing = true, starting = true, running = true, stopping = true,
  off = true, deleting = true, unknown = true,
}


local function server_result(server)
  local net = type(server.public_net) == "table" and server.public_net or {}
  local ipv4 = type(net.ipv4) == "table" and net.ipv4.ip or nil
  local ipv6 = type(net.ipv6) == "table" and net.ipv6.ip or nil
  local location = type(server.location) == "table" and server.location
    or {}
  local stype = type(server.server_type) == "table" and server.server_type
    or {}
  local status = STATUSES[server.status] and server.status or "unknown"
  return {
    id = tostring(server.id),
    name = server.name,
    status = status,
    provider_status = server.status,
    ipv4 = type(ipv4) == "string" and ipv4 or nil,
    ipv6 = type(ipv6) == "string" and ipv6 or nil,
    region = tostring(location.name),
    server_type = tostring(stype.name),
    labels = server.labels,
  }
end


-- Percent-encodes s for a query string value.
local function escape(s)
  return (tostring(s):gsub("[^%w%-._~]", function(c)
    return format("%%%02X", byte(c))
  end))
end


local function is_numeric_id(value)
  return type(value) == "number"
    or (type(value) == "string" and value:match("^%d+$") ~= nil)
end


-- Servers and keys by slug -----------------------------------------------


-- Returns the server labelled with slug, or nil, message, "not_found".
function Driver:find_server(slug)
  local servers, err, code = self:list("/servers", "servers",
    "label_selector=" .. escape(_M.SLUG_LABEL .. "=" .. slug))
  if not servers then
    return nil, err, code
  end
  if servers[1] then
    return servers[1]
  end
  return nil, "no server with slug " .. slug, "not_found"
end


-- Returns the id of an SSH key with public_key, registering it under name
-- with the slug label when no key has its fingerprint. A key that is
-- already registered (by an earlier try, or by hand) is reused.
function Driver:ensure_ssh_key(slug, key, on_event)
  local fingerprint, ferr = _M.fingerprint(key.public_key)
  if not fingerprint then
    return nil, "ssh_key.public_key: " .. ferr, "invalid_request"
  end

  local function find()
    local keys, err, code = self:list("/ssh_keys", "ssh_keys",
      "fingerprint=" .. escape(fingerprint))
    if not keys then
      return nil, err, code
    end
    return keys[1]
  end

  local existing, err, code = find()
  if err then
    return nil, err, code
  end
  if existing then
    self:event(on_event, { type = "ssh_key_reused", id = existing.id,
      name = existing.name, fingerprint = fingerprint })
    return existing.id
  end

  local name = key.name or ("justavps-" .. slug)
  local body
  body, err, code = self:request("POST", "/ssh_keys", {
    body = { name = name, public_key = key.public_key,
      labels = { [_M.SLUG_LABEL] = slug, ["managed-by"] = "justavps" } },
    before_retry = find,
  })
  if body and type(body.ssh_key) == "table" then
    self:event(on_event, { type = "ssh_key_created", id = body.ssh_key.id,
      name = name, fingerprint = fingerprint })
    return body.ssh_key.id
  elseif body and body.id then
    -- before_retry found the key that a request with a lost response
    -- had created.
    return body.id
  end
  if code == "uniqueness_conflict" then
    existing = find()
    if existing then
      self:event(on_event, { type = "ssh_key_reused", id = existing.id,
        name = existing.name, fingerprint = fingerprint })
      return existing.id
    end
    return nil, format("SSH key name %q is taken by another key: %s",
      name, err), code
  end
  return nil, err, code
end


-- Interface --------------------------------------------------------------


local function check_create_request(req)
  if type(req) ~= "table" then
    return nil, "create_server needs a request table"
  end
  if type(req.slug) ~= "string" or not req.slug:match("^[a-z0-9-]+$")
      or #req.slug < 3 or #req.slug > 40 then
    return nil, "slug must be 3 to 40 characters of [a-z0-9-]"
  end
  for _, field in ipairs({ "name", "region", "server_type", "image" }) do
    if type(req[field]) ~= "string" or req[field] == "" then
      return nil, field .. " is missing or not a string"
    end
  end
  if req.ssh_key ~= nil and (type(req.ssh_key) ~= "table"
      or type(req.ssh_key.public_key) ~= "string") then
    return nil, "ssh_key must be a table with public_key"
  end
  if req.user_data ~= nil and (type(req.user_data) ~= "string"
      or #req.user_data > 32 * 1024) then
    return nil, "user_data must be a string of at most 32 KiB"
  end
  if req.labels ~= nil and type(req.labels) ~= "table" then
    return nil, "labels must be a table"
  end
  if req.fallbacks ~= nil and type(req.fallbacks) ~= "table" then
    return nil, "fallbacks must be a list of {region, server_type}"
  end
  return true
end


-- Sends POST /servers for one region and type. Before a retry, and after
-- a lost response, it looks the server up by slug, so a create that reached
-- Hetzner is never made twice.
function Driver:post_server(req, region, server_type, key_id)
  local labels = {}
  for k, v in pairs(req.labels or {}) do
    labels[k] = v
  end
  labels[_M.SLUG_LABEL] = req.slug
  labels["managed-by"] = "justavps"

  local body = {
    name = req.name,
    server_type = server_type,
    image = req.image,
    location = region,
    labels = labels,
    user_data = req.user_data,
    start_after_create = true,
    public_net = { enable_ipv4 = true, enable_ipv6 = true },
  }
  if key_id then
    body.ssh_keys = json.array({ key_id })
  end

  local function find()
    local server, err, code = self:find_server(req.slug)
    if server then
      self:event(req.on_event, { type = "server_found", id = server.id,
        slug = req.slug })
      return { server = server }
    end
    return nil, err, code
  end

  local result, err, code, hcode = self:request("POST", "/servers",
    { body = body, before_retry = find })
  if result then
    return result
  end
  if code == "provider_unavailable" or code == "uniqueness_conflict" then
    -- The last response was lost or the name is taken, so the server may
    -- exist already.
    local found = find()
    if found then
      return found
    end
  end
  return nil, err, code, hcode
end


-- Creates a server for req.slug, or returns the one already made for it.
function Driver:create_server(req)
  local ok, problem = check_create_request(req)
  if not ok then
    return nil, "create_server: " .. problem, "invalid_request"
  end
  local on_event = req.on_event

  local existing, err, code = self:find_server(req.slug)
  if existing then
    self:event(on_event, { type = "server_found", id = existing.id,
      slug = req.slug })
    return server_result(existing)
  elseif code ~= "not_found" then
    return nil, err, code
  end

  local key_id
  if req.ssh_key then
    key_id, err, code = self:ensure_ssh_key(req.slug, req.ssh_key, on_event)
    if not key_id then
      return nil, err, code
    end
  end

  local candidates = { { region = req.region,
    server_type = req.server_type } }
  for _, alt in ipairs(req.fallbacks or {}) do
    candidates[#candidates + 1] = {
      region = alt.region or req.region,
      server_type = alt.server_type or req.server_type,
    }
  end

  local created
  for i, candidate in ipairs(candidates) do
    self:event(on_event, { type = "create_attempt", attempt = i,
      region = candidate.region, server_type = candidate.server_type })
    created, err, code = self:post_server(req, candidate.region,
      candidate.server_type, key_id)
    if created or code ~= "capacity_unavailable" then
      break
    end
    self:event(on_event, { type = "capacity_unavailable", attempt = i,
      region = candidate.region, server_type = candidate.server_type,
      message = err })
  end
  if not created then
    return nil, err, code
  end

  local server = created.server
  if type(server) ~= "table" then
    return nil, "POST /servers: response has no server",
      "provider_unavailable"
  end
  if created.action then
    local action
    action, err, code = self:wait_action(created.action)
    if not action then
      return nil, err, code
    end
    local body = self:request("GET", "/servers/" .. tostring(server.id))
    if body and type(body.server) == "table" then
      server = body.server
    end
  end
  self:event(on_event, { type = "server_created", id = server.id,
    region = type(server.location) == "table" and server.location.name,
    server_type = type(server.server_type) == "table"
      and server.server_type.name })
  return server_result(server)
end


-- Returns the server types with their prices and the regions that offer
-- them now. id is the name that create_server takes.
function Driver:list_server_types()
  local types, err, code = self:list("/server_types", "server_types")
  if not types then
    return nil, err, code
  end
  local out = {}
  for _, t in ipairs(types) do
    local prices = {}
    for _, p in ipairs(type(t.prices) == "table" and t.prices or {}) do
      prices[#prices + 1] = {
        region = p.location,
        hourly_net = p.price_hourly and p.price_hourly.net,
        monthly_net = p.price_monthly and p.price_monthly.net,
        monthly_gross = p.price_monthly and p.price_monthly.gross,
      }
    end
    local locations = {}
    for _, l in ipairs(type(t.locations) == "table" and t.locations or {}) do
      if l.available ~= false then
        locations[#locations + 1] = l.name
      end
    end
    out[#out + 1] = {
      id = tostring(t.name),
      name = tostring(t.description or t.name),
      cores = tonumber(t.cores) or 0,
      memory_gb = tonumber(t.memory) or 0,
      disk_gb = tonumber(t.disk) or 0,
      architecture = t.architecture,
      deprecated = t.deprecated == true,
      prices = prices,
      locations = locations,
    }
  end
  return out
end


-- Returns the locations. id is the name that create_server takes as
-- region.
function Driver:list_regions()
  local locations, err, code = self:list("/locations", "locations")
  if not locations then
    return nil, err, code
  end
  local out = {}
  for _, l in ipairs(locations) do
    out[#out + 1] = {
      id = tostring(l.name),
      name = tostring(l.description or l.name),
      city = tostring(l.city),
      country = tostring(l.country),
      network_zone = l.network_zone,
    }
  end
  return out
end


function Driver:get_server_status(id)
  if not is_numeric_id(id) then
    return nil, format("server id %q is not numeric", tostring(id)),
      "invalid_request"
  end
  local body, err, code = self:request("GET", "/servers/" .. tostring(id))
  if not body then
    return nil, err, code
  end
  if type(body.server) ~= "table" then
    return nil, "GET /servers: response has no server",
      "provider_unavailable"
  end
  local result = server_result(body.server)
  return { id = result.id, status = result.status, ipv4 = result.ipv4,
    ipv6 = result.ipv6, provider_status = result.provider_status }
end


-- Starts a snapshot of server id. Returns at once with the image's status
-- ("creating") unless opts.wait is true, when it waits for the action.
function Driver:create_image(id, opts)
  opts = opts or {}
  if not is_numeric_id(id) then
    return nil, format("server id %q is not numeric", tostring(id)),
      "invalid_request"
  end
  local body, err, code = self:request("POST",
    "/servers/" .. tostring(id) .. "/actions/create_image", {
      body = { type = "snapshot", description = opts.description,
        labels = opts.labels },
    })
  if not body then
    return nil, err, code
  end
  if type(body.image) ~= "table" then
    return nil, "create_image: response has no image",
      "provider_unavailable"
  end
  local status = body.image.status
  if opts.wait and body.action then
    local action
    action, err, code = self:wait_action(body.action)
    if not action then
      return nil, err, code
    end
    status = "available"
  end
  return { image_id = tostring(body.image.id), status = tostring(status),
    action_id = body.action and tostring(body.action.id) or nil }
end


-- Deletes the SSH keys labelled with slug. Returns how many it deleted,
-- or nil, message, code.
function Driver:delete_keys(slug)
  local keys, err, code = self:list("/ssh_keys", "ssh_keys",
    "label_selector=" .. escape(_M.SLUG_LABEL .. "=" .. slug))
  if not keys then
    return nil, err, code
  end
  local deleted = 0
  for _, key in ipairs(keys) do
    local ok
    ok, err, code = self:request("DELETE", "/ssh_keys/" .. tostring(key.id))
    if ok then
      deleted = deleted + 1
    elseif code ~= "not_found" then
      return nil, err, code
    end
  end
  return deleted
end


-- Deletes a server by numeric id or by slug, waits for the delete action,
-- then deletes the SSH keys registered for its slug. A server or key that
-- is already gone counts as deleted.
function Driver:delete_server(id_or_slug)
  local server, err, code
  local slug
  if is_numeric_id(id_or_slug) then
    local body
    body, err, code = self:request("GET", "/servers/" ..
      tostring(id_or_slug))
    if body and type(body.server) == "table" then
      server = body.server
    elseif code ~= "not_found" then
      return nil, err, code
    end
  elseif type(id_or_slug) == "string" and id_or_slug ~= "" then
    slug = id_or_slug
    server, err, code = self:find_server(slug)
    if not server and code ~= "not_found" then
      return nil, err, code
    end
  else
    return nil, "delete_server needs a server id or a slug",
      "invalid_request"
  end

  local result = { deleted = true, id = nil, ssh_keys_deleted = 0 }
  if server then
    result.id = tostring(server.id)
    slug = slug or (type(server.labels) == "table"
      and server.labels[_M.SLUG_LABEL])
    local body
    body, err, code = self:request("DELETE", "/servers/" ..
      tostring(server.id))
    if body and body.action then
      local action
      action, err, code = self:wait_action(body.action)
      if not action and code ~= "not_found" then
        return nil, err, code
      end
    elseif not body and code ~= "not_found" then
      return nil, err, code
    end
  end

  if slug then
    local count
    count, err, code = self:delete_keys(slug)
    if not count then
      return nil, err, code
    end
    result.ssh_keys_deleted = count
  end
  return result
end


-- Returns a new driver for conf (validated against _M.schema), or nil,
-- message, "invalid_request". deps may replace the functions the driver
-- calls: http(req) -> res | nil, message, code; sleep(seconds); now()
-- (monotonic seconds); time() (Unix seconds); random() in [0, 1); log
-- (a justavps.log logger).
function _M.new(conf, deps)
  local valid, err = config.validate(_M.schema, conf or {})
  if not valid then
    return nil, "hetzner: " .. err, "invalid_request"
  end
  deps = deps or {}
  local core
  local function get_core()
    core = core or require("justavps.core")
    return core
  end
  local self = {
    conf = valid,
    http = deps.http or default_http(),
    sleep = deps.sleep or function(seconds)
      get_core().sleep(max(0, seconds))
    end,
    now = deps.now or function()
      get_core().update_time()
      return get_core().now()
    end,
    time = deps.time or function()
      return get_core().time()
    end,
    random = deps.random or random,
    log = deps.log or require("justavps.log"),
  }
  return setmetatable(self, Driver)
end


return _M
