-- Bad input on every route of the platform's OpenAPI document, against a
-- real platform process and a fresh database. The cases are generated
-- from the document, so a new route is covered without editing this file.
-- Each JSON body is sent malformed, as the wrong top-level type, with each
-- declared field of the wrong type, with an unknown field and over its
-- size limit. Every authenticated route is called without credentials
-- and with a malformed Authorization header. Every rejection
-- must leave the row count of every table unchanged, and no error body
-- may carry SQL, a stack trace, a Lua source path or the API key.
local json = require("justavps.json")
local helpers = require("support.helpers")

local async = helpers.async

local platform = require("support.platform")

local MACHINE_SLUG = "bad-input-1"
local MACHINE_TOKEN = "machine-token-0123456789abcdef0123456789"
local NO_SUCH_ID = "00000000-0000-0000-0000-000000000000"
local ALL_SCOPES = { "read", "write", "delete", "exec", "proxy" }
local UNKNOWN_FIELD = "zz_unknown_field"

-- The doubling search for a route's body limit stops here and fails.
local MAX_PROBED_BODY = 64 * 1024 * 1024

local MALFORMED_JSON = { '{"a": ', "{", "not json", '{"a": 1,}',
  "{'a': 1}", '{"a" 1}' }

-- Valid JSON whose top level is not an object.
local WRONG_TOP_LEVEL = { "[]", '[{"a": 1}]', '"text"', "42", "true" }

-- Raw JSON values of the wrong type for each OpenAPI schema type.
local WRONG_VALUES = {
  string = { "12345", "true", '{"k": 1}', '["x"]' },
  number = { '"not a number"', "true", '{"k": 1}', "[1]" },
  integer = { '"not a number"', "1.5", "true", '{"k": 1}', "[1]" },
  boolean = { '"yes"', "1", '{"k": 1}', "[true]" },
  array = { '"x"', "12", "true", '{"k": 1}' },
  object = { '"x"', "12", "true" },
}

-- Authorization headers that are not a well-formed API key.
local function malformed_authorizations(key)
  return {
    "Bearer",
    "Bearer ",
    "Bearer not-a-key",
    "Bearer sk_live_short",
    "Bearer " .. key .. "x",
    "Bearer " .. key:sub(1, -2),
    "Basic dXNlcjpwYXNz",
    "Token " .. key,
    key,
  }
end


-- The machine signature of a call, from the wire contract.
local function machine_headers(method, target, body)
  return platform.sign_machine(MACHINE_TOKEN, method, target, body)
end


-- Returns the path with every {param} replaced: the spec's machine for
-- {slug}, so machine signatures verify, and an unknown id elsewhere.
local function fill_path(path)
  return (path:gsub("{([%w_]+)%*?}", function(name)
    if name == "slug" then
      return MACHINE_SLUG
    end
    return NO_SUCH_ID
  end))
end


-- Returns the operations of the document as a sorted list of
-- { method, path, op, where }.
local function operations(doc)
  local list = {}
  for path, ops in pairs(doc.paths) do
    for method, op in pairs(ops) do
      list[#list + 1] = { method = method:upper(), path = path, op = op,
        where = method:upper() .. " " .. path }
    end
  end
  table.sort(list, function(a, b)
    return a.where < b.where
  end)
  return list
end


local function body_schema(op)
  local body = op.requestBody
  return body and body.content["application/json"].schema
end


-- Returns { path, type } for each declared field. Nested record fields
-- get the dotted path that the validator reports.
local function declared_fields(schema, prefix, out)
  out = out or {}
  local names = {}
  for name in pairs(schema.properties or {}) do
    names[#names + 1] = name
  end
  table.sort(names)
  for _, name in ipairs(names) do
    local field = schema.properties[name]
    local path = prefix and (prefix .. "." .. name) or name
    out[#out + 1] = { path = path, type = field.type or "string" }
    if field.type == "object" and field.properties then
      declared_fields(field, path, out)
    end
  end
  return out
end


-- Returns a JSON object text with raw (JSON text) at the dotted path.
local function nested_body(path, raw)
  local text = raw
  local parts = {}
  for part in path:gmatch("[^.]+") do
    parts[#parts + 1] = part
  end
  for i = #parts, 1, -1 do
    text = "{" .. json.encode(parts[i]) .. ": " .. text .. "}"
  end
  return text
end


describe("platform bad input", function()
  local db, p, doc, api_key

  local function sql(query, params)
    return db:sql(query, params)
  end

  -- Returns the row count of every table of the public schema, by name.
  local function counts()
    local tables = sql("SELECT table_name FROM information_schema.tables "
      .. "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' "
      .. "ORDER BY table_name")
    assert.is_true(#tables > 0, "no tables found")
    local selects = {}
    for i, row in ipairs(tables) do
      local quoted = '"' .. row.table_name:gsub('"', '""') .. '"'
      selects[i] = "(SELECT count(*) FROM " .. quoted .. ") AS " .. quoted
    end
    return sql("SELECT " .. table.concat(selects, ", "))[1]
  end

  -- Sends a request; returns status, the body text and the decoded body.
  local function request(method, path, headers, body)
    local status, text = p:raw(method, path, headers, body)
    local decoded = text ~= "" and json.decode(text) or nil
    return status, text, decoded
  end

  -- Headers that authenticate op for body: the all-scope API key for a
  -- user route and the machine's signature for a machine route.
  local function credentials(op, method, target, body)
    local headers = { ["Content-Type"] = "application/json" }
    local auth = op["x-auth"]
    if auth == "user" then
      headers.Authorization = "Bearer " .. api_key
    elseif auth == "machine" then
      for k, v in pairs(machine_headers(method, target, body)) do
        headers[k] = v
      end
    else
      assert.equal("none", auth, "unknown x-auth " .. tostring(auth))
    end
    return headers
  end

  -- Checks an error response: status, code, a message containing names,
  -- and a body free of SQL, stack traces, Lua source paths and the API key.
  local function check_error(where, status, text, decoded, want_status,
      want_code, names)
    assert.equal(want_status, status, where .. ": " .. text)
    assert.is_table(decoded, where .. ": not JSON: " .. text)
    assert.is_table(decoded.error, where .. ": " .. text)
    assert.is_string(decoded.error.code, where .. ": " .. text)
    assert.is_string(decoded.error.message, where .. ": " .. text)
    if want_code then
      assert.equal(want_code, decoded.error.code, where .. ": " .. text)
    end
    if names then
      assert.truthy(decoded.error.message:find(names, 1, true),
        where .. ": message does not name " .. names .. ": " .. text)
    end
    assert.falsy(text:find("stack traceback", 1, true), where .. ": " .. text)
    assert.falsy(text:find("%.lua%f[^%w]"), where .. ": " .. text)
    assert.falsy(text:find(api_key, 1, true), where .. ": " .. text)
    assert.falsy(text:find(api_key:sub(9), 1, true), where .. ": " .. text)
    for _, pattern in ipairs({ "SELECT%s", "INSERT%s+INTO", "UPDATE%s+%S+%s+SET",
        "DELETE%s+FROM", "syntax error at", "relation \"", "violates" }) do
      assert.falsy(text:find(pattern), where .. ": SQL in " .. text)
    end
  end

  setup(function()
    helpers.run(function()
      db = platform.database()
      p = platform.start(db, { env = {
        JUSTAVPS_PLATFORM_AUTH_LOGIN_RATE_IP_LIMIT = "100000" } })

      -- The session from signup creates the all-scope key.
      local signed_up = p:signup("bad-input@example.com")
      local key = p:create_key(signed_up, "every scope", ALL_SCOPES)
      assert.same(ALL_SCOPES, key.scopes)
      api_key = key.key

      sql("INSERT INTO machines (slug, account_id, name, provider, region, "
        .. "server_type, stage, token) VALUES ($1, $2, $3, $4, $5, $6, $7, "
        .. "$8)", { MACHINE_SLUG, signed_up.account_id, "bad input",
          "local", "local", "local", "server_created", MACHINE_TOKEN })

      local dstatus, dtext, decoded = request("GET", "/api/v1/openapi.json")
      assert.equal(200, dstatus, dtext)
      doc = decoded
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

  -- Calls check(entry, schema, send) for each operation with a JSON body,
  -- where send(body) sends it with working credentials, and asserts that
  -- no table's row count changed across the route's cases.
  local function each_body_route(check)
    local walked = 0
    for _, entry in ipairs(operations(doc)) do
      local schema = body_schema(entry.op)
      if schema then
        walked = walked + 1
        local target = fill_path(entry.path)
        local function send(body)
          return request(entry.method, target,
            credentials(entry.op, entry.method, target, body), body)
        end
        local before = counts()
        check(entry, schema, send)
        assert.same(before, counts(), entry.where .. " changed the database")
      end
    end
    assert.is_true(walked > 0, "the document has no route with a JSON body")
  end

  it("finds body and authenticated routes", async(function()
    local bodies, authenticated = {}, {}
    for _, entry in ipairs(operations(doc)) do
      if body_schema(entry.op) then
        bodies[entry.where] = true
      end
      if entry.op["x-auth"] ~= "none" then
        authenticated[entry.where] = true
      end
    end
    for _, where in ipairs({ "POST /api/v1/auth/signup",
        "POST /api/v1/api-keys", "POST /api/v1/machines" }) do
      assert.is_true(bodies[where], where .. " has no requestBody")
    end
    for _, where in ipairs({ "GET /api/v1/me",
        "POST /api/v1/machines/{slug}/heartbeat" }) do
      assert.is_true(authenticated[where], where .. " is not authenticated")
    end
  end))

  it("rejects malformed JSON on every body route", async(function()
    each_body_route(function(entry, _, send)
      for _, body in ipairs(MALFORMED_JSON) do
        local where = entry.where .. " with " .. body
        local status, text, decoded = send(body)
        check_error(where, status, text, decoded, 400, "invalid_json")
      end
    end)
  end))

  it("rejects a non-object body on every body route", async(function()
    each_body_route(function(entry, _, send)
      for _, body in ipairs(WRONG_TOP_LEVEL) do
        local status, text, decoded = send(body)
        check_error(entry.where .. " with " .. body, status, text, decoded,
          400, "invalid_request")
      end
    end)
  end))

  it("rejects each field of the wrong type", async(function()
    each_body_route(function(entry, schema, send)
      for _, field in ipairs(declared_fields(schema)) do
        local values = WRONG_VALUES[field.type]
        assert.is_table(values, entry.where .. ": no wrong values for type "
          .. tostring(field.type) .. " of " .. field.path)
        for _, raw in ipairs(values) do
          local body = nested_body(field.path, raw)
          local status, text, decoded = send(body)
          check_error(entry.where .. " with " .. body, status, text, decoded,
            400, "invalid_request", field.path)
        end
      end
    end)
  end))

  it("rejects an unknown field", async(function()
    each_body_route(function(entry, _, send)
      local body = json.encode({ [UNKNOWN_FIELD] = 1 })
      local status, text, decoded = send(body)
      check_error(entry.where .. " with " .. body, status, text, decoded,
        400, "invalid_request", UNKNOWN_FIELD)
    end)
  end))

  it("rejects a body over the route's limit", async(function()
    each_body_route(function(entry, _, send)
      local size = 1024
      local status, text, decoded
      while size <= MAX_PROBED_BODY do
        local body = '{"' .. UNKNOWN_FIELD .. '": "' .. ("a"):rep(size)
          .. '"}'
        status, text, decoded = send(body)
        if status == 413 then
          break
        end
        assert.equal(400, status, entry.where .. " with " .. #body
          .. " bytes: " .. text:sub(1, 200))
        size = size * 2
      end
      check_error(entry.where .. " with " .. size .. " bytes", status, text,
        decoded, 413, "too_large")
    end)
  end))

  it("rejects text PostgreSQL cannot store in any body", async(function()
    each_body_route(function(entry, _, send)
      for _, body in ipairs({ '{"name": "a\\u0000b"}', '{"name": "a\255b"}',
          '{"a\\u0000": 1}' }) do
        local status, text, decoded = send(body)
        check_error(entry.where .. " with " .. body, status, text, decoded,
          400, "invalid_request", "UTF-8")
      end
    end)
  end))

  it("rejects path parameters that are not UTF-8 text", async(function()
    local walked = 0
    for _, entry in ipairs(operations(doc)) do
      if entry.path:find("{", 1, true) and entry.op["x-auth"] == "user" then
        walked = walked + 1
        -- The router refuses an encoded NUL before any route runs.
        for _, case in ipairs({ { "%ff", "invalid_request", "UTF-8" },
            { "a%00b", "bad_request", "NUL" } }) do
          local target = entry.path:gsub("{[%w_]+%*?}", function()
            return case[1]
          end)
          local before = counts()
          local status, text, decoded = request(entry.method, target,
            credentials(entry.op, entry.method, target, "{}"), "{}")
          check_error(entry.where .. " at " .. target, status, text, decoded,
            400, case[2], case[3])
          assert.falsy(text:find("\255", 1, true), text)
          assert.same(before, counts(), entry.where .. " changed the database")
        end
      end
    end
    assert.is_true(walked > 0, "no user route has a path parameter")
  end))

  it("rejects authenticated routes without valid credentials", async(function()
    local walked = 0
    for _, entry in ipairs(operations(doc)) do
      if entry.op["x-auth"] ~= "none" then
        walked = walked + 1
        local target = fill_path(entry.path)
        local body
        if body_schema(entry.op) or entry.method == "POST" then
          body = "{}"
        end
        local before = counts()

        local status, text, decoded = request(entry.method, target,
          { ["Content-Type"] = "application/json" }, body)
        check_error(entry.where .. " without credentials", status, text,
          decoded, 401)

        for _, authorization in ipairs(malformed_authorizations(api_key)) do
          local where = entry.where .. " with Authorization: "
            .. authorization:sub(1, 20)
          status, text, decoded = request(entry.method, target,
            { ["Content-Type"] = "application/json",
              Authorization = authorization }, body)
          check_error(where, status, text, decoded, 401)
        end

        assert.same(before, counts(), entry.where .. " changed the database")
      end
    end
    assert.is_true(walked > 0, "the document has no authenticated route")
  end))
end)
