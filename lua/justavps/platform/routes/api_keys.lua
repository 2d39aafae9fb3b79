-- API keys of the caller's account: GET /api/v1/api-keys (a page of
-- unrevoked keys, newest first), POST /api/v1/api-keys (create; the key
-- is in this response only) and DELETE /api/v1/api-keys/{id} (revoke).
-- Listings show the stored prefix, never the key or its hash.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local apikey = require("justavps.auth.apikey")
local api_mod = require("justavps.platform.api")
local accounts = require("justavps.platform.accounts")
local auth_user = require("justavps.platform.auth_user")

local crypto = core.crypto

local ipairs = ipairs
local tonumber = tonumber
local char = string.char
local smatch = string.match
local sgsub = string.gsub
local sgmatch = string.gmatch
local ssub = string.sub
local sfind = string.find

local DEFAULT_LIMIT = 50
local MAX_LIMIT = 100

-- Attempts at a fresh key when its prefix exists already. With 48 random
-- bits in the prefix a second collision in a row is not expected.
local CREATE_ATTEMPTS = 3

local UUID_PATTERN = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-"
  .. "%x%x%x%x%x%x%x%x%x%x%x%x$"

-- created_at as accounts renders it: UTC with microseconds.
local TIME_PATTERN = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$"


local function no_store(status, value)
  return status, { ["Content-Type"] = "application/json",
    ["Cache-Control"] = "no-store" }, json.encode(value) .. "\n"
end


local function database_error(what, err, code)
  if code == "database_unavailable" or code == "timeout" then
    log.err(what .. " failed: database unavailable", { error = err,
      code = code })
    return api_mod.error(503, "database_unavailable",
      "the database is unavailable; retry later")
  end
  log.err(what .. " failed", { error = err, code = code })
  return api_mod.error(500, "internal", "internal server error")
end


local function percent_decode(s)
  s = sgsub(s, "+", " ")
  return (sgsub(s, "%%(%x%x)", function(hex)
    return char(tonumber(hex, 16))
  end))
end


local function parse_query(query)
  local out = {}
  for pair in sgmatch(query or "", "[^&]+") do
    local name, value = smatch(pair, "^([^=]*)=?(.*)$")
    name = percent_decode(name)
    if out[name] == nil then
      out[name] = percent_decode(value)
    end
  end
  return out
end


-- The cursor is the base64url text of "created_at id" of the last key
-- on the previous page. Returns created_at, id or nil.
local function decode_cursor(text)
  local raw = crypto.base64url_decode(text)
  if not raw then
    return nil
  end
  local created_at, id = smatch(raw, "^(%S+) (%S+)$")
  if not created_at or not sfind(created_at, TIME_PATTERN)
      or not sfind(id, UUID_PATTERN) then
    return nil
  end
  return created_at, id
end


local function encode_cursor(row)
  return crypto.base64url_encode(row.created_at .. " " .. row.id)
end


local function list(ctx)
  local query = parse_query(ctx.query)
  local limit = DEFAULT_LIMIT
  if query.limit then
    limit = tonumber(query.limit)
    if not limit or limit % 1 ~= 0 or limit < 1 or limit > MAX_LIMIT then
      return api_mod.error(400, "invalid_request", "limit: expected an "
        .. "integer from 1 to " .. MAX_LIMIT)
    end
  end
  local after_created_at, after_id
  if query.cursor then
    after_created_at, after_id = decode_cursor(query.cursor)
    if not after_created_at then
      return api_mod.error(400, "invalid_cursor", "cursor: not a cursor "
        .. "from next_cursor of an earlier page")
    end
  end

  -- One row more than the page shows whether another page follows.
  local rows, err, code = accounts.list_api_keys(ctx.user.account_id,
    limit + 1, after_created_at, after_id)
  if not rows then
    return database_error("API key listing", err, code)
  end
  local next_cursor = json.null
  if #rows > limit then
    rows[#rows] = nil
    next_cursor = encode_cursor(rows[#rows])
  end
  return 200, { api_keys = rows, next_cursor = next_cursor }
end


local function create(ctx)
  local scopes, serr, scode = apikey.validate_scopes(ctx.body.scopes)
  if not scopes then
    return api_mod.error(400, scode, "scopes: " .. serr)
  end
  -- A key creates keys with its own scopes at most, so it cannot mint
  -- a key stronger than itself.
  for _, scope in ipairs(scopes) do
    if not auth_user.has_scope(ctx, scope) then
      return api_mod.error(403, "insufficient_scope", "this API key lacks "
        .. "the \"" .. scope .. "\" scope, so it cannot grant it")
    end
  end

  local row, new, err, code
  for _ = 1, CREATE_ATTEMPTS do
    new, err, code = apikey.generate()
    if not new then
      return database_error("API key generation", err, code)
    end
    new.prefix = ssub(new.key, 1, auth_user.KEY_PREFIX_LENGTH)
    row, err, code = accounts.create_api_key({
      account_id = ctx.user.account_id, created_by = ctx.user.id,
      name = ctx.body.name, prefix = new.prefix, hash = new.hash,
      scopes = scopes })
    if row or code ~= "23505" then
      break
    end
    log.warn("API key prefix collided; generating another key", {
      prefix = new.prefix })
  end
  if not row then
    return database_error("API key insert", err, code)
  end

  log.info("API key created", { key_id = row.id, prefix = row.prefix,
    account_id = ctx.user.account_id, user_id = ctx.user.id })
  return no_store(201, { id = row.id, key = new.key, prefix = row.prefix,
    name = row.name, scopes = row.scopes, created_at = row.created_at })
end


local function revoke(ctx)
  local id = ctx.params.id
  if not sfind(id, UUID_PATTERN) then
    return api_mod.error(404, "not_found", "no API key " .. ssub(id, 1, 40))
  end
  local revoked, err, code = accounts.revoke_api_key(ctx.user.account_id,
    id)
  if revoked == nil then
    return database_error("API key revoke", err, code)
  end
  if not revoked then
    -- Keys of other accounts get the same 404 as missing ones.
    return api_mod.error(404, "not_found", "no API key " .. id)
  end
  log.info("API key revoked", { key_id = id,
    account_id = ctx.user.account_id, user_id = ctx.user.id })
  return 204, { ["Cache-Control"] = "no-store" }, ""
end


return function(api)
  api:route({
    method = "GET", path = "/api/v1/api-keys", name = "list_api_keys",
    auth = "user", scope = "read",
    summary = "The account's API keys, newest first (?limit=1..100, "
      .. "?cursor=next_cursor)",
    handler = list,
  })

  api:route({
    method = "POST", path = "/api/v1/api-keys", name = "create_api_key",
    auth = "user", scope = "write", status = 201, max_body = 4096,
    summary = "Create an API key; the key is in this response only",
    body = { fields = {
      { name = { type = "string", required = true, len_min = 1,
        len_max = 100, description = "a label for the key" } },
      { scopes = { type = "array", required = true, len_min = 1,
        elements = { type = "string", one_of = apikey.SCOPES },
        description = "what the key may do" } },
    } },
    handler = create,
  })

  api:route({
    method = "DELETE", path = "/api/v1/api-keys/{id}",
    name = "revoke_api_key", auth = "user", scope = "delete", status = 204,
    summary = "Revoke an API key of the account",
    handler = revoke,
  })
end
