-- The machines, share link and ticket handlers against a fresh, migrated
-- database. Handlers run in this process with a fake request context, as
-- the "user" auth kind would leave it; the HTTP cases run the real
-- platform process once that auth kind is wired into the app.
local core = require("justavps.core")
local json = require("justavps.json")
local config = require("justavps.config")
local helpers = require("support.helpers")
local db = require("justavps.db.db")
local platform_config = require("justavps.platform.config")
local state = require("justavps.platform.state")
local machines = require("justavps.platform.machines")
local machine_routes = require("justavps.platform.routes.machines")
local access = require("justavps.platform.routes.access")
local proxy_token = require("justavps.auth.proxy_token")
local apikey = require("justavps.auth.apikey")

local async = helpers.async
local crypto = core.crypto

local platform = require("support.platform")

local SECRET = "spec-proxy-secret-0123456789abcdef0123456789"
local SHARE_MAX_TTL = 7200

local M = machine_routes.handlers
local A = access.handlers


local settings = require("support.pg").settings()


local function decode(status, headers, body)
  if type(body) == "string" then
    return status, json.decode(body), headers
  end
  return status, headers
end


describe("machines API", function()
  local database, conninfo
  local alice, bob

  local function add_user(name)
    local acct = assert(db.one("INSERT INTO accounts (name) VALUES ($1) "
      .. "RETURNING id", { name }))
    local user = assert(db.one("INSERT INTO users (account_id, email) "
      .. "VALUES ($1, $2) RETURNING id", { acct.id, name .. "@example.test" }))
    return { id = user.id, account_id = acct.id,
      email = name .. "@example.test" }
  end

  setup(function()
    helpers.run(function()
      database = platform.database()
      conninfo = string.format("host=%s port=%s user=%s dbname=%s",
        settings.PGHOST, settings.PGPORT, settings.PGUSER, database.name)
      state.set_config(assert(config.validate(platform_config.schema, {
        database = { url = conninfo },
        domain = "example.test",
        proxy = { jwt_secret = SECRET, share_max_ttl = SHARE_MAX_TTL },
      })))
      db.setup(state.conf.database)
      alice = add_user("alice")
      bob = add_user("bob")
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      db.close()
      if database then
        database:drop()
      end
    end, 60)
  end)

  local function ctx(user, opts)
    opts = opts or {}
    return { user = user, params = opts.params or {}, body = opts.body,
      query = opts.query, auth_method = "api_key" }
  end

  local function create(user, name)
    local status, body = decode(M.create(ctx(user, { body = {
      name = name or "web box", region = "local", server_type = "local" } })))
    assert.equal(202, status)
    return body
  end

  describe("create", function()
    it("returns the slug and first stage", async(function()
      local m = create(alice, "My Web Box!")
      assert.equal("server_creating", m.stage)
      assert.truthy(m.slug:match("^my%-web%-box%-[a-z2-7]+$"), m.slug)
      assert.equal("local", m.provider)
      assert.is_nil(m.token)
      assert.is_nil(m.id)
    end))

    it("rejects a provider it cannot use", async(function()
      local cases = {
        { { provider = "nowhere", region = "x", server_type = "y" },
          "unknown_provider", "unknown provider 'nowhere'" },
        { { provider = "init", region = "x", server_type = "y" },
          "unknown_provider", "unknown provider 'init'" },
        -- The spec's config gives hetzner no token.
        { { provider = "hetzner", region = "fsn1", server_type = "cx22" },
          "provider_not_configured", "hetzner" },
        { { provider = "local", region = "mars", server_type = "local" },
          "invalid_request", "region" },
        { { provider = "local", region = "local", server_type = "huge" },
          "invalid_request", "server_type" },
      }
      local before = db.one("SELECT count(*) AS n FROM machines").n
      for _, case in ipairs(cases) do
        local body = case[1]
        body.name = "bad provider"
        local status, reply = decode(M.create(ctx(alice, { body = body })))
        assert.equal(400, status, case[2])
        assert.equal(case[2], reply.error.code)
        assert.truthy(reply.error.message:find(case[3], 1, true),
          reply.error.message)
        -- No file system path of the platform host.
        assert.falsy(reply.error.message:find("/", 1, true),
          reply.error.message)
      end
      assert.equal(before, db.one("SELECT count(*) AS n FROM machines").n)
    end))

    it("writes row, event and job in one transaction", async(function()
      local m = create(alice)
      local row = assert(db.one("SELECT id, xmin::text AS xid, "
        .. "length(token) AS token_length FROM machines WHERE slug = $1",
        { m.slug }))
      assert.equal(48, row.token_length)
      local events = assert(db.rows("SELECT stage::text AS stage, "
        .. "xmin::text AS xid FROM machine_events WHERE machine_id = $1",
        { row.id }))
      assert.equal(1, #events)
      assert.equal("server_creating", events[1].stage)
      assert.equal(row.xid, events[1].xid)
      local jobs = assert(db.rows("SELECT kind, state, xmin::text AS xid "
        .. "FROM jobs WHERE machine_id = $1", { row.id }))
      assert.equal(1, #jobs)
      assert.equal("provision", jobs[1].kind)
      assert.equal("queued", jobs[1].state)
      assert.equal(row.xid, jobs[1].xid)
    end))

    it("makes a slug from a name without letters", async(function()
      local m = create(alice, "!!!")
      assert.truthy(m.slug:match("^m%-[a-z2-7]+$"), m.slug)
    end))
  end)

  describe("list", function()
    it("pages through the account's machines", async(function()
      local user = add_user("pager")
      local made = {}
      for i = 1, 5 do
        made[create(user, "page " .. i).slug] = true
      end
      create(bob, "not yours")

      local seen, pages, cursor = {}, 0, nil
      local last_created
      repeat
        local query = "limit=2" .. (cursor and ("&cursor=" .. cursor) or "")
        local status, page = decode(M.list(ctx(user, { query = query })))
        assert.equal(200, status)
        pages = pages + 1
        assert.is_true(#page.items <= 2)
        for _, item in ipairs(page.items) do
          assert.is_true(made[item.slug], item.slug)
          assert.is_nil(seen[item.slug])
          seen[item.slug] = true
          if last_created then
            assert.is_true(item.created_at <= last_created)
          end
          last_created = item.created_at
        end
        cursor = page.next_cursor ~= json.null and page.next_cursor or nil
      until not cursor
      assert.equal(3, pages)
      local count = 0
      for _ in pairs(seen) do
        count = count + 1
      end
      assert.equal(5, count)
    end))

    it("rejects a forged cursor", async(function()
      local status, body = decode(M.list(ctx(alice,
        { query = "cursor=bm90LWEtY3Vyc29y" })))
      assert.equal(400, status)
      assert.equal("invalid_cursor", body.error.code)
    end))

    it("rejects a limit out of range", async(function()
      local status = decode(M.list(ctx(alice, { query = "limit=0" })))
      assert.equal(400, status)
    end))
  end)

  describe("show and delete", function()
    it("shows the owner's machine", async(function()
      local m = create(alice)
      local status, body = decode(M.show(ctx(alice,
        { params = { slug = m.slug } })))
      assert.equal(200, status)
      assert.equal(m.slug, body.slug)
      assert.is_nil(body.token)
    end))

    it("answers 404 for another account", async(function()
      local m = create(alice)
      local status, body = decode(M.show(ctx(bob,
        { params = { slug = m.slug } })))
      assert.equal(404, status)
      assert.equal("not_found", body.error.code)
      status = decode(M.delete(ctx(bob, { params = { slug = m.slug } })))
      assert.equal(404, status)
    end))

    it("queues a delete job once", async(function()
      local m = create(alice)
      for _ = 1, 2 do
        local status, body = decode(M.delete(ctx(alice,
          { params = { slug = m.slug } })))
        assert.equal(202, status)
        assert.equal("deleting", body.stage)
      end
      local jobs = assert(db.rows("SELECT j.kind FROM jobs j JOIN machines m "
        .. "ON m.id = j.machine_id WHERE m.slug = $1 ORDER BY j.id",
        { m.slug }))
      assert.equal(2, #jobs)
      assert.equal("delete", jobs[2].kind)
      local events = assert(db.rows("SELECT e.stage::text AS stage FROM "
        .. "machine_events e JOIN machines m ON m.id = e.machine_id "
        .. "WHERE m.slug = $1 ORDER BY e.id", { m.slug }))
      assert.equal(2, #events)
      assert.equal("deleting", events[2].stage)
    end))

    it("queues a dead delete job again", async(function()
      local m = create(alice)
      local status = decode(M.delete(ctx(alice, { params = { slug = m.slug } })))
      assert.equal(202, status)
      assert(db.query("UPDATE jobs SET state = 'dead', attempts = 5 "
        .. "FROM machines m WHERE m.id = jobs.machine_id AND m.slug = $1 "
        .. "AND jobs.kind = 'delete'", { m.slug }))

      status = decode(M.delete(ctx(alice, { params = { slug = m.slug } })))
      assert.equal(202, status)
      local jobs = assert(db.rows("SELECT j.state, j.attempts FROM jobs j "
        .. "JOIN machines m ON m.id = j.machine_id WHERE m.slug = $1 "
        .. "AND j.kind = 'delete'", { m.slug }))
      assert.equal(1, #jobs)
      assert.equal("queued", jobs[1].state)
      assert.equal(0, jobs[1].attempts)
      -- The stage stays deleting, with no second event.
      local events = assert(db.rows("SELECT e.stage::text AS stage FROM "
        .. "machine_events e JOIN machines m ON m.id = e.machine_id "
        .. "WHERE m.slug = $1 AND e.stage = 'deleting'", { m.slug }))
      assert.equal(1, #events)
    end))

    it("hides a deleted machine", async(function()
      local m = create(alice)
      assert(db.query("UPDATE machines SET stage = 'deleted', "
        .. "deleted_at = now() WHERE slug = $1", { m.slug }))
      local status = decode(M.show(ctx(alice, { params = { slug = m.slug } })))
      assert.equal(404, status)
    end))
  end)

  describe("ports and metrics", function()
    it("returns the ports of the last heartbeat", async(function()
      local m = create(alice)
      assert(db.query("UPDATE machines SET ports = $2::jsonb, last_seen_at "
        .. "= now() WHERE slug = $1", { m.slug,
        json.encode({ { port = 3000, address = "0.0.0.0" } }) }))
      local status, body = decode(M.ports(ctx(alice,
        { params = { slug = m.slug } })))
      assert.equal(200, status)
      assert.equal(1, #body.ports)
      assert.equal(3000, body.ports[1].port)
      assert.is_string(body.last_seen_at)
    end))

    it("returns bounded metrics history", async(function()
      local m = create(alice)
      local id = assert(db.one("SELECT id FROM machines WHERE slug = $1",
        { m.slug })).id
      for i = 1, 3 do
        assert(db.query("INSERT INTO machine_metrics (machine_id, at, "
          .. "cpu_percent) VALUES ($1, to_timestamp($2), $3)",
          { id, 1700000000 + i * 30, i * 10 }))
      end

      local status, body = decode(M.metrics(ctx(alice,
        { params = { slug = m.slug }, query = "limit=2" })))
      assert.equal(200, status)
      assert.equal(2, #body.items)
      assert.equal(20, body.items[1].cpu_percent)
      assert.equal(30, body.items[2].cpu_percent)

      status, body = decode(M.metrics(ctx(alice,
        { params = { slug = m.slug }, query = "since=1700000030" })))
      assert.equal(200, status)
      assert.equal(2, #body.items)
      assert.equal(20, body.items[1].cpu_percent)

      status, body = decode(M.metrics(ctx(alice, { params = { slug = m.slug },
        query = "since=2023-11-14T22:13:20Z&limit=1" })))
      assert.equal(200, status)
      assert.equal(1, #body.items)
      assert.equal(10, body.items[1].cpu_percent)

      status = decode(M.metrics(ctx(alice,
        { params = { slug = m.slug }, query = "since=yesterday" })))
      assert.equal(400, status)
    end))
  end)

  describe("share links", function()
    it("issues, lists and revokes a link", async(function()
      local m = create(alice)
      local status, link = decode(A.create_share(ctx(alice,
        { params = { slug = m.slug }, body = { port = 3000 } })))
      assert.equal(201, status)
      assert.is_string(link.token)
      assert.equal("https://3000-" .. m.slug .. ".example.test/?"
        .. access.TOKEN_PARAM .. "=" .. link.token, link.url)

      local claims = assert(proxy_token.verify(link.token, SECRET,
        { slug = m.slug, scope = proxy_token.SHARE_SCOPE }))
      assert.equal(link.id, claims.jti)
      assert.equal(3000, claims.port)
      assert.equal(proxy_token.SHARE_TTL, claims.exp - claims.iat)

      local row = assert(db.one("SELECT token_hash FROM proxy_tokens "
        .. "WHERE id = $1", { link.id }))
      assert.equal(crypto.hex_encode(crypto.sha256(link.token)),
        row.token_hash)
      assert.is_false(machines.is_share_token_revoked(link.id))

      local list
      status, list = decode(A.list_shares(ctx(alice,
        { params = { slug = m.slug } })))
      assert.equal(200, status)
      assert.equal(1, #list.items)
      assert.equal(link.id, list.items[1].id)
      assert.is_true(list.items[1].active)
      assert.is_nil(list.items[1].token)
      assert.is_nil(list.items[1].token_hash)

      status = decode(A.revoke_share(ctx(bob,
        { params = { slug = m.slug, id = link.id } })))
      assert.equal(404, status)

      local revoked
      status, revoked = decode(A.revoke_share(ctx(alice,
        { params = { slug = m.slug, id = link.id } })))
      assert.equal(200, status)
      assert.is_string(revoked.revoked_at)
      assert.is_false(revoked.active)
      assert.is_true(machines.is_share_token_revoked(link.id))
      local _, msg, code = proxy_token.verify(link.token, SECRET,
        { slug = m.slug, is_revoked = machines.is_share_token_revoked })
      assert.equal("token_revoked", code, msg)
    end))

    it("caps the lifetime at the configured maximum", async(function()
      local m = create(alice)
      local status, link = decode(A.create_share(ctx(alice,
        { params = { slug = m.slug }, body = { port = 8080,
          ttl_s = 7 * 86400 } })))
      assert.equal(201, status)
      local claims = assert(proxy_token.verify(link.token, SECRET,
        { slug = m.slug }))
      assert.equal(SHARE_MAX_TTL, claims.exp - claims.iat)
    end))

    it("answers 404 for an unknown link id", async(function()
      local m = create(alice)
      local status = decode(A.revoke_share(ctx(alice,
        { params = { slug = m.slug, id = "not-a-uuid" } })))
      assert.equal(404, status)
    end))

    it("treats an unknown jti as revoked", async(function()
      assert.is_true(machines.is_share_token_revoked(machines.new_uuid()))
    end))

    it("issues an owner token", function()
      local token = assert(access.issue_owner_token("user-1", "abc-def"))
      local claims = assert(proxy_token.verify(token, SECRET,
        { slug = "abc-def", scope = proxy_token.OWNER_SCOPE }))
      assert.equal("user-1", claims.sub)
    end)
  end)

  describe("tickets", function()
    it("issues a single-use ticket", async(function()
      local m = create(alice)
      local status, body = decode(A.create_ticket(ctx(alice,
        { params = { slug = m.slug } })))
      assert.equal(201, status)
      assert.equal(43, #body.ticket)
      assert.is_string(body.expires_at)
      local hash = crypto.hex_encode(crypto.sha256(body.ticket))
      local row = assert(db.one("SELECT user_id, expires_at - created_at "
        .. "<= interval '60 seconds' AS bounded FROM machine_tickets "
        .. "WHERE ticket_hash = $1", { hash }))
      assert.equal(alice.id, row.user_id)
      assert.is_true(row.bounded)

      local spent = assert(machines.consume_ticket(hash, m.slug))
      assert.equal(alice.id, spent.user_id)
      local again, _, code = machines.consume_ticket(hash, m.slug)
      assert.is_nil(again)
      assert.equal("invalid_ticket", code)
    end))

    it("spends a ticket tried on another machine", async(function()
      local m = create(alice)
      local _, body = decode(A.create_ticket(ctx(alice,
        { params = { slug = m.slug } })))
      local hash = crypto.hex_encode(crypto.sha256(body.ticket))
      local _, _, code = machines.consume_ticket(hash, "other-machine")
      assert.equal("wrong_slug", code)
      _, _, code = machines.consume_ticket(hash, m.slug)
      assert.equal("invalid_ticket", code)
    end))

    it("rejects a credential without a user", async(function()
      local m = create(alice)
      local status = decode(A.create_ticket(ctx({ account_id =
        alice.account_id }, { params = { slug = m.slug } })))
      assert.equal(403, status)
    end))
  end)

  describe("over HTTP", function()
    local p, port, key

    setup(function()
      helpers.run(function()
        local generated = assert(apikey.generate())
        key = generated.key
        local prefix_length = require("justavps.platform.auth_user")
          .KEY_PREFIX_LENGTH or 16
        assert(db.query("INSERT INTO api_keys (account_id, created_by, name, "
          .. "prefix, hash, scopes) VALUES ($1, $2, 'spec', $3, $4, "
          .. "ARRAY['read', 'write', 'delete', 'exec'])", { alice.account_id,
          alice.id, key:sub(1, prefix_length), generated.hash }))

        p = platform.start(database, { args = { "--drain-timeout=1" },
          env = { JUSTAVPS_PLATFORM_PROXY_JWT_SECRET = SECRET,
            -- The API is under test here: a worker would start real
            -- local daemons for every machine these specs create, and
            -- leave them.
            JUSTAVPS_PLATFORM_PROVISION_ENABLED = "false" } })
        port = p.port
      end, 60)
    end)

    teardown(function()
      helpers.run(function()
        if p then
          p:stop()
        end
      end, 30)
    end)

    local function request(method, path, body, auth)
      local headers = { ["Content-Type"] = "application/json" }
      if auth ~= false then
        headers.Authorization = "Bearer " .. key
      end
      local res = assert(core.http.request{ method = method,
        host = "127.0.0.1", port = port, path = path, headers = headers,
        body = body and json.encode(body), timeout = 10 })
      local text = res:read_body()
      res:close()
      return res.status, text ~= "" and json.decode(text) or nil
    end

    it("creates, shows and deletes a machine", async(function()
      local status, m = request("POST", "/api/v1/machines",
        { name = "http box", region = "local", server_type = "local" })
      assert.equal(202, status)
      assert.equal("server_creating", m.stage)
      status = request("GET", "/api/v1/machines/" .. m.slug)
      assert.equal(200, status)
      local list
      status, list = request("GET", "/api/v1/machines?limit=1")
      assert.equal(200, status)
      assert.equal(1, #list.items)
      status, m = request("DELETE", "/api/v1/machines/" .. m.slug)
      assert.equal(202, status)
      assert.equal("deleting", m.stage)
    end))

    it("rejects a request without credentials", async(function()
      local status = request("GET", "/api/v1/machines", nil, false)
      assert.equal(401, status)
    end))

    it("rejects an unknown body field", async(function()
      local status, body = request("POST", "/api/v1/machines",
        { name = "x", region = "r", server_type = "s", colour = "red" })
      assert.equal(400, status)
      assert.equal("invalid_request", body.error.code)
    end))

    it("issues a share link and a ticket", async(function()
      local _, m = request("POST", "/api/v1/machines",
        { name = "share box", region = "local", server_type = "local" })
      local status, link = request("POST", "/api/v1/machines/" .. m.slug
        .. "/proxy-tokens", { port = 3000, ttl_s = 600 })
      assert.equal(201, status)
      assert.is_string(link.token)
      local list
      status, list = request("GET", "/api/v1/machines/" .. m.slug
        .. "/proxy-tokens")
      assert.equal(200, status)
      assert.equal(1, #list.items)
      status = request("DELETE", "/api/v1/machines/" .. m.slug
        .. "/proxy-tokens/" .. link.id)
      assert.equal(200, status)
      local ticket
      status, ticket = request("POST", "/api/v1/machines/" .. m.slug
        .. "/tickets")
      assert.equal(201, status)
      assert.equal(43, #ticket.ticket)
    end))
  end)
end)
