-- Daemon releases: POST /api/v1/releases publishes one (an API key or
-- session with the "write" scope, of an operator listed in
-- releases.operators) and GET /api/v1/releases lists them, newest first.
-- Heartbeats offer the newest release whose rollout includes the machine.
local log = require("justavps.log")
local json = require("justavps.json")
local db = require("justavps.db.db")
local api_mod = require("justavps.platform.api")
local state = require("justavps.platform.state")
local releases = require("justavps.platform.releases")
local rollout = require("policies.rollout")

local ipairs = ipairs
local tonumber = tonumber
local slower = string.lower
local smatch = string.match

-- Longest release URL accepted.
local MAX_URL = 2048


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


-- Returns true when the authenticated user's account id or email is in
-- releases.operators. Emails compare without case.
local function is_operator(user)
  for _, entry in ipairs(state.conf.releases.operators) do
    if entry == user.account_id then
      return true
    end
    if user.email and slower(entry) == slower(user.email) then
      return true
    end
  end
  return false
end


-- Returns nil when the body is a valid release, else the message of the
-- first invalid field.
local function check_release(body)
  if not releases.is_version(body.version) then
    return "version: must be MAJOR.MINOR.PATCH with an optional "
      .. "-pre-release or +build suffix, such as 1.4.0 or 1.5.0-rc.1"
  end
  local url = body.url
  if #url > MAX_URL or not smatch(url, "^https?://[^%s/]+[^%s]*$") then
    return "url: must be an http:// or https:// URL without spaces, "
      .. "at most " .. MAX_URL .. " characters"
  end
  if not smatch(body.sha256, "^" .. ("%x"):rep(64) .. "$") then
    return "sha256: must be the 64 hex digits of the file's SHA-256"
  end
  return rollout.check(body.rollout)
end


local function create(ctx)
  if not is_operator(ctx.user) then
    return api_mod.error(403, "forbidden", "only operators may publish "
      .. "releases; an operator adds the account id or email to "
      .. "releases.operators")
  end

  local body = ctx.body
  local problem = check_release(body)
  if problem then
    return api_mod.error(400, "invalid_request", problem)
  end

  -- A plain copy of the validated (read-only) record, for json.encode.
  local plan = { all = body.rollout.all, percent = body.rollout.percent }
  if body.rollout.slugs then
    plan.slugs = json.array()
    for i, slug in ipairs(body.rollout.slugs) do
      plan.slugs[i] = slug
    end
  end

  local row, err, code = releases.create({
    version = body.version,
    url = body.url,
    sha256 = slower(body.sha256),
    rollout = plan,
    created_by = ctx.user.id,
  })
  if not row then
    if code == db.sqlstate.unique_violation then
      return api_mod.error(409, "conflict", "release " .. body.version
        .. " exists already; publish a new version")
    end
    return database_error("release creation", err, code)
  end
  log.info("release published", { version = row.version,
    account_id = ctx.user.account_id, rollout = json.encode(row.rollout) })
  return 201, releases.public(row)
end


local function list(ctx)
  local limit = tonumber(ctx.query and ctx.query.limit) or releases.MAX_LIST
  if limit < 1 or limit > releases.MAX_LIST or limit % 1 ~= 0 then
    return api_mod.error(400, "invalid_request", "limit must be an "
      .. "integer from 1 to " .. releases.MAX_LIST)
  end
  local rows, err, code = releases.list(limit)
  if not rows then
    return database_error("release listing", err, code)
  end
  local out = json.array()
  for i, row in ipairs(rows) do
    out[i] = releases.public(row)
  end
  return 200, { releases = out }
end


return function(api)
  api:route({
    method = "POST", path = "/api/v1/releases", name = "create_release",
    auth = "user", scope = "write", status = 201,
    summary = "Publish a daemon release (operators only)",
    body = { fields = {
      { version = { type = "string", required = true, len_max = 100,
        description = "MAJOR.MINOR.PATCH[-pre|+build]" } },
      { url = { type = "string", required = true,
        description = "http or https URL of the daemon binary" } },
      { sha256 = { type = "string", required = true,
        description = "hex SHA-256 of the binary (64 digits)" } },
      { rollout = { type = "record", required = true,
        description = "which machines get the release: exactly one of "
          .. "all, percent or slugs", fields = {
          { all = { type = "boolean",
            description = "true offers the release to every machine" } },
          { percent = { type = "number", between = { 0, 100 },
            description = "share of machines, chosen by a stable hash "
              .. "of slug and version" } },
          { slugs = { type = "array", len_max = 10000,
            elements = { type = "string" },
            description = "slugs of the machines that get it" } },
        } } },
    } },
    handler = create,
  })

  api:route({
    method = "GET", path = "/api/v1/releases", name = "list_releases",
    auth = "user", scope = "read",
    summary = "List daemon releases, newest first",
    handler = list,
  })
end
