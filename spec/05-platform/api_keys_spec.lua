-- API keys against a real platform process and a fresh database: create,
-- list with cursor pagination, revoke, authenticate with a key, the scope
-- of every "user" route in the OpenAPI document, and input validation with
-- the database left unchanged.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")

local async = helpers.async
local crypto = core.crypto

local platform = require("support.platform")

local ALL_SCOPES = { "read", "write", "delete", "exec", "proxy" }
local NO_SUCH_ID = "00000000-0000-4000-8000-000000000000"

local as_session = platform.as_session
local as_key = platform.as_key


local function without(list, removed)
  local out = {}
  for _, v in ipairs(list) do
    if v ~= removed then
      out[#out + 1] = v
    end
  end
  return out
end


describe("platform API keys", function()
  local db, p
  -- The dashboard sessions of two accounts: { cookie, csrf }.
  local owner, stranger

  local function sql(query, params)
    return db:sql(query, params)
  end

  local function counts()
    return sql("SELECT (SELECT count(*) FROM accounts) AS accounts, "
      .. "(SELECT count(*) FROM users) AS users, "
      .. "(SELECT count(*) FROM sessions) AS sessions, "
      .. "(SELECT count(*) FROM api_keys) AS api_keys, "
      .. "(SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL) "
      .. "AS revoked")[1]
  end

  local function request(method, path, headers, body)
    return p:request(method, path, headers, body)
  end

  local function signup(email)
    return p:signup(email)
  end

  local function create_key(s, name, scopes)
    return p:create_key(s, name, scopes)
  end

  setup(function()
    helpers.run(function()
      db = platform.database()
      p = platform.start(db)
      owner = signup("owner@example.com")
      stranger = signup("stranger@example.com")
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      if p then
        p:stop()
      end
      if db then
        db:drop()
      end
    end, 60)
  end)

  it("creates a key shown once and stored hashed", async(function()
    local status, body, headers = request("POST", "/api/v1/api-keys",
      as_session(owner), json.encode({ name = "ci",
        scopes = { "write", "read", "read" } }))
    assert.equal(201, status)
    assert.equal("no-store", headers["cache-control"])
    assert.equal(51, #body.key)
    assert.truthy(body.key:find("^sk_live_[%w_-]+$"))
    assert.equal(body.key:sub(1, 16), body.prefix)
    assert.same({ "read", "write" }, body.scopes)
    assert.equal("ci", body.name)

    local row = sql("SELECT hash, prefix, created_by IS NOT NULL AS has_creator "
      .. "FROM api_keys WHERE id = $1", { body.id })[1]
    assert.equal(crypto.hex_encode(crypto.sha256(body.key)), row.hash)
    assert.equal(body.prefix, row.prefix)
    assert.is_true(row.has_creator)
  end))

  it("authenticates with a key", async(function()
    local key = create_key(owner, "me", { "read" })
    local status, body = request("GET", "/api/v1/me", as_key(key.key))
    assert.equal(200, status)
    assert.equal("api_key", body.auth_method)
    assert.same({ "read" }, body.scopes)
    assert.equal("owner@example.com", body.user.email)
    assert.equal(owner.account_id, body.account.id)
    assert.equal(key.prefix, body.api_key.prefix)
    assert.is_nil(body.csrf_token)

    -- A key needs no CSRF token for writes.
    local wkey = create_key(owner, "writer", { "write" })
    local wstatus = request("POST", "/api/v1/api-keys", as_key(wkey.key),
      json.encode({ name = "child", scopes = { "write" } }))
    assert.equal(201, wstatus)
  end))

  it("rejects two Authorization headers", async(function()
    local key = create_key(owner, "twice", { "read" })
    local status, body = request("GET", "/api/v1/me",
      { Authorization = { "Bearer " .. key.key,
        "Bearer sk_live_" .. ("c"):rep(43) } })
    assert.equal(401, status)
    assert.equal("unauthorized", body.error.code)
    assert.truthy(body.error.message:find("2 Authorization headers", 1,
      true), body.error.message)
    -- The same key alone works.
    assert.equal(200, (request("GET", "/api/v1/me", as_key(key.key))))
  end))

  it("ignores the cookie when a key is sent", async(function()
    local headers = as_session(owner)
    headers.Authorization = "Bearer sk_live_" .. ("b"):rep(43)
    local status, body = request("GET", "/api/v1/me", headers)
    assert.equal(401, status)
    assert.equal("unauthorized", body.error.code)
  end))

  it("lists keys without secrets", async(function()
    local key = create_key(owner, "listed", { "read", "exec" })
    assert.equal(200, (request("GET", "/api/v1/me", as_key(key.key))))
    local status, body = request("GET", "/api/v1/api-keys?limit=100",
      { Cookie = owner.cookie })
    assert.equal(200, status)
    local found
    for _, entry in ipairs(body.api_keys) do
      assert.is_nil(entry.key)
      assert.is_nil(entry.hash)
      if entry.id == key.id then
        found = entry
      end
    end
    assert.is_table(found)
    assert.equal("listed", found.name)
    assert.equal(key.prefix, found.prefix)
    assert.same({ "read", "exec" }, found.scopes)
    assert.is_string(found.created_at)
    assert.is_string(found.last_used_at)

    -- The other account lists none of them.
    local _, other = request("GET", "/api/v1/api-keys", { Cookie = stranger.cookie })
    assert.same({}, other.api_keys)
    assert.equal(json.null, other.next_cursor)
  end))

  it("pages through keys with a cursor", async(function()
    local s = signup("pages@example.com")
    local created = {}
    for i = 1, 5 do
      created[create_key(s, "page " .. i, { "read" }).id] = true
    end
    local seen, pages, cursor = {}, 0, nil
    repeat
      local path = "/api/v1/api-keys?limit=2"
      if cursor then
        path = path .. "&cursor=" .. cursor
      end
      local status, body = request("GET", path, { Cookie = s.cookie })
      assert.equal(200, status)
      assert.is_true(#body.api_keys <= 2)
      for _, entry in ipairs(body.api_keys) do
        assert.is_nil(seen[entry.id], "key listed twice")
        seen[entry.id] = true
      end
      pages = pages + 1
      cursor = body.next_cursor ~= json.null and body.next_cursor or nil
    until not cursor
    assert.equal(3, pages)
    assert.same(created, seen)
  end))

  local bad_queries = {
    { "limit=0", "limit" }, { "limit=101", "limit" }, { "limit=abc", "limit" },
    { "limit=1.5", "limit" },
    -- The machine list rejects a bad cursor with the same code.
    { "cursor=not-a-cursor", "cursor", "invalid_cursor" },
    { "cursor=" .. crypto.base64url_encode("2024-01-01 x"), "cursor",
      "invalid_cursor" },
  }

  for _, case in ipairs(bad_queries) do
    it("rejects a listing with " .. case[1], async(function()
      local status, body = request("GET", "/api/v1/api-keys?" .. case[1],
        { Cookie = owner.cookie })
      assert.equal(400, status)
      assert.equal(case[3] or "invalid_request", body.error.code)
      assert.truthy(body.error.message:find(case[2], 1, true))
    end))
  end

  local bad_creates = {
    { "an unknown scope", json.encode({ name = "x", scopes = { "admin" } }),
      400, "invalid_request", "scopes" },
    { "no scopes", json.encode({ name = "x", scopes = json.array() }),
      400, "invalid_request", "scopes" },
    { "scopes as a string", json.encode({ name = "x", scopes = "read" }),
      400, "invalid_request", "scopes" },
    { "a missing name", json.encode({ scopes = { "read" } }),
      400, "invalid_request", "name" },
    { "a name too long", json.encode({ name = ("n"):rep(101),
      scopes = { "read" } }), 400, "invalid_request", "name" },
    { "an unknown field", json.encode({ name = "x", scopes = { "read" },
      expires = 1 }), 400, "invalid_request", "expires" },
    { "invalid JSON", "{\"name\": \"x\",", 400, "invalid_json" },
    { "an oversized body", json.encode({ name = ("n"):rep(5000),
      scopes = { "read" } }), 413, "too_large" },
  }

  for _, case in ipairs(bad_creates) do
    it("rejects a key with " .. case[1], async(function()
      local before = counts()
      local status, body = request("POST", "/api/v1/api-keys",
        as_session(owner), case[2])
      assert.equal(case[3], status)
      assert.equal(case[4], body.error.code)
      if case[5] then
        assert.truthy(body.error.message:find(case[5], 1, true),
          "message does not name " .. case[5] .. ": " .. body.error.message)
      end
      assert.same(before, counts())
    end))
  end

  it("lets a key grant only its own scopes", async(function()
    local key = create_key(owner, "limited", { "read", "write" })
    local before = counts()
    local status, body = request("POST", "/api/v1/api-keys", as_key(key.key),
      json.encode({ name = "stronger", scopes = { "read", "exec" } }))
    assert.equal(403, status)
    assert.equal("insufficient_scope", body.error.code)
    assert.truthy(body.error.message:find("exec", 1, true))
    assert.same(before, counts())

    local ok_status, created = request("POST", "/api/v1/api-keys",
      as_key(key.key), json.encode({ name = "weaker", scopes = { "read" } }))
    assert.equal(201, ok_status)
    assert.same({ "read" }, created.scopes)
  end))

  it("rejects every user route without its scope", async(function()
    local status, doc = request("GET", "/api/v1/openapi.json")
    assert.equal(200, status)
    local keys, walked = {}, {}
    for _, scope in ipairs(ALL_SCOPES) do
      keys[scope] = create_key(owner, "without " .. scope,
        without(ALL_SCOPES, scope)).key
    end

    local before = counts()
    for path, ops in pairs(doc.paths) do
      for method, op in pairs(ops) do
        if op["x-auth"] == "user" and op["x-scope"] then
          local scope = op["x-scope"]
          local target = path:gsub("{[%w_]+%*?}", NO_SUCH_ID)
          local body
          if method ~= "get" and method ~= "delete" then
            body = "{}"
          end
          local rstatus, rbody = request(method:upper(), target,
            as_key(keys[scope]), body)
          local where = method:upper() .. " " .. path
          assert.equal(403, rstatus, where)
          assert.equal("insufficient_scope", rbody.error.code, where)
          assert.truthy(rbody.error.message:find('"' .. scope .. '"', 1, true),
            where .. ": " .. rbody.error.message)
          walked[where] = true
        end
      end
    end
    assert.same(before, counts())
    for _, where in ipairs({ "GET /api/v1/me", "GET /api/v1/api-keys",
        "POST /api/v1/api-keys", "DELETE /api/v1/api-keys/{id}" }) do
      assert.is_true(walked[where], where .. " was not walked")
    end
  end))

  it("revokes a key of the account", async(function()
    local key = create_key(owner, "doomed", { "read" })
    assert.equal(200, (request("GET", "/api/v1/me", as_key(key.key))))

    -- Another account, an unknown id and a malformed id are all 404.
    local before = counts()
    for _, case in ipairs({
      { stranger, key.id }, { owner, NO_SUCH_ID }, { owner, "not-a-uuid" },
    }) do
      local status, body = request("DELETE", "/api/v1/api-keys/" .. case[2],
        as_session(case[1]))
      assert.equal(404, status, case[2])
      assert.equal("not_found", body.error.code)
    end
    assert.same(before, counts())
    assert.equal(200, (request("GET", "/api/v1/me", as_key(key.key))))

    -- A cookie delete needs the CSRF token.
    local cstatus, cbody = request("DELETE", "/api/v1/api-keys/" .. key.id,
      { Cookie = owner.cookie })
    assert.equal(403, cstatus)
    assert.equal("csrf_failed", cbody.error.code)
    assert.same(before, counts())

    local status, body = request("DELETE", "/api/v1/api-keys/" .. key.id,
      as_session(owner))
    assert.equal(204, status)
    assert.equal("", body)
    assert.equal(before.revoked + 1, counts().revoked)

    local rstatus, rbody = request("GET", "/api/v1/me", as_key(key.key))
    assert.equal(401, rstatus)
    assert.equal("unauthorized", rbody.error.code)
    local again = request("DELETE", "/api/v1/api-keys/" .. key.id,
      as_session(owner))
    assert.equal(404, again)

    local _, listing = request("GET", "/api/v1/api-keys?limit=100",
      { Cookie = owner.cookie })
    for _, entry in ipairs(listing.api_keys) do
      assert.are_not.equal(key.id, entry.id)
    end
  end))

  it("updates last_used_at at most once a minute", async(function()
    local key = create_key(owner, "touched", { "read" })
    local function last_used()
      return sql("SELECT last_used_at::text AS t FROM api_keys WHERE id = $1",
        { key.id })[1].t
    end
    assert.equal(core.pg.null, last_used())
    assert.equal(200, (request("GET", "/api/v1/me", as_key(key.key))))
    local first = last_used()
    assert.is_string(first)
    assert.equal(200, (request("GET", "/api/v1/me", as_key(key.key))))
    assert.equal(first, last_used())

    sql("UPDATE api_keys SET last_used_at = now() - interval '2 minutes' "
      .. "WHERE id = $1", { key.id })
    local old = last_used()
    assert.equal(200, (request("GET", "/api/v1/me", as_key(key.key))))
    assert.are_not.equal(old, last_used())
  end))

  it("rejects a key with a wrong secret part", async(function()
    local key = create_key(owner, "forged", { "read" })
    -- Same stored prefix, different rest: found by prefix, fails the hash.
    local last = key.key:sub(-1) == "A" and "B" or "A"
    local forged = key.key:sub(1, -2) .. last
    local status, body = request("GET", "/api/v1/me", as_key(forged))
    assert.equal(401, status)
    assert.equal("unauthorized", body.error.code)
  end))
end)
