-- A machine's stage history: GET .../events lists it, and GET
-- .../events/stream sends it as Server-Sent Events, history first, then
-- live events from this process's events hub.
--
-- Each frame is "id: <event id>" and "data: <JSON event>". A client that
-- reconnects with Last-Event-ID gets exactly the events after that id:
-- the stream subscribes to the hub before it reads the history, and then
-- skips live events whose id it has already sent. Event ids of one
-- machine grow in commit order (see the machine_events trigger), so
-- "id above the last one sent" loses nothing.
local json = require("justavps.json")
local log = require("justavps.log")
local api_mod = require("justavps.platform.api")
local machines = require("justavps.platform.machines")
local state = require("justavps.platform.state")
local events_hub = require("justavps.platform.events_hub")
local shared = require("justavps.platform.routes.machines")

local type = type
local pcall = pcall
local tostring = tostring
local concat = table.concat

-- Largest event id accepted in Last-Event-ID and ?after: ids are bigint,
-- and Lua numbers are exact up to 2^53.
local MAX_EVENT_ID = 2 ^ 53

local SSE_HEADERS = {
  ["Content-Type"] = "text/event-stream",
  ["Cache-Control"] = "no-cache",
  -- Keeps a buffering reverse proxy (nginx) from holding frames back.
  ["X-Accel-Buffering"] = "no",
}


local function read_after(ctx, query)
  local header = ctx.req:header("last-event-id")
  local text, source = query.after, "after"
  if header ~= nil and header ~= "" then
    -- A header sent twice arrives as a list, which parse_count rejects.
    text, source = header, "Last-Event-ID"
  end
  if text == nil then
    return 0
  end
  local id = shared.parse_count(text, MAX_EVENT_ID)
  if not id then
    return nil, api_mod.error(400, "invalid_request",
      source .. " must be an event id (a decimal integer)")
  end
  return id
end


local function list(ctx)
  local machine, s, h, b = shared.load_machine(ctx)
  if not machine then
    return s, h, b
  end
  local query = shared.parse_query(ctx.query)
  local after, as, ah, ab = read_after(ctx, query)
  if not after then
    return as, ah, ab
  end
  local limit
  if query.limit ~= nil then
    limit = shared.parse_count(query.limit, machines.MAX_EVENTS_PAGE)
    if not limit or limit < 1 then
      return api_mod.error(400, "invalid_request", "limit must be an "
        .. "integer from 1 to " .. machines.MAX_EVENTS_PAGE)
    end
  end
  local rows, err, code = machines.events(machine.id, after, limit)
  if not rows then
    return shared.db_failure("event list", err, code, { slug = machine.slug })
  end
  return 200, { items = rows }
end


local function frame(event)
  return concat({ "id: ", tostring(event.id), "\ndata: ",
    json.encode(event), "\n\n" })
end


-- Writes the events of machine after last_id from the database. Returns
-- the new last id and whether it wrote a "deleted" event, or nil,
-- message, code when a write or query failed.
local function replay(req, machine, last_id)
  while true do
    local rows, err, code = machines.events(machine.id, last_id,
      machines.MAX_EVENTS_PAGE)
    if not rows then
      return nil, err, code
    end
    for i = 1, #rows do
      local event = rows[i]
      event.slug = machine.slug
      local ok, werr, wcode = req:write(frame(event))
      if not ok then
        return nil, werr, wcode
      end
      last_id = event.id
      if event.stage == "deleted" then
        return last_id, true
      end
    end
    if #rows < machines.MAX_EVENTS_PAGE then
      return last_id, false
    end
  end
end


-- Streams until the client goes, the hub closes, a query fails or the
-- machine reaches stage deleted. Returns why it ended.
local function stream(req, sub, machine, last_id, ping_interval)
  local err, code
  -- The deleted event can arrive through a replay as well as live: an
  -- insert that commits before the replay query is read there.
  last_id, err, code = replay(req, machine, last_id)
  if not last_id then
    return err, code
  end
  if err == true then
    return "machine deleted", "deleted"
  end

  while true do
    local item, why = sub:next(ping_interval)
    if item == events_hub.RESYNC then
      last_id, err, code = replay(req, machine, last_id)
      if not last_id then
        return err, code
      end
      if err == true then
        return "machine deleted", "deleted"
      end
    elseif type(item) == "table" then
      if item.id > last_id then
        local ok, werr, wcode = req:write(frame(item))
        if not ok then
          return werr, wcode
        end
        last_id = item.id
        if item.stage == "deleted" then
          return "machine deleted", "deleted"
        end
      end
    elseif why == "timeout" then
      local ok, werr, wcode = req:write(": ping\n\n")
      if not ok then
        return werr, wcode
      end
    else
      return "event hub closed", "closed"
    end
  end
end


local function stream_handler(ctx)
  local machine, s, h, b = shared.load_machine(ctx)
  if not machine then
    return s, h, b
  end
  local last_id, as, ah, ab = read_after(ctx, shared.parse_query(ctx.query))
  if not last_id then
    return as, ah, ab
  end

  local req = ctx.req
  local ping_interval = state.conf.events.ping_interval
  -- Subscribe before the history is read, so that no event committed in
  -- between is lost.
  local sub = events_hub.get():subscribe(machine.slug)
  local sent, serr = req:send_head(200, SSE_HEADERS)
  if not sent then
    sub:close()
    log.info("event stream ended before it started", { slug = machine.slug,
      error = serr })
    return 200
  end

  local ok, why, code = pcall(stream, req, sub, machine, last_id,
    ping_interval)
  sub:close()
  if not ok then
    log.err("event stream failed", { slug = machine.slug, error = why })
  elseif code ~= "closed" and code ~= "deleted" and code ~= "EPIPE"
      and code ~= "ECONNRESET" then
    log.warn("event stream ended", { slug = machine.slug, error = why,
      code = code })
  end
  -- The response may already be over (the client closed the connection),
  -- so finishing it may fail, and that is fine.
  pcall(req.finish, req)
  return 200
end


return function(api)
  api:route({
    method = "GET", path = "/api/v1/machines/{slug}/events",
    name = "listMachineEvents", auth = "user", scope = "read",
    summary = "Stage history in id order; ?after (event id), ?limit",
    handler = list,
  })

  api:route({
    method = "GET", path = "/api/v1/machines/{slug}/events/stream",
    name = "streamMachineEvents", auth = "user", scope = "read",
    response = "text/event-stream of the stage history, then live events",
    summary = "Server-Sent Events of the stages; resumes after "
      .. "Last-Event-ID",
    handler = stream_handler,
  })
end
