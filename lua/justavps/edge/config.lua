-- The edge's configuration: a JSON file (by default
-- /etc/justavps/edge.json, mode 0600 because it contains the broker
-- secrets and the proxy-token secret) plus JUSTAVPS_EDGE_* environment
-- overrides, such as JUSTAVPS_EDGE_JWT_SECRET or JUSTAVPS_EDGE_BROKERS (a
-- JSON array).
local config = require("justavps.config")
local db = require("justavps.db.db")
local edge_sig = require("justavps.edge_sig")

local ipairs = ipairs
local tonumber = tonumber
local concat = table.concat
local sfind = string.find
local smatch = string.match
local slower = string.lower

local _M = {}

-- HMAC keys (broker secrets and the proxy-token secret) must carry at
-- least 32 characters, the HMAC-SHA256 output size.
_M.MIN_SECRET_LENGTH = 32

local function listen_fields()
  return {
    { host = { type = "string", default = "127.0.0.1",
      description = "address to listen on (IPv4 or IPv6 literal)" } },
    { port = { type = "integer", default = 443, between = { 0, 65535 },
      description = "TCP port; 0 picks a free one" } },
  }
end

_M.schema = config.schema({ fields = {
  { domain = { type = "string", required = true,
    match = "^[a-z0-9][a-z0-9.-]*[a-z0-9]$", len_max = 200,
    description = "machines are served as SLUG.DOMAIN and "
      .. "PORT-SLUG.DOMAIN" } },
  { listen = { type = "record", fields = listen_fields(),
    description = "the public listener" } },
  { tls = { type = "record", description = "certificates clients see",
    fields = {
      { cert = { type = "string",
        description = "PEM certificate chain file, normally for DOMAIN "
          .. "and *.DOMAIN" } },
      { key = { type = "string", description = "PEM private key file" } },
      { sni = { type = "array", default = {},
        description = "extra certificates chosen by the name the client "
          .. "sends",
        elements = { type = "record", fields = {
          { names = { type = "array", elements = { type = "string" },
            required = true,
            description = "host names or *.example.com wildcards" } },
          { cert = { type = "string", required = true,
            description = "PEM certificate chain file" } },
          { key = { type = "string", required = true,
            description = "PEM private key file" } },
        } } } },
    } } },
  { insecure_plain_http = { type = "boolean", default = false,
    description = "serve plain HTTP without TLS and set cookies without "
      .. "Secure; for development on loopback only" } },
  { brokers = { type = "array", required = true, len_min = 1,
    description = "brokers to forward to, used in round robin",
    elements = { type = "record", fields = {
      { url = { type = "string", required = true,
        description = "http://IP:PORT or https://IP:PORT of the broker" } },
      { ca = { type = "string",
        description = "CA file that signed an https broker's certificate "
          .. "(default: the system store)" } },
      { server_name = { type = "string",
        description = "name an https broker's certificate must carry; "
          .. "required for https" } },
      { id = { type = "string", required = true,
        description = "the broker's broker_id" } },
      -- The length is checked in check() so that no message shows it.
      { secret = { type = "string", required = true,
        description = "the broker's shared secret; never logged" } },
    } } } },
  { broker_timeout = { type = "duration", default = 300,
    between = { 1, 86400 }, unit = "seconds",
    description = "seconds for the connect to a broker and for each read "
      .. "and write after it" } },
  { broker_health = { type = "record",
    description = "health checks and failover of brokers", fields = {
      { interval = { type = "duration", default = 5, between = { 0.1, 3600 },
        unit = "seconds", description = "seconds between TCP connect "
          .. "checks of each broker" } },
      { down_for = { type = "duration", default = 30,
        between = { 0.1, 3600 }, unit = "seconds",
        description = "seconds a broker that refused a connection stays "
          .. "out of rotation unless a check succeeds first" } },
      { connect_timeout = { type = "duration", default = 2,
        between = { 0.1, 60 }, unit = "seconds",
        description = "seconds a health check may take to connect" } },
    } } },
  { machine_port = { type = "integer", default = 80,
    between = { 1, 65535 },
    description = "port of the daemon on each machine, signed as the "
      .. "target port" } },
  { database = { type = "record", fields = db.config_fields,
    description = "the platform's PostgreSQL" } },
  -- The length is checked in check() so that no message shows the value.
  { jwt_secret = { type = "string", required = true,
    description = "HS256 secret of proxy cookies and share tokens, shared "
      .. "with the platform; never logged" } },
  { login_url = { type = "string",
    description = "dashboard login page that browsers without access are "
      .. "redirected to, with return_to set to the URL they asked for; "
      .. "without it they get a 401 page" } },
  { cache = { type = "record", description = "in-memory caches", fields = {
    { machine_ttl = { type = "duration", default = 10,
      between = { 0, 3600 }, unit = "seconds",
      description = "seconds a machine's address and stage stay cached; "
        .. "machine_events notifications drop an entry sooner" } },
    { credential_ttl = { type = "duration", default = 5,
      between = { 0, 600 }, unit = "seconds",
      description = "seconds an API key or a share token's revocation "
        .. "state stays cached, so a revocation takes effect within it" } },
    { max_entries = { type = "integer", default = 10000,
      between = { 1, 10000000 },
      description = "entries per cache; a full cache is emptied" } },
  } } },
  { retry_after = { type = "duration", default = 10, between = { 1, 3600 },
    unit = "seconds",
    description = "Retry-After sent with 503 for a machine that is still "
      .. "being provisioned" } },
} })


-- Rebuilds a config error message from its list of errors, with the
-- entries for secrets replaced by ones that do not quote the value.
local function hide_secrets(errors)
  local lines = { "invalid config:" }
  for _, e in ipairs(errors) do
    local message = e.message
    if sfind(e.path, "secret$") or sfind(e.path, "secret ") then
      message = "expected a string of at least " .. _M.MIN_SECRET_LENGTH
        .. " characters (value not shown)"
    end
    lines[#lines + 1] = e.path .. ": " .. message
  end
  return concat(lines, "\n")
end


-- Parses a broker URL. Returns host (an IP literal), port and whether it
-- is https, or nil, message.
function _M.parse_broker_url(url)
  local scheme, authority, rest = smatch(url, "^(%a+)://([^/]+)(.*)$")
  if not scheme then
    return nil, "expected http://IP:PORT or https://IP:PORT"
  end
  scheme = slower(scheme)
  if scheme ~= "http" and scheme ~= "https" then
    return nil, "expected the http or https scheme"
  end
  if rest ~= "" and rest ~= "/" then
    return nil, "expected no path"
  end
  local host, port = smatch(authority, "^%[([%x:.]+)%]:(%d+)$")
  if not host then
    host, port = smatch(authority, "^([%d.]+):(%d+)$")
  end
  if not host or not edge_sig.is_ip_literal(host) then
    return nil, "expected an IP literal and a port, such as "
      .. "http://10.0.0.5:8443 or http://[fd00::5]:8443"
  end
  port = tonumber(port)
  if port < 1 or port > 65535 then
    return nil, "port must be from 1 to 65535"
  end
  return host, port, scheme == "https"
end


-- Checks what the schema cannot express. Returns true or nil, message.
local function check(conf)
  if #conf.jwt_secret < _M.MIN_SECRET_LENGTH then
    return nil, "jwt_secret: expected at least " .. _M.MIN_SECRET_LENGTH
      .. " characters, got " .. #conf.jwt_secret .. " (value not shown)"
  end
  if not conf.insecure_plain_http
      and (conf.tls.cert == nil or conf.tls.key == nil) then
    return nil, "tls.cert and tls.key are required unless "
      .. "insecure_plain_http is true"
  end

  local ids = {}
  for i, b in ipairs(conf.brokers) do
    local where = "brokers[" .. i .. "]"
    if #b.secret < _M.MIN_SECRET_LENGTH then
      return nil, where .. ".secret: expected at least "
        .. _M.MIN_SECRET_LENGTH .. " characters, got " .. #b.secret
        .. " (value not shown)"
    end
    if #b.id > 64 or not sfind(b.id, "^[A-Za-z0-9._-]+$") then
      return nil, where .. ".id: expected 1 to 64 characters of "
        .. "[A-Za-z0-9._-]"
    end
    if ids[b.id] then
      return nil, where .. ".id: " .. b.id .. " is listed twice"
    end
    ids[b.id] = true
    local host, err, https = _M.parse_broker_url(b.url)
    if not host then
      return nil, where .. ".url: " .. err
    end
    if https and (b.server_name == nil or b.server_name == "") then
      return nil, where .. ".server_name: required for an https broker, "
        .. "because its certificate is checked against that name"
    end
  end
  return true
end


-- Loads and validates the config file at path (and the environment).
-- Returns the config or nil, message, code.
function _M.load(path, getenv)
  local conf, err, code, errors = config.load({ schema = _M.schema,
    path = path, env_prefix = "JUSTAVPS_EDGE", getenv = getenv })
  if not conf then
    if errors then
      err = hide_secrets(errors)
    end
    return nil, err, code
  end
  local ok, cerr = check(conf)
  if not ok then
    return nil, cerr, "invalid_config"
  end
  return conf
end


return _M
