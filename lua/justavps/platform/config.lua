-- The platform's configuration: a JSON file (--config) plus
-- JUSTAVPS_PLATFORM_* environment overrides.
local config = require("justavps.config")
local db = require("justavps.db.db")
local local_provider = require("providers.local")

local _M = {}

_M.schema = config.schema({ fields = {
  { listen = { type = "record", description = "the API listener", fields = {
    { host = { type = "string", default = "127.0.0.1",
      description = "address to listen on (IPv4 or IPv6 literal)" } },
    { port = { type = "integer", default = 8080, between = { 0, 65535 },
      description = "TCP port; 0 picks a free one" } },
  } } },
  { database = { type = "record", fields = db.config_fields,
    description = "PostgreSQL connection" } },
  { heartbeat = { type = "record", description = "machine heartbeats",
    fields = {
      { nonce_max_bytes = { type = "size", default = 16 * 1024 * 1024,
        between = { 4096, 1024 * 1024 * 1024 },
        description = "memory bound of the heartbeat nonce cache" } },
      { max_body = { type = "size", default = 256 * 1024,
        between = { 1024, 16 * 1024 * 1024 },
        description = "largest heartbeat body accepted" } },
      { batch_max_rows = { type = "integer", default = 256,
        between = { 1, 10000 },
        description = "most steady-state heartbeats written by one "
          .. "statement" } },
      { batch_delay = { type = "duration", default = 0.0005,
        between = { 0, 1 },
        description = "seconds a batch collects heartbeats before its "
          .. "write starts, unless it fills first; 0 writes at once" } },
      { batch_writers = { type = "integer", default = 4,
        between = { 1, 64 },
        description = "batch writes in flight at once, each on its own "
          .. "pool connection; at most database.pool_size - 1 are used" } },
      { machine_cache_ttl = { type = "duration", default = 300,
        between = { 0, 86400 },
        description = "seconds a machine's id, stage and token stay "
          .. "cached after their lookup; 0 looks up every heartbeat" } },
      { machine_cache_size = { type = "integer", default = 100000,
        between = { 1, 10000000 },
        description = "machines cached at most; a full cache is emptied" } },
      { release_cache_ttl = { type = "duration", default = 5,
        between = { 0, 3600 },
        description = "seconds the release list of the update offer "
          .. "stays cached; a publish in this process empties it at once" } },
    } } },
  { domain = { type = "string", default = "localhost",
    match = "^[%w.-]+$",
    description = "public domain: machines are served at "
      .. "{slug}.{domain} and {port}-{slug}.{domain}" } },
  { machines = { type = "record", description = "the machines API",
    fields = {
      { default_provider = { type = "string", default = "local",
        match = "^[a-z0-9_-]+$",
        description = "provider of POST /machines when the body names "
          .. "none" } },
    } } },
  { provision = { type = "record", description = "the provisioning "
    .. "worker and the providers it calls", fields = {
      { enabled = { type = "boolean", default = true,
        description = "run provisioning jobs in this process" } },
      { worker_id = { type = "string", default = "",
        description = "name of this worker in jobs.locked_by; empty: "
          .. "platform-PID-MILLISECONDS" } },
      { concurrency = { type = "integer", default = 2, between = { 1, 64 },
        description = "jobs this process runs at once" } },
      { poll_interval = { type = "duration", default = 0.25,
        between = { 0.05, 60 },
        description = "seconds between polls of an empty queue" } },
      { lease = { type = "duration", default = 120, between = { 1, 3600 },
        description = "seconds a claimed job stays locked without a "
          .. "renewal; a killed process's jobs run again after this" } },
      { max_attempts = { type = "integer", default = 5, between = { 1, 100 },
        description = "attempts of a job before it becomes dead" } },
      { backoff_base = { type = "duration", default = 5,
        between = { 0, 3600 },
        description = "delay after the first failed attempt, doubled per "
          .. "attempt" } },
      { backoff_max = { type = "duration", default = 300,
        between = { 0, 86400 }, description = "maximum retry delay" } },
      { heartbeat_deadline = { type = "duration", default = 900,
        between = { 1, 86400 },
        description = "seconds after server creation by which the first "
          .. "heartbeat must arrive, else the machine fails" } },
      { image = { type = "string", default = "debian-13", len_min = 1,
        description = "provider image of new servers" } },
      { platform_url = { type = "string", default = "",
        description = "base URL the daemons send heartbeats to; empty: "
          .. "http://LISTEN_HOST:LISTEN_PORT of this process" } },
      { daemon_heartbeat_interval = { type = "duration", default = 30,
        between = { 1, 3600 },
        description = "heartbeat_interval written to each daemon's "
          .. "config" } },
      { daemon_url = { type = "string",
        default = "http://127.0.0.1/justavps-daemon",
        description = "URL cloud-init downloads the daemon from" } },
      { daemon_sha256 = { type = "string", default = string.rep("0", 64),
        match = "^%x+$", len_min = 64, len_max = 64,
        description = "SHA-256 of the daemon at daemon_url; the default "
          .. "placeholder is accepted only by the local provider" } },
      { fallback_regions = { type = "array", default = {},
        elements = { type = "string" },
        description = "regions to try in order when a machine's region "
          .. "has no capacity for its server type; each attempt becomes "
          .. "a machine event" } },
      { broker_cidrs = { type = "array", default = { "127.0.0.0/8" },
        elements = { type = "string" },
        description = "networks allowed to reach each daemon's public "
          .. "port" } },
      { providers = { type = "record", description = "driver "
        .. "configuration of each provider", fields = {
          { ["local"] = { type = "record",
            fields = local_provider.config_fields,
            description = "daemons on this host" } },
          { hetzner = { type = "record", description = "Hetzner Cloud; "
            .. "without a token no hetzner machine is created", fields = {
              { base_url = { type = "string",
                description = "API base URL, such as "
                  .. "https://api.hetzner.cloud/v1" } },
              { token = { type = "string", description = "API token" } },
            } } },
        } } },
    } } },
  { events = { type = "record", description = "the machine event stream",
    fields = {
      { ping_interval = { type = "duration", default = 15,
        between = { 1, 300 },
        description = "seconds between SSE keep-alive comments" } },
    } } },
  { proxy = { type = "record", description = "proxy tokens and share links",
    fields = {
      { jwt_secret = { type = "string", len_min = 32,
        description = "HS256 secret shared with the edge (at least 32 "
          .. "bytes); without it proxy tokens are not issued" } },
      { share_max_ttl = { type = "duration", default = 7 * 86400,
        between = { 60, 7 * 86400 },
        description = "longest lifetime of a share link, in seconds" } },
      { url_scheme = { type = "string", default = "https",
        one_of = { "http", "https" },
        description = "scheme of the share link URLs" } },
      { url_port = { type = "integer", default = 0, between = { 0, 65535 },
        description = "port of the edge in share link URLs; 0 leaves it "
          .. "out, for the scheme's default port" } },
    } } },
  { auth = { type = "record", description = "dashboard sign-in: sessions, "
    .. "login rate limits and GitHub OAuth", fields = {
      { session_ttl = { type = "duration", default = 7 * 86400,
        between = { 60, 90 * 86400 },
        description = "lifetime of a dashboard session and Max-Age of its "
          .. "cookie" } },
      { dev = { type = "boolean", default = false,
        description = "leave Secure off cookies, for plain HTTP on "
          .. "loopback during development" } },
      { login_rate = { type = "record", description = "login and signup "
        .. "attempts allowed before 429", fields = {
          { email = { type = "record", description = "login attempts per "
            .. "email address", fields = {
              { limit = { type = "integer", default = 10,
                between = { 1, 1000000 },
                description = "attempts per window" } },
              { window = { type = "duration", default = 900,
                between = { 1, 86400 }, description = "window length" } },
            } } },
          { ip = { type = "record", description = "login and signup "
            .. "attempts per client IP address", fields = {
              { limit = { type = "integer", default = 100,
                between = { 1, 1000000 },
                description = "attempts per window" } },
              { window = { type = "duration", default = 900,
                between = { 1, 86400 }, description = "window length" } },
            } } },
          { max_entries = { type = "integer", default = 100000,
            between = { 100, 10000000 },
            description = "rate-limit counters kept in memory" } },
        } } },
      { github = { type = "record", description = "sign-in with GitHub "
        .. "(an OAuth app)", fields = {
          { client_id = { type = "string", default = "",
            description = "OAuth app client id; empty turns GitHub "
              .. "sign-in off" } },
          { client_secret = { type = "string", default = "",
            description = "OAuth app client secret" } },
          { web_url = { type = "string", default = "http://127.0.0.1",
            description = "base URL of /login/oauth/authorize and "
              .. "/login/oauth/access_token (https://github.com in "
              .. "production)" } },
          { api_url = { type = "string", default = "http://127.0.0.1",
            description = "base URL of /user and /user/emails "
              .. "(https://api.github.com in production)" } },
          { redirect_url = { type = "string", default = "",
            description = "callback URL registered with the OAuth app; "
              .. "empty leaves redirect_uri out" } },
          { after_login_url = { type = "string", default = "/",
            description = "where the browser goes after signing in" } },
          { timeout = { type = "duration", default = 10,
            between = { 1, 120 },
            description = "time allowed for each call to GitHub" } },
        } } },
    } } },
  { releases = { type = "record", description = "daemon releases",
    fields = {
      { operators = { type = "array", default = {},
        elements = { type = "string" },
        description = "account ids or user emails allowed to publish "
          .. "releases with POST /releases" } },
    } } },
  { catalog = { type = "record", description = "regions and server types "
    .. "of GET /regions and /server-types", fields = {
      { provider = { type = "string", default = "",
        match = "^[a-z0-9_]*$",
        description = "provider module asked for the lists, such as "
          .. "hetzner; empty answers 503 provider_not_configured" } },
      { provider_config = { type = "map", default = {},
        values = { type = "string" },
        description = "settings of that provider as strings, converted "
          .. "to the types of its own schema and checked against it" } },
      { cache_ttl = { type = "duration", default = 300,
        between = { 0, 86400 },
        description = "seconds a provider list is reused" } },
    } } },
  { stripe = { type = "record", description = "Stripe billing: Checkout "
    .. "and webhooks", fields = {
      { base_url = { type = "string", default = "",
        match = "^[^%s]*$",
        description = "Stripe API base URL (https://api.stripe.com in "
          .. "production); empty answers 503 billing_not_configured" } },
      { secret_key = { type = "string", default = "",
        description = "API secret key sent as Authorization: Bearer" } },
      { webhook_secret = { type = "string", default = "",
        description = "webhook endpoint signing secret (whsec_...); empty "
          .. "rejects every webhook with 503" } },
      { tolerance = { type = "duration", default = 300,
        between = { 1, 3600 },
        description = "oldest webhook signature accepted, in seconds" } },
      { price_id = { type = "string", default = "",
        description = "price of the subscription that Checkout sells" } },
      { success_url = { type = "string", default = "",
        description = "where Checkout sends the browser after payment" } },
      { cancel_url = { type = "string", default = "",
        description = "where Checkout sends the browser on cancel" } },
      { timeout = { type = "duration", default = 10,
        between = { 1, 120 },
        description = "time allowed for each call to Stripe" } },
    } } },
} })


-- Loads the config file at path (or only defaults and the environment
-- when path is nil). Returns the config or nil, message, code.
function _M.load(path)
  return config.load({ schema = _M.schema, path = path,
    env_prefix = "JUSTAVPS_PLATFORM" })
end


return _M
