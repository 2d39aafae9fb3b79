-- The broker's configuration: a JSON file (by default
-- /etc/justavps/broker.json, mode 0600 because it contains the shared
-- secret) plus JUSTAVPS_BROKER_* environment overrides, such as
-- JUSTAVPS_BROKER_SECRET.
local config = require("justavps.config")
local target_policy = require("policies.broker_target")

local ipairs = ipairs
local concat = table.concat

local _M = {}

-- The HMAC key must carry at least 32 characters.
_M.MIN_SECRET_LENGTH = 32

_M.schema = config.schema({ fields = {
  { broker_id = { type = "string", required = true,
    match = "^[A-Za-z0-9._-]+$", len_min = 1, len_max = 64,
    description = "id of this broker; the edge signs it into every "
      .. "request meant for this process" } },
  -- The length is checked in load() so that no message shows the value.
  { secret = { type = "string", required = true,
    description = "shared secret of edges and brokers, at least 32 "
      .. "characters; never logged" } },
  { listen = { type = "record", description = "listener for edges",
    fields = {
      { host = { type = "string", default = "127.0.0.1",
        description = "address to listen on (IPv4 or IPv6 literal)" } },
      { port = { type = "integer", default = 8443, between = { 0, 65535 },
        description = "TCP port; 0 picks a free one" } },
    } } },
  { tls = { type = "record", description = "certificate edges connect to",
    fields = {
      { cert = { type = "string",
        description = "PEM certificate chain file" } },
      { key = { type = "string",
        description = "PEM private key file" } },
    } } },
  { insecure_plain_http = { type = "boolean", default = false,
    description = "serve plain HTTP without TLS; for development on "
      .. "loopback only, because bodies are not signed" } },
  { forwarded_proto = { type = "string", default = "https",
    one_of = { "https", "http" },
    description = "X-Forwarded-Proto sent to machines: the scheme the "
      .. "client used at the edge" } },
  { clock_skew = { type = "duration", default = 30, between = { 1, 300 },
    unit = "seconds",
    description = "largest accepted difference between a request's "
      .. "timestamp and this clock" } },
  { nonce = { type = "record", description = "replay cache", fields = {
    { ttl = { type = "duration", default = 120, between = { 1, 86400 },
      unit = "seconds",
      description = "how long a nonce stays recorded; at least twice "
        .. "clock_skew" } },
    { max_bytes = { type = "size", default = 64 * 1024 * 1024,
      between = { 4096, 2 ^ 32 }, unit = "bytes",
      description = "memory of the cache, allocated at start; when it is "
        .. "full new requests get 503" } },
  } } },
  { target = { type = "record", fields = target_policy.schema,
    description = "target policy settings" } },
  { upstream = { type = "record",
    description = "connections to machines; until proxy.forward takes "
      .. "separate timeouts, the largest of the three applies to each phase",
    fields = {
      { connect_timeout = { type = "duration", default = 5,
        between = { 0.1, 3600 }, unit = "seconds",
        description = "seconds to wait for a connection to a machine" } },
      { header_timeout = { type = "duration", default = 60,
        between = { 0.1, 3600 }, unit = "seconds",
        description = "seconds to wait for a machine's response head" } },
      { idle_timeout = { type = "duration", default = 300,
        between = { 0.1, 86400 }, unit = "seconds",
        description = "seconds a response body or a request body may "
          .. "stay silent" } },
    } } },
} })


-- Rebuilds a config error message from its list of errors, with the
-- entry for the secret replaced by one that does not quote the value.
local function hide_secret(errors)
  local lines = { "invalid config:" }
  for _, e in ipairs(errors) do
    local message = e.message
    if e.path == "secret" or e.path:find("^secret ") then
      message = "expected a string of at least " .. _M.MIN_SECRET_LENGTH
        .. " characters (value not shown)"
    end
    lines[#lines + 1] = e.path .. ": " .. message
  end
  return concat(lines, "\n")
end


-- Checks what the schema cannot express. Returns true or nil, message.
local function check(conf)
  if #conf.secret < _M.MIN_SECRET_LENGTH then
    return nil, "secret: expected at least " .. _M.MIN_SECRET_LENGTH
      .. " characters, got " .. #conf.secret .. " (value not shown)"
  end
  if not conf.insecure_plain_http
      and (conf.tls.cert == nil or conf.tls.key == nil) then
    return nil, "tls.cert and tls.key are required unless "
      .. "insecure_plain_http is true"
  end
  -- A nonce must stay recorded for as long as its timestamp is accepted:
  -- from clock_skew before the timestamp to clock_skew after it.
  if conf.nonce.ttl < 2 * conf.clock_skew then
    return nil, "nonce.ttl: expected at least twice clock_skew ("
      .. 2 * conf.clock_skew .. " s), got " .. conf.nonce.ttl
  end
  local ok, err = target_policy.validate(conf.target)
  if not ok then
    return nil, "target." .. err
  end
  return true
end


-- Loads and validates the config file at path (and the environment).
-- Returns the config or nil, message, code.
function _M.load(path, getenv)
  local conf, err, code, errors = config.load({ schema = _M.schema,
    path = path, env_prefix = "JUSTAVPS_BROKER", getenv = getenv })
  if not conf then
    if errors then
      err = hide_secret(errors)
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
