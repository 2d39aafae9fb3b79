-- The "machine" auth kind: a heartbeat is signed with the machine's token
-- (HMAC-SHA256 over method, target, timestamp, nonce and body hash), so
-- the platform looks the machine up by slug and verifies with its token.
-- The lookup usually comes from the cache of machines.heartbeat_identity.
local machines = require("justavps.platform.machines")
local machine_sig = require("justavps.machine_sig")
local log = require("justavps.log")
local state = require("justavps.platform.state")


local function lookup_failed(slug, err, code)
  if code == "not_found" then
    -- The same response as a bad signature: a caller without the token
    -- learns nothing about which slugs exist.
    log.warn("heartbeat for an unknown machine", { slug = slug })
    return false, 401, "unknown_machine", "unknown machine or bad signature"
  end
  if code == "database_unavailable" or code == "timeout" then
    return false, 503, "database_unavailable",
      "the database is unavailable; retry later"
  end
  log.err("machine lookup failed", { slug = slug, error = err, code = code })
  return false, 500, "internal", "internal server error"
end


return function(ctx)
  local slug = ctx.params.slug
  local machine, err, code = machines.heartbeat_identity(slug)
  if not machine then
    return lookup_failed(slug, err, code)
  end

  -- The core.http request has the method, target and header(name) that
  -- verify reads.
  local req = ctx.req
  local body = ctx.raw_body or ""
  local ok, verr, vcode = machine_sig.verify(machine.token, req, body,
    state.heartbeat_nonces)
  if not ok and vcode == "bad_signature" and machine.cached then
    -- The cached token may be older than the row, so check once more
    -- with the token read now. verify records the nonce only after a
    -- signature matches, so the nonce is still unused here.
    machine, err, code = machines.heartbeat_identity(slug, { fresh = true })
    if not machine then
      return lookup_failed(slug, err, code)
    end
    ok, verr, vcode = machine_sig.verify(machine.token, req, body,
      state.heartbeat_nonces)
  end
  if not ok then
    log.warn("rejected a machine-signed call", { slug = slug, code = vcode,
      reason = verr })
    return false, machine_sig.STATUS[vcode] or 401, vcode, verr
  end

  machine.token = nil
  machine.cached = nil
  ctx.machine = machine
  return true
end
