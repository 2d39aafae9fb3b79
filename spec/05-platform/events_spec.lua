-- Machine events against a fresh, migrated database: the history list,
-- the SSE stream fed by the LISTEN hub (events inserted by another
-- connection, resume with Last-Event-ID, keep-alive comments, the end of
-- a stream), and two platform processes that both stream one event.
-- Events are inserted straight into machine_events, so the table's
-- trigger sends the NOTIFY as it does for every writer.
local core = require("justavps.core")
local json = require("justavps.json")
local config = require("justavps.config")
local helpers = require("support.helpers")
local db = require("justavps.db.db")
local platform_config = require("justavps.platform.config")
local state = require("justavps.platform.state")
local events_hub = require("justavps.platform.events_hub")
local apikey = require("justavps.auth.apikey")

local async = helpers.async

local platform = require("support.platform")
local settings = require("support.pg").settings()


-- Parses SSE text into frames { id =, data = } and a count of comments.
local function parse_sse(text)
  local frames, comments = {}, 0
  for block in text:gmatch("(.-)\n\n") do
    local frame = {}
    for line in (block .. "\n"):gmatch("(.-)\n") do
      if line:sub(1, 1) == ":" then
        comments = comments + 1
      else
        local name, value = line:match("^(%a+): ?(.*)$")
        if name == "id" then
          frame.id = tonumber(value)
        elseif name == "data" then
          frame.data = json.decode(value)
        end
      end
    end
    if frame.id then
      frames[#frames + 1] = frame
    end
  end
  return frames, comments
end


local function ids_of(frames)
  local out = {}
  for i, frame in ipairs(frames) do
    out[i] = frame.id
  end
  return out
end


-- A request object for the stream handler that keeps what is written and
-- fails writes once closed, as a request whose client went away does.
local function fake_req(headers)
  local req = { text = "", closed = false, waiter = core.waiter(),
    headers = headers or {} }
  function req.header(self, name)
    return self.headers[name:lower()]
  end
  function req.send_head(self, status, head)
    self.status, self.head = status, head
    return true
  end
  function req.write(self, data)
    if self.closed then
      return nil, "connection closed", "closed"
    end
    self.text = self.text .. data
    self.waiter:wake()
    return true
  end
  function req.finish(self)
    self.finished = true
    return true
  end
  return req
end


-- Waits until check(text) is true for what req received.
local function wait_for(req, check, timeout)
  local deadline = core.now() + (timeout or 10)
  while not check(req.text) do
    local remaining = deadline - core.now()
    assert(remaining > 0, "timed out; received:\n" .. req.text)
    req.waiter:wait(remaining)
  end
end


local function has_frames(n)
  return function(text)
    return #parse_sse(text) >= n
  end
end


describe("machine events", function()
  local database, conninfo, account, user, machine_id
  local routes = {}
  local writer

  -- Inserts an event from a connection of its own; returns its id.
  local function insert_event(stage, id_of_machine)
    local res = assert(writer:query("INSERT INTO machine_events "
      .. "(machine_id, stage) VALUES ($1, $2) RETURNING id",
      { id_of_machine or machine_id, stage }))
    return res[1].id
  end

  setup(function()
    helpers.run(function()
      database = platform.database()
      conninfo = string.format("host=%s port=%s user=%s dbname=%s",
        settings.PGHOST, settings.PGPORT, settings.PGUSER, database.name)
      state.set_config(assert(config.validate(platform_config.schema, {
        database = { url = conninfo },
        events = { ping_interval = 1 },
      })))
      db.setup(state.conf.database)
      writer = database:connect()

      account = assert(db.one("INSERT INTO accounts (name) VALUES ('ev') "
        .. "RETURNING id")).id
      user = { id = assert(db.one("INSERT INTO users (account_id, email) "
        .. "VALUES ($1, 'ev@example.test') RETURNING id", { account })).id,
        account_id = account, email = "ev@example.test" }
      machine_id = assert(db.one("INSERT INTO machines (slug, account_id, "
        .. "name, provider, region, server_type, token) VALUES ('ev-1', $1, "
        .. "'ev', 'local', 'local', 'local', $2) RETURNING id",
        { account, string.rep("t", 48) })).id
      insert_event("server_creating")

      -- Collect the handlers from the route table.
      local fake_api = { route = function(_, spec)
        routes[spec.name] = spec.handler
      end }
      require("justavps.platform.routes.events")(fake_api)
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      events_hub.get():close()
      writer:close()
      db.close()
      database:drop()
    end, 60)
  end)

  -- Starts the stream handler in a coroutine; returns req and a waiter
  -- woken with the handler's status when it returns.
  local function open_stream(headers, slug)
    local req = fake_req(headers)
    local done = core.waiter()
    local result = {}
    core.spawn(function()
      result.status = routes.streamMachineEvents({ req = req, user = user,
        params = { slug = slug or "ev-1" }, query = nil })
      result.done = true
      done:wake()
    end)
    return req, function()
      req.closed = true
      if not result.done then
        done:wait(10)
      end
      return result.status
    end
  end

  it("lists the history in id order", async(function()
    local status, body = routes.listMachineEvents({ user = user,
      params = { slug = "ev-1" }, req = fake_req() })
    assert.equal(200, status)
    assert.is_true(#body.items >= 1)
    assert.equal("server_creating", body.items[1].stage)
    for i = 2, #body.items do
      assert.is_true(body.items[i].id > body.items[i - 1].id)
    end
  end))

  it("answers 404 for another account's stream", async(function()
    local stranger = { id = user.id, account_id =
      "00000000-0000-4000-8000-000000000000" }
    local status = routes.streamMachineEvents({ req = fake_req(),
      user = stranger, params = { slug = "ev-1" } })
    assert.equal(404, status)
  end))

  it("rejects a malformed Last-Event-ID", async(function()
    local status, _, body = routes.streamMachineEvents({ user = user,
      req = fake_req({ ["last-event-id"] = "abc" }),
      params = { slug = "ev-1" } })
    assert.equal(400, status)
    assert.truthy(body:find("Last-Event-ID must be", 1, true), body)
  end))

  it("names ?after when it is malformed", async(function()
    local status, _, body = routes.listMachineEvents({ user = user,
      req = fake_req(), query = "after=abc", params = { slug = "ev-1" } })
    assert.equal(400, status)
    assert.truthy(body:find("after must be", 1, true), body)
    assert.falsy(body:find("Last-Event-ID", 1, true), body)
  end))

  it("streams history, then an event from another connection",
    async(function()
      local history = #assert(db.rows("SELECT id FROM machine_events "
        .. "WHERE machine_id = $1", { machine_id }))
      local req, stop = open_stream()
      wait_for(req, has_frames(history))
      assert.equal(200, req.status)
      assert.equal("text/event-stream", req.head["Content-Type"])

      local id = insert_event("server_created")
      wait_for(req, has_frames(history + 1))
      local frames = parse_sse(req.text)
      local last = frames[#frames]
      assert.equal(id, last.id)
      assert.equal("server_created", last.data.stage)
      assert.equal("ev-1", last.data.slug)
      assert.equal(200, stop())
      assert.is_true(req.finished)
      assert.equal(0, events_hub.get():subscribers())
    end, 20))

  it("resumes after Last-Event-ID without gap or duplicate",
    async(function()
      local first = insert_event("cloud_init_running")
      local missed = { insert_event("cloud_init_done"),
        insert_event("services_ready") }
      local req, stop = open_stream({ ["last-event-id"] = tostring(first) })
      wait_for(req, has_frames(2))
      local live = insert_event("failed")
      wait_for(req, has_frames(3))
      assert.same({ missed[1], missed[2], live }, ids_of(parse_sse(req.text)))
      stop()
    end, 20))

  it("sends keep-alive comments", async(function()
    local after = insert_event("deleting")
    local req, stop = open_stream({ ["last-event-id"] = tostring(after) })
    wait_for(req, function(text)
      return text:find(": ping\n\n", 1, true) ~= nil
    end)
    assert.equal(0, #parse_sse(req.text))
    stop()
  end, 20))

  it("fans one event out to every subscriber", async(function()
    local other = assert(db.one("INSERT INTO machines (slug, account_id, "
      .. "name, provider, region, server_type, token) VALUES ('ev-2', $1, "
      .. "'ev', 'local', 'local', 'local', $2) RETURNING id",
      { account, string.rep("u", 48) })).id
    local a, stop_a = open_stream(nil, "ev-2")
    local b, stop_b = open_stream(nil, "ev-2")
    local id = insert_event("server_creating", other)
    wait_for(a, has_frames(1))
    wait_for(b, has_frames(1))
    assert.same({ id }, ids_of(parse_sse(a.text)))
    assert.same({ id }, ids_of(parse_sse(b.text)))
    stop_a()
    stop_b()
  end, 20))

  it("ends the stream after stage deleted", async(function()
    local other = assert(db.one("INSERT INTO machines (slug, account_id, "
      .. "name, provider, region, server_type, token) VALUES ('ev-3', $1, "
      .. "'ev', 'local', 'local', 'local', $2) RETURNING id",
      { account, string.rep("v", 48) })).id
    local req = fake_req()
    local done = core.waiter()
    local finished = false
    core.spawn(function()
      routes.streamMachineEvents({ req = req, user = user,
        params = { slug = "ev-3" } })
      finished = true
      done:wake(true)
    end)
    insert_event("deleted", other)
    -- A wake with nobody waiting is dropped, and the stream may end while
    -- the insert is still being acknowledged, so check the flag first.
    if not finished then
      assert.is_true(done:wait(10))
    end
    assert.is_true(finished)
    assert.is_true(req.finished)
    assert.equal(1, #parse_sse(req.text))
  end, 20))

  describe("over HTTP", function()
    local procs, ports, key = {}, {}, nil

    local function start_platform()
      local p = platform.start(database, { args = { "--drain-timeout=1" } })
      procs[#procs + 1] = p
      return p.port
    end

    setup(function()
      helpers.run(function()
        local generated = assert(apikey.generate())
        key = generated.key
        local prefix_length = require("justavps.platform.auth_user")
          .KEY_PREFIX_LENGTH or 16
        assert(db.query("INSERT INTO api_keys (account_id, created_by, name, "
          .. "prefix, hash, scopes) VALUES ($1, $2, 'spec', $3, $4, "
          .. "ARRAY['read'])", { account, user.id,
          key:sub(1, prefix_length), generated.hash }))
        ports[1] = start_platform()
        ports[2] = start_platform()
      end, 60)
    end)

    teardown(function()
      helpers.run(function()
        for _, p in ipairs(procs) do
          p:stop()
        end
      end, 30)
    end)

    -- Opens an SSE stream; returns the response and a function that
    -- reads until n frames arrived, returning them.
    local function open(port, headers)
      headers = headers or {}
      headers.Authorization = "Bearer " .. key
      local res = assert(core.http.request{ method = "GET",
        host = "127.0.0.1", port = port,
        path = "/api/v1/machines/ev-1/events/stream", headers = headers,
        timeout = 10 })
      local text = ""
      return res, function(n)
        while #parse_sse(text) < n do
          local piece = assert(res:read())
          text = text .. piece
        end
        return parse_sse(text)
      end
    end

    it("streams one event from two processes", async(function()
      local last = insert_event("failed")
      local header = { ["Last-Event-ID"] = tostring(last) }
      local res1, read1 = open(ports[1], { ["Last-Event-ID"] = header
        ["Last-Event-ID"] })
      local res2, read2 = open(ports[2], { ["Last-Event-ID"] = header
        ["Last-Event-ID"] })
      assert.equal(200, res1.status)
      assert.equal(200, res2.status)
      assert.equal("text/event-stream", res1:header("content-type"))
      local id = insert_event("deleting")
      assert.same({ id }, ids_of(read1(1)))
      assert.same({ id }, ids_of(read2(1)))
      res1:close()
      res2:close()
    end, 30))

    it("rejects a stream without credentials", async(function()
      local res = assert(core.http.request{ method = "GET",
        host = "127.0.0.1", port = ports[1],
        path = "/api/v1/machines/ev-1/events/stream", timeout = 10 })
      assert.equal(401, res.status)
      res:close()
    end))
  end)
end)
