-- Gathers and verifies the credentials of one request for the access
-- policy (policies/edge_access.lua), and removes them from what the edge
-- forwards. The policy decides. This module runs the checks that need
-- the database: API keys by hash, the revocation state of share tokens
-- and the single-use spend of machine tickets.
--
-- Credentials the edge reads, and strips before forwarding:
--   __justavps_proxy cookie   an owner or share token (HS256 JWT)
--   __justavps_token query    a token of either kind, exchanged for the
--                             cookie by a 302
--   __justavps_ticket query   a single-use machine ticket
--   Authorization: Bearer sk_live_...   an API key
-- Every other cookie, query parameter and Authorization value passes to
-- the machine unchanged.
local core = require("justavps.core")
local db = require("justavps.db.db")
local log = require("justavps.log")
local apikey = require("justavps.auth.apikey")
local proxy_token = require("justavps.auth.proxy_token")
local session = require("justavps.auth.session")
local ticket = require("justavps.auth.ticket")
local policy = require("policies.edge_access")
local state = require("justavps.edge.state")
local json = require("justavps.json")

local type = type
local next = next
local ipairs = ipairs
local tonumber = tonumber
local concat = table.concat
local sfind = string.find
local ssub = string.sub
local smatch = string.match
local slower = string.lower
local sgsub = string.gsub
local schar = string.char
local sgmatch = string.gmatch
local tnew = require("table.new")

local crypto = core.crypto

local _M = {}

_M.PROXY_COOKIE = session.PROXY_COOKIE
_M.TOKEN_PARAM = "__justavps_token"
_M.TICKET_PARAM = "__justavps_ticket"

-- Every cookie whose name starts with this belongs to the platform and
-- never reaches a machine.
local COOKIE_PREFIX = "__justavps_"

-- NOTE: api_keys.hash has no index in the schema, so this lookup scans
-- the table; the cache in front of it bounds how often.
local API_KEY_SQL = "SELECT account_id, array_to_json(scopes)::text AS "
  .. "scopes FROM api_keys WHERE hash = $1 AND revoked_at IS NULL"

-- The platform stores every share link it issues, by token hash. A token
-- without a row was not issued for this machine and counts as revoked.
local REVOKED_SQL = "SELECT (p.revoked_at IS NOT NULL "
  .. "OR p.expires_at <= now() OR m.slug <> $2) AS revoked "
  .. "FROM proxy_tokens p JOIN machines m ON m.id = p.machine_id "
  .. "WHERE p.token_hash = $1"

-- Spends a ticket in one statement, so two requests with one ticket
-- cannot both succeed.
local TICKET_SQL = "UPDATE machine_tickets SET used_at = now() "
  .. "WHERE ticket_hash = $1 AND used_at IS NULL AND expires_at > now() "
  .. "RETURNING machine_id, user_id"


local function hex_char(hex)
  return schar(tonumber(hex, 16))
end


local function url_decode(s)
  return (sgsub(sgsub(s, "+", " "), "%%(%x%x)", hex_char))
end


local CREDENTIAL_PARAMS = {
  [_M.TOKEN_PARAM] = "token",
  [_M.TICKET_PARAM] = "ticket",
}


-- The credentials of a request without a query string, shared by all of
-- them, so nothing may change the table.
local NO_CREDENTIALS = {}


-- Splits a query string into the parameters the machine may see and the
-- edge's credentials. Names are compared after percent-decoding, so an
-- encoded name is stripped too. Returns the kept query (nil when nothing
-- is left) and { token =, ticket = } (the first value of each), a table
-- that callers must not change.
function _M.split_query(query)
  if query == nil or query == "" then
    return query, NO_CREDENTIALS
  end
  local creds = {}
  local kept = {}
  for pair in sgmatch(query, "[^&]+") do
    local name, value = smatch(pair, "^([^=]*)=?(.*)$")
    local kind = CREDENTIAL_PARAMS[url_decode(name)]
    if kind then
      if creds[kind] == nil then
        creds[kind] = url_decode(value)
      end
    else
      kept[#kept + 1] = pair
    end
  end
  if #kept == 0 then
    return nil, creds
  end
  return concat(kept, "&"), creds
end


-- Returns the Cookie header values of a request as one list.
local function cookie_lines(req)
  local value = req:headers()["cookie"]
  if type(value) == "string" then
    return { value }
  end
  return value or {}
end


-- Returns the Cookie header for the machine: every pair of the request
-- except those named __justavps_*, in order and unchanged, or nil when
-- none is left.
function _M.filter_cookies(lines)
  local kept = {}
  for _, line in ipairs(lines) do
    for pair in sgmatch(line, "[^;]+") do
      local name = smatch(pair, "^[ \t]*([^=]-)[ \t]*=")
        or smatch(pair, "^[ \t]*(.-)[ \t]*$")
      if sfind(name, COOKIE_PREFIX, 1, true) ~= 1 then
        local trimmed = smatch(pair, "^[ \t]*(.-)[ \t]*$")
        if trimmed ~= "" then
          kept[#kept + 1] = trimmed
        end
      end
    end
  end
  if #kept == 0 then
    return nil
  end
  return concat(kept, "; ")
end


-- Returns true when an Authorization value carries a JustAVPS API key;
-- other schemes and bearer tokens belong to the user's app.
function _M.is_api_key_header(value)
  return type(value) == "string"
    and sfind(slower(value), "^[ \t]*bearer +sk_live_") ~= nil
end


local function hash_hex(text)
  return crypto.hex_encode(crypto.sha256(text))
end


-- Returns true when the share token with this hash was revoked, expired
-- or never issued for slug; or nil, message on a failed lookup.
local function is_revoked(token_hash, slug)
  local cached = state.revocations:get(token_hash)
  if cached ~= nil then
    return cached
  end
  local res, err = db.query(REVOKED_SQL, { token_hash, slug })
  if not res then
    return nil, err
  end
  local revoked = #res == 0 or res[1].revoked == true
  state.revocations:set(token_hash, revoked)
  return revoked
end


-- Verifies one proxy token for slug. Returns claims, or nil, code.
local function verify_token(token, slug)
  local claims, _, code = proxy_token.verify(token, state.conf.jwt_secret, {
    slug = slug,
    is_revoked = function()
      return is_revoked(hash_hex(token), slug)
    end,
  })
  if not claims then
    return nil, code
  end
  return claims
end


-- Looks up an API key by its hash. Returns { account_id, scopes } or
-- false for an unknown or revoked key, or nil, message on a failed lookup.
-- state.api_keys keeps each result for cache.credential_ttl seconds.
local function find_api_key(key_hash)
  local cached = state.api_keys:get(key_hash)
  if cached ~= nil then
    return cached
  end
  local res, err = db.query(API_KEY_SQL, { key_hash })
  if not res then
    return nil, err
  end
  local found = false
  if #res == 1 then
    found = { account_id = res[1].account_id,
      scopes = json.decode(res[1].scopes) or {} }
  end
  state.api_keys:set(key_hash, found)
  return found
end


-- Spends a ticket for machine. Returns true, or false, code, or nil,
-- message on a failed query. A ticket for another machine is spent too,
-- as the in-memory ticket store does.
local function spend_ticket(text, machine)
  local ticket_hash = ticket.hash(text)
  if not ticket_hash then
    return false, "invalid_ticket"
  end
  local res, err = db.query(TICKET_SQL, { ticket_hash })
  if not res then
    return nil, err
  end
  if #res == 0 then
    return false, "invalid_ticket"
  end
  if res[1].machine_id ~= machine.id then
    return false, "wrong_machine"
  end
  return true
end


local function backend_failure(what, err, req)
  log.err("credential check failed", { req_id = req.id, check = what,
    error = err })
  return nil, 503, "credential_check_failed",
    "the edge could not check the credentials; retry shortly"
end


-- Returns true when a line of the Cookie header values contains name,
-- which every line that carries the cookie does.
local function mentions(lines, name)
  for i = 1, #lines do
    if sfind(lines[i], name, 1, true) then
      return true
    end
  end
  return false
end


-- Adds verified token claims to input as the owner's cookie or a share,
-- keeping what an earlier call added.
local function add_claims(input, claims)
  if not claims then
    return
  end
  if claims.scope == proxy_token.OWNER_SCOPE then
    input.cookie = input.cookie or claims
  else
    input.share = input.share or claims
  end
end


-- Reads the tokens of the cookie and of the query into input.
local function gather_tokens(req, ctx, input)
  local slug = ctx.machine.slug
  local lines = ctx.cookie_lines or cookie_lines(req)
  -- get_cookie would report a cookie that no line mentions as missing,
  -- at the cost of parsing every line and building the message.
  local cookie, ccode
  if mentions(lines, _M.PROXY_COOKIE) then
    local _
    cookie, _, ccode = session.get_cookie(lines, _M.PROXY_COOKIE)
  end
  local from_cookie, cookie_error
  if cookie then
    from_cookie, cookie_error = verify_token(cookie, slug)
  elseif ccode == "duplicate_cookie" then
    cookie_error = ccode
  end

  local from_query, query_error
  if ctx.creds.token then
    from_query, query_error = verify_token(ctx.creds.token, slug)
  end

  if cookie_error == "revocation_check_failed"
      or query_error == "revocation_check_failed" then
    return false
  end

  add_claims(input, from_query)
  add_claims(input, from_cookie)
  if not input.cookie and not input.share then
    input.token_error = query_error or cookie_error
  end
  ctx.query_claims = from_query
  ctx.cookie_claims = from_cookie
  return true
end


-- Returns the key of a value in the common form "Bearer sk_live_..."
-- with one space and nothing around it, or nil for any other form.
-- apikey.parse returns the same key for those values, but its patterns
-- cost more than the other credential checks of a request.
local BEARER = "Bearer "
local PLAIN_BEARER_LENGTH = #BEARER + apikey.KEY_LENGTH
local KEY_CHARACTERS = "^[A-Za-z0-9_-]+$"

local function plain_bearer_key(value)
  if #value ~= PLAIN_BEARER_LENGTH or ssub(value, 1, #BEARER) ~= BEARER then
    return nil
  end
  local key = ssub(value, #BEARER + 1)
  if ssub(key, 1, #apikey.KEY_PREFIX) ~= apikey.KEY_PREFIX
      or not sfind(key, KEY_CHARACTERS, #apikey.KEY_PREFIX + 1) then
    return nil
  end
  return key
end


-- Hashes of the API keys in Authorization values that carried a
-- well-formed key, by the whole value. A value always maps to the same
-- hash, so an entry can never be stale: whether the key is valid is
-- still looked up in state.api_keys, with its TTL, on every request. The
-- map keeps at most KEY_HASHES_MAX values and is emptied when full, so that
-- values a client makes up cost memory only up to that bound.
local KEY_HASHES_MAX = 1024
local key_hashes = {}
local key_hash_count = 0


-- Returns the SHA-256 hex of the API key that the Authorization value
-- carries, false when the value has the API key form ("Bearer sk_live_")
-- but no well-formed key, or nil when it is not an API key header.
function _M.api_key_hash(authorization)
  if authorization == nil then
    return nil
  end
  local hash = key_hashes[authorization]
  if hash ~= nil then
    return hash
  end
  if not _M.is_api_key_header(authorization) then
    return nil
  end
  local key = plain_bearer_key(authorization)
  if not key then
    local _, parsed = apikey.parse(authorization)
    key = parsed
  end
  if not key then
    return false
  end
  hash = apikey.hash(key)
  if key_hash_count >= KEY_HASHES_MAX then
    key_hashes = {}
    key_hash_count = 0
  end
  key_hashes[authorization] = hash
  key_hash_count = key_hash_count + 1
  return hash
end


-- policy.classify results by host kind, method and request-target.
-- policies/edge_access.lua computes classify from those three values
-- alone, and it costs more than the rest of the credential checks for a
-- short path. Each request gets its own copy of a cached result, so a
-- policy that changes input.class cannot affect another request. The map
-- is emptied when it reaches CLASSES_MAX targets or when the policy is
-- reloaded, and targets longer than CLASS_TARGET_MAX bytes are not kept.
-- NOTE: a policy whose classify reads anything else (time, config)
-- would be served stale results here until the map is emptied.
local CLASSES_MAX = 1024
local CLASS_TARGET_MAX = 256
local classes = {}
local class_count = 0
local classes_of = nil


local function copy(t)
  local out = {}
  for k, v in next, t do
    out[k] = v
  end
  return out
end


-- Returns policy.classify(target, method, host_kind) through the map
-- above.
local function classify(target, method, host_kind)
  local classify_fn = policy.classify
  if #target > CLASS_TARGET_MAX then
    return classify_fn(target, method, host_kind)
  end
  if classes_of ~= classify_fn or class_count >= CLASSES_MAX then
    classes = {}
    class_count = 0
    classes_of = classify_fn
  end
  local by_method = classes[host_kind]
  if by_method == nil then
    by_method = {}
    classes[host_kind] = by_method
  end
  local by_target = by_method[method]
  if by_target == nil then
    by_target = {}
    by_method[method] = by_target
  end
  local class = by_target[target]
  if class == nil then
    class = classify_fn(target, method, host_kind)
    by_target[target] = copy(class)
    class_count = class_count + 1
    return class
  end
  return copy(class)
end


-- Fields of a policy input: 8 from ctx, class, api_key or api_key_error,
-- cookie, share, token_error, ticket and ticket_error.
local INPUT_FIELDS = 15


-- Builds the policy input for one request and asks the policy. ctx:
-- host (from hosts.parse), machine (from lookup), target (what the
-- daemon receives), method, creds (from split_query), scheme,
-- is_websocket, origin (the Origin header or nil), cookie_lines (the
-- Cookie header values) and api_key_hash (api_key_hash of the
-- Authorization value).
-- Returns the decision, or nil, status, code, message when a database
-- check failed. Sets ctx.query_claims and ctx.cookie_claims.
function _M.evaluate(req, ctx)
  -- Sized for every field below and in gather_tokens, so that it never
  -- grows.
  local input = tnew(0, INPUT_FIELDS)
  input.target = ctx.target
  input.method = ctx.method
  input.host_kind = ctx.host.kind
  input.port = ctx.host.port
  input.host = ctx.host.host
  input.scheme = ctx.scheme
  input.origin = ctx.origin
  input.is_websocket = ctx.is_websocket
  input.class = classify(input.target, input.method, input.host_kind)

  local key_hash = ctx.api_key_hash
  if key_hash ~= nil then
    if not key_hash then
      input.api_key_error = "invalid_api_key"
    else
      local found, err = find_api_key(key_hash)
      if found == nil then
        return backend_failure("api_key", err, req)
      end
      if found and found.account_id == ctx.machine.account_id then
        input.api_key = found
      else
        input.api_key_error = "invalid_api_key"
      end
    end
  end

  if not gather_tokens(req, ctx, input) then
    return backend_failure("share_token", "revocation lookup failed", req)
  end

  if ctx.creds.ticket and policy.needs_ticket(input) then
    local ok, code = spend_ticket(ctx.creds.ticket, ctx.machine)
    if ok == nil then
      return backend_failure("ticket", code, req)
    end
    input.ticket = ok or nil
    if not ok then
      input.ticket_error = code
    end
  end

  return policy.decide(input)
end


return _M
