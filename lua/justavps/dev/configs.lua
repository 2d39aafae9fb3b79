-- The files `justavps dev` writes before it starts the roles: a
-- development certificate authority with the edge's and the broker's
-- certificates, the shared secrets, and the platform, edge and broker
-- configs. Everything lives under the dev directory (var/dev by
-- default) and is reused on the next start.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local files = require("justavps.dev.files")

local ipairs = ipairs
local pairs = pairs
local tostring = tostring
local type = type
local concat = table.concat

local _M = {}

_M.BROKER_ID = "dev-broker-1"
-- The broker's certificate carries this name; the edge checks it.
_M.BROKER_NAME = "broker.justavps.localhost"
-- The local provider's daemons listen on this port of their own
-- 127.0.0.x address.
_M.DAEMON_PORT = 8000


-- Makes the CA once, and a leaf certificate for names unless one exists.
local function ensure_certs(dir, domain)
  local ca, ca_key = dir .. "/ca.pem", dir .. "/ca.key"
  if not files.exists(ca) or not files.exists(ca_key) then
    local ok, err = core.tls.generate({ cert_out = ca, key_out = ca_key,
      ca = true, cn = "justavps dev CA", days = 3650 })
    if not ok then
      return nil, "cannot make the development CA: " .. tostring(err)
    end
    log.info("development CA created", { file = ca })
    -- Leaf certificates of an older CA would no longer verify.
    files.run("rm", { "-f", "--", dir .. "/edge.pem", dir .. "/broker.pem" })
  end

  local leaves = {
    { name = "edge", names = { domain, "*." .. domain } },
    { name = "broker", names = { _M.BROKER_NAME, "127.0.0.1" } },
  }
  -- A changed --domain needs a new edge certificate; the names are
  -- recorded beside it.
  for _, leaf in ipairs(leaves) do
    local cert = dir .. "/" .. leaf.name .. ".pem"
    local names_file = cert .. ".names"
    local names = concat(leaf.names, " ")
    if not files.exists(cert) or files.read(names_file) ~= names then
      local ok, err = core.tls.generate({ cert_out = cert,
        key_out = dir .. "/" .. leaf.name .. ".key", names = leaf.names,
        cn = leaf.names[1], issuer_cert = ca, issuer_key = ca_key })
      if not ok then
        return nil, "cannot make the " .. leaf.name .. " certificate: "
          .. tostring(err)
      end
      files.write_private(names_file, names)
    end
  end
  return { ca = ca }
end


-- Returns the secrets of dir/secrets.json, creating the file with new
-- random values on first use.
local function ensure_secrets(dir)
  local path = dir .. "/secrets.json"
  local text = files.read(path)
  if text then
    local secrets = json.decode(text)
    if type(secrets) ~= "table" or type(secrets.jwt_secret) ~= "string"
        or type(secrets.broker_secret) ~= "string"
        or type(secrets.demo_password) ~= "string" then
      -- New secrets would not match the demo password already stored in
      -- the database, so the file is never replaced silently.
      return nil, path .. " is not valid: expected a JSON object with "
        .. "jwt_secret, broker_secret and demo_password; restore it, or "
        .. "remove the whole directory to start afresh"
    end
    return secrets
  end
  local secrets = {
    jwt_secret = core.crypto.random_token(48),
    broker_secret = core.crypto.random_token(48),
    demo_password = core.crypto.random_token(20),
  }
  local ok, err = files.write_private(path, json.encode(secrets) .. "\n")
  if not ok then
    return nil, "cannot write " .. path .. ": " .. tostring(err)
  end
  return secrets
end


-- Writes the role configs for opts (the dev role's options) and the
-- database connection string. Returns a table with the paths, secrets and
-- URLs the rest of the dev role uses, or nil, message.
function _M.write(opts, conninfo)
  local dir = opts.dir
  local certs, err = ensure_certs(dir, opts.domain)
  if not certs then
    return nil, err
  end
  local secrets
  secrets, err = ensure_secrets(dir)
  if not secrets then
    return nil, err
  end

  local host = "127.0.0.1"
  local platform_url = "http://" .. host .. ":" .. opts.platform_port
  local broker_url = "https://" .. host .. ":" .. opts.broker_port
  local stack = {
    dir = dir,
    domain = opts.domain,
    ca_file = certs.ca,
    platform_url = platform_url,
    edge_url = "https://" .. opts.domain .. ":" .. opts.edge_port,
    broker_url = broker_url,
    broker_id = _M.BROKER_ID,
    secrets = secrets,
    machines_dir = dir .. "/machines",
    configs = {},
  }

  local platform = {
    listen = { host = host, port = opts.platform_port },
    database = { url = conninfo },
    domain = opts.domain,
    machines = { default_provider = "local" },
    provision = {
      platform_url = platform_url,
      daemon_heartbeat_interval = opts.heartbeat_interval,
      broker_cidrs = { "127.0.0.0/8" },
      providers = { ["local"] = { root_dir = stack.machines_dir,
        address_first = opts.first_address,
        public_port = _M.DAEMON_PORT } },
    },
    proxy = { jwt_secret = secrets.jwt_secret, url_scheme = "https",
      url_port = opts.edge_port },
    auth = { dev = true },
    catalog = { provider = "local" },
  }

  local edge = {
    domain = opts.domain,
    listen = { host = host, port = opts.edge_port },
    tls = { cert = dir .. "/edge.pem", key = dir .. "/edge.key" },
    brokers = { { url = broker_url, ca = certs.ca,
      server_name = _M.BROKER_NAME, id = _M.BROKER_ID,
      secret = secrets.broker_secret } },
    machine_port = _M.DAEMON_PORT,
    database = { url = conninfo },
    jwt_secret = secrets.jwt_secret,
  }

  local broker = {
    broker_id = _M.BROKER_ID,
    secret = secrets.broker_secret,
    listen = { host = host, port = opts.broker_port },
    tls = { cert = dir .. "/broker.pem", key = dir .. "/broker.key" },
    target = { allow_networks = { "127.0.0.0/8" },
      allow_ports = { _M.DAEMON_PORT } },
  }

  for name, conf in pairs({ platform = platform, edge = edge,
      broker = broker }) do
    local path = dir .. "/" .. name .. ".json"
    local ok, werr = files.write_private(path, json.encode(conf) .. "\n")
    if not ok then
      return nil, "cannot write " .. path .. ": " .. tostring(werr)
    end
    stack.configs[name] = path
  end
  return stack
end


return _M
