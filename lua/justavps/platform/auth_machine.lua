-- The "machine" auth kind: a heartbeat is signed with the machine's token
-- (HMAC-SHA256 over method, target, timestamp, nonce and body hash), so
-- the platform looks the machine up by slug and verifies with its token.
local db = require("justavps.db.db")
local machine_sig = require("justavps.machine_sig")
local log = require("justavps.log")
local state = require("justavps.platform.state")

return function(ctx)
  local slug = ctx.params.slug
  local machine, err, code = db.one(
    "SELECT id, slug, stage, token FROM machines "
      .. "WHERE slug = $1 AND deleted_at IS NULL", { slug })
  if not machine then
    if code == "not_found" then
      -- The same response as a bad signature: a caller without the token
      -- learns nothing about which slugs exist.
      log.warn("heartbeat for an unknown machine", { slug = slug })
      return false, 401, "unknown_machine", "unknown machine or bad signature"
    end
    if code == "database_unavailable" then
      return false, 503, "database_unavailable",
        "the database is unavailable; retry later"
    end
    log.err("machine lookup failed", { slug = slug, error = err })
    return false, 500, "internal", "internal server error"
  end

  local req = ctx.req
  local ok, verr, vcode = machine_sig.verify(machine.token, {
    method = req.method,
    target = req.target,
    header = function(_, name)
      return req:header(name)
    end,
  }, ctx.raw_body or "", state.heartbeat_nonces)
  if not ok then
    log.warn("rejected a machine-signed call", { slug = slug, code = vcode,
      reason = verr })
    return false, machine_sig.STATUS[vcode] or 401, vcode, verr
  end

  machine.token = nil
  ctx.machine = machine
  return true
end
