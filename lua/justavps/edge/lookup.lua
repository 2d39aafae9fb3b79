-- Machine lookup for the edge: a machine's address, stage and account by
-- slug, from the platform database through a short TTL cache. A
-- connection that LISTENs on machine_events drops a slug's entry as soon
-- as an event for it commits, so a stage change or a deletion is seen
-- before the TTL runs out. Unknown slugs are cached too, so a flood of
-- made-up host names costs one query per name and TTL.
local core = require("justavps.core")
local db = require("justavps.db.db")
local json = require("justavps.json")
local log = require("justavps.log")
local state = require("justavps.edge.state")

local type = type
local tostring = tostring
local min = math.min

local _M = {}

_M.CHANNEL = "machine_events"

-- Stages in which the daemon answers; provisioning stages get 503 with
-- Retry-After, and the rest are listed in status().
local PROVISIONING = {
  server_creating = true,
  server_created = true,
  cloud_init_running = true,
  cloud_init_done = true,
}

local MACHINE_SQL = "SELECT id, slug, stage, host(ip) AS ip, account_id, "
  .. "deleted_at IS NOT NULL AS deleted FROM machines WHERE slug = $1"


-- Returns the machine row for slug ({ id, slug, stage, ip, account_id,
-- deleted }), or nil, message, code where code is "not_found" or a
-- database error code.
function _M.machine(slug)
  local cached = state.machines:get(slug)
  if cached ~= nil then
    if cached == false then
      return nil, "no machine " .. slug, "not_found"
    end
    return cached
  end

  local row, err, code = db.one(MACHINE_SQL, { slug })
  if not row then
    if code == "not_found" then
      state.machines:set(slug, false)
      return nil, "no machine " .. slug, "not_found"
    end
    return nil, err, code
  end
  if row.ip == db.null then
    row.ip = nil
  end
  state.machines:set(slug, row)
  return row
end


-- Classifies a machine row. Returns "ready", "provisioning", "failed" or
-- "gone" (deleting, deleted, or a row marked deleted), and for "ready" a
-- machine without an address returns "unavailable".
function _M.status(row)
  if row.deleted == true or row.stage == "deleting"
      or row.stage == "deleted" then
    return "gone"
  end
  if PROVISIONING[row.stage] then
    return "provisioning"
  end
  if row.stage == "failed" then
    return "failed"
  end
  if row.stage == "services_ready" then
    if not row.ip then
      return "unavailable"
    end
    return "ready"
  end
  return "unavailable"
end


-- Handles one notification payload: {"id", "slug", "stage"}.
local function on_notification(payload)
  local event = json.decode(payload)
  -- The HTTP server's cached decisions (req:pass_learn_edge) name the
  -- machine's address, so they go with any change.
  core.http.pass_reset()
  if type(event) == "table" and type(event.slug) == "string" then
    state.machines:delete(event.slug)
    return
  end
  -- A payload the edge cannot read may concern any machine.
  log.warn("unreadable machine_events payload; dropping the machine cache",
    { bytes = #tostring(payload) })
  state.machines:clear()
end


-- Runs LISTEN machine_events until stop() is called, reconnecting with a
-- growing delay (1 s doubling to 30 s) after a failure. Notifications
-- sent while no connection listened are lost, so the machine cache is
-- emptied after each (re)connect.
function _M.start_listener()
  local stopped = false
  local conn
  local database = state.conf.database

  core.spawn(function()
    local delay = 1
    while not stopped do
      local c, err, code = core.pg.connect(database.url,
        { timeout = database.connect_timeout })
      if c and not stopped then
        conn = c
        local ok, lerr, lcode = c:listen(_M.CHANNEL)
        if ok then
          state.machines:clear()
          core.http.pass_reset()
          log.info("listening for machine events",
            { channel = _M.CHANNEL })
          delay = 1
          while not stopped do
            local channel, payload, wcode = c:wait_notification()
            if not channel then
              err, code = payload, wcode
              break
            end
            on_notification(payload)
          end
        else
          err, code = lerr, lcode
        end
        c:close()
        conn = nil
      elseif c then
        c:close()
      end
      if stopped then
        break
      end
      log.warn("machine event listener failed; retrying",
        { error = err, code = code, retry_in = delay })
      core.sleep(delay)
      delay = min(delay * 2, 30)
    end
  end)

  return {
    stop = function()
      stopped = true
      if conn then
        conn:close()
      end
    end,
  }
end


return _M
