-- Access to a machine's ports and terminal: share links (proxy tokens for
-- one port) and single-use machine tickets for /_pty and /_toolbox.
--
-- A share link is a proxy_token share JWT whose jti is the id of its
-- proxy_tokens row, so the edge can check revocation by primary key, and
-- the row also keeps the SHA-256 of the token. The token itself is
-- returned once and stored nowhere. Tickets are stored the same way, by
-- hash only.
--
-- The module is callable, route(api) adds the routes, and it also offers
-- issue_owner_token for the owner's __justavps_proxy cookie.
local core = require("justavps.core")
local log = require("justavps.log")
local api_mod = require("justavps.platform.api")
local machines = require("justavps.platform.machines")
local state = require("justavps.platform.state")
local proxy_token = require("justavps.auth.proxy_token")
local ticket = require("justavps.auth.ticket")
local shared = require("justavps.platform.routes.machines")

local crypto = core.crypto

local type = type
local tostring = tostring
local setmetatable = setmetatable
local min = math.min
local floor = math.floor

local _M = {}

-- Shortest share link lifetime a request may ask for, in seconds.
_M.SHARE_MIN_TTL = 60

-- Query parameter of a share link URL that carries the token.
-- NOTE: the edge does not read it yet; the name is this API's proposal.
_M.TOKEN_PARAM = "__justavps_token"


local function not_configured()
  return api_mod.error(503, "proxy_not_configured",
    "proxy tokens are disabled: set proxy.jwt_secret "
      .. "(JUSTAVPS_PLATFORM_PROXY_JWT_SECRET) to a secret of 32 bytes or "
      .. "more shared with the edge")
end


-- Returns the URL of a share link: the port's host name, with the token
-- in the query.
function _M.share_url(slug, port, token)
  local conf = state.conf
  local authority = tostring(port) .. "-" .. slug .. "." .. conf.domain
  if conf.proxy.url_port ~= 0 then
    authority = authority .. ":" .. conf.proxy.url_port
  end
  return conf.proxy.url_scheme .. "://" .. authority .. "/?"
    .. _M.TOKEN_PARAM .. "=" .. token
end


-- Issues the owner proxy token (the __justavps_proxy cookie value) of
-- user_id for machine slug. The caller must have checked that the user
-- owns the machine. ttl in seconds defaults to proxy_token.OWNER_TTL.
-- Returns token, claims, or nil, message, code where code
-- "proxy_not_configured" means proxy.jwt_secret is unset.
function _M.issue_owner_token(user_id, slug, ttl)
  local secret = state.conf.proxy.jwt_secret
  if not secret then
    return nil, "proxy.jwt_secret is not set", "proxy_not_configured"
  end
  return proxy_token.issue_owner({ user_id = user_id, slug = slug,
    ttl = ttl }, secret)
end


local function create_share(ctx)
  local conf = state.conf
  local secret = conf.proxy.jwt_secret
  if not secret then
    return not_configured()
  end
  local machine, s, h, b = shared.load_machine(ctx)
  if not machine then
    return s, h, b
  end

  local body = ctx.body
  local ttl = floor(min(body.ttl_s or proxy_token.SHARE_TTL,
    conf.proxy.share_max_ttl))
  local id = machines.new_uuid()
  local token, claims, code = proxy_token.issue_share({ slug = machine.slug,
    port = body.port, ttl = ttl, id = id }, secret)
  if not token then
    log.err("share token not issued", { slug = machine.slug, error = claims,
      code = code })
    return api_mod.error(500, "internal", "internal server error")
  end

  local row, err, dcode = machines.insert_proxy_token({
    id = id,
    machine_id = machine.id,
    port = body.port,
    token_hash = crypto.hex_encode(crypto.sha256(token)),
    expires = claims.exp,
    created_by = ctx.user.id,
  })
  if not row then
    return shared.db_failure("share link insert", err, dcode,
      { slug = machine.slug })
  end

  log.info("share link issued", { slug = machine.slug, link_id = id,
    port = body.port, ttl = ttl })
  return 201, {
    id = row.id,
    token = token,
    url = _M.share_url(machine.slug, body.port, token),
    port = row.port,
    expires_at = row.expires_at,
  }
end


local function list_shares(ctx)
  local machine, s, h, b = shared.load_machine(ctx)
  if not machine then
    return s, h, b
  end
  local rows, err, code = machines.list_proxy_tokens(machine.id)
  if not rows then
    return shared.db_failure("share link list", err, code,
      { slug = machine.slug })
  end
  return 200, { items = rows }
end


local function revoke_share(ctx)
  local machine, s, h, b = shared.load_machine(ctx)
  if not machine then
    return s, h, b
  end
  local id = ctx.params.id
  local row, err, code = machines.revoke_proxy_token(machine.id, id)
  if not row then
    if code == "not_found" then
      return api_mod.error(404, "not_found", "no share link " .. id
        .. " on machine " .. machine.slug)
    end
    return shared.db_failure("share link revoke", err, code,
      { slug = machine.slug, link_id = id })
  end
  log.info("share link revoked", { slug = machine.slug, link_id = id })
  return 200, row
end


local function create_ticket(ctx)
  local user_id = ctx.user.id
  if type(user_id) ~= "string" then
    return api_mod.error(403, "forbidden", "tickets are issued to a user, "
      .. "and this credential has none; sign in or use a user's API key")
  end
  local machine, s, h, b = shared.load_machine(ctx)
  if not machine then
    return s, h, b
  end

  local issued, ierr, icode = ticket.issue({ slug = machine.slug,
    user_id = user_id })
  if not issued then
    log.err("ticket not issued", { slug = machine.slug, error = ierr,
      code = icode })
    return api_mod.error(500, "internal", "internal server error")
  end
  local row, err, code = machines.insert_ticket(machine.id, user_id,
    issued.hash)
  if not row then
    return shared.db_failure("ticket insert", err, code,
      { slug = machine.slug })
  end
  return 201, { ticket = issued.ticket, expires_at = row.expires_at }
end


local function add_routes(api)
  api:route({
    method = "POST", path = "/api/v1/machines/{slug}/proxy-tokens",
    name = "createProxyToken", auth = "user", scope = "write", status = 201,
    summary = "Create a share link for one port; the token is shown once",
    body = { fields = {
      { port = { type = "integer", required = true, between = { 1, 65535 },
        description = "the port the link opens" } },
      { ttl_s = { type = "integer",
        between = { _M.SHARE_MIN_TTL, proxy_token.SHARE_MAX_TTL },
        description = "lifetime in seconds, default 3600, cut to "
          .. "proxy.share_max_ttl" } },
    } },
    handler = create_share,
  })

  api:route({
    method = "GET", path = "/api/v1/machines/{slug}/proxy-tokens",
    name = "listProxyTokens", auth = "user", scope = "read",
    summary = "List a machine's share links, without their tokens",
    handler = list_shares,
  })

  api:route({
    method = "DELETE", path = "/api/v1/machines/{slug}/proxy-tokens/{id}",
    name = "revokeProxyToken", auth = "user", scope = "delete",
    summary = "Revoke a share link",
    handler = revoke_share,
  })

  api:route({
    method = "POST", path = "/api/v1/machines/{slug}/tickets",
    name = "createMachineTicket", auth = "user", scope = "exec",
    status = 201,
    summary = "Issue a single-use, 60-second ticket for /_pty and /_toolbox",
    handler = create_ticket,
  })
end


_M.handlers = {
  create_share = create_share, list_shares = list_shares,
  revoke_share = revoke_share, create_ticket = create_ticket,
}

return setmetatable(_M, { __call = function(_, api)
  return add_routes(api)
end })
