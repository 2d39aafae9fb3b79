local json = require("justavps.json")
local errors = require("justavps.errors")


describe("json.encode", function()
  it("encodes an empty table as an object", function()
    assert.equal("{}", json.encode({}))
  end)

  it("encodes a marked empty array", function()
    assert.equal("[]", json.encode(json.array({})))
    assert.equal("[]", json.encode(json.array()))
    assert.equal("[]", json.encode(json.empty_array))
  end)

  it("encodes sequences as arrays", function()
    assert.equal("[1,\"a\",true]", json.encode({ 1, "a", true }))
  end)

  it("sorts object keys", function()
    assert.equal('{"a":1,"b":{"c":[]}}',
      json.encode({ b = { c = json.array() }, a = 1 }))
  end)

  it("encodes null", function()
    assert.equal('[1,null,3]', json.encode({ 1, json.null, 3 }))
    assert.equal("null", json.encode(json.null))
  end)

  it("keeps every digit of large integers", function()
    assert.equal("1700000000123", json.encode(1700000000123))
    assert.equal("-42", json.encode(-42))
  end)

  it("encodes fractions", function()
    assert.equal("1.5", json.encode(1.5))
  end)

  it("leaves slashes unescaped", function()
    assert.equal('"/api/v1"', json.encode("/api/v1"))
    assert.equal('"a\\\\/b"', json.encode("a\\/b"))
  end)

  it("escapes control characters", function()
    assert.equal('"a\\nb\\u0000"', json.encode("a\nb\0"))
  end)

  local failures = {
    { "a sparse array", { [1] = 1, [3] = 3 }, "sparse_array" },
    { "an array not starting at 1", { [2] = 1 }, "sparse_array" },
    { "mixed keys", { 1, a = 2 }, "mixed_table" },
    { "string keys in a marked array", json.array({ a = 1 }), "mixed_table" },
    { "a fractional key", { [1.5] = 1 }, "invalid_key" },
    { "a zero key", { [0] = 1 }, "invalid_key" },
    { "a boolean key", { [true] = 1 }, "invalid_key" },
    { "NaN", 0 / 0, "invalid_number" },
    { "infinity", math.huge, "invalid_number" },
    { "a function", { f = print }, "unsupported_type" },
    { "a coroutine", coroutine.create(print), "unsupported_type" },
  }

  for _, case in ipairs(failures) do
    it("rejects " .. case[1], function()
      local out, err, code = json.encode(case[2])
      assert.is_nil(out)
      assert.equal(case[3], code)
      assert.is_string(err)
    end)
  end

  it("names the path of a bad value", function()
    local _, err = json.encode({ a = { { b = print } } })
    assert.matches("%$%.a%[1%]%.b", err)
  end)

  it("rejects a cycle", function()
    local t = {}
    t.self = t
    local out, _, code = json.encode(t)
    assert.is_nil(out)
    assert.equal("circular_reference", code)
  end)

  it("allows a shared table twice", function()
    local shared = { 1 }
    assert.equal('{"a":[1],"b":[1]}', json.encode({ a = shared, b = shared }))
  end)

  it("rejects nesting beyond the limit", function()
    local t = {}
    local node = t
    for _ = 1, json.MAX_DEPTH + 1 do
      node.x = {}
      node = node.x
    end
    local out, _, code = json.encode(t)
    assert.is_nil(out)
    assert.equal("too_deep", code)
  end)

  it("keeps empty_array read-only", function()
    assert.has_error(function() json.empty_array[1] = 1 end)
  end)

  it("raises when array gets a non-table", function()
    assert.has_error(function() json.array("x") end)
  end)
end)


describe("json.decode", function()
  it("decodes objects and arrays", function()
    assert.same({ a = { 1, 2 }, b = "x" }, json.decode('{"a":[1,2],"b":"x"}'))
  end)

  it("decodes null as json.null", function()
    assert.equal(json.null, json.decode('{"a":null}').a)
  end)

  it("marks empty arrays so they encode back", function()
    local v = json.decode('{"a":[],"b":{},"c":[ [ ] ],"d":"[]"}')
    assert.is_true(json.is_array(v.a))
    assert.is_false(json.is_array(v.b))
    assert.equal("[]", v.d)
    assert.equal('{"a":[],"b":{},"c":[[]],"d":"[]"}', json.encode(v))
  end)

  it("decodes a top-level empty array", function()
    assert.equal("[]", json.encode(json.decode(" [ ] ")))
  end)

  it("keeps brackets inside strings", function()
    local v = json.decode('["x\\"[]", "[ ]"]')
    assert.same({ 'x"[]', "[ ]" }, v)
  end)

  it("reports invalid JSON with its position", function()
    local v, err, code = json.decode('{"a":1,}')
    assert.is_nil(v)
    assert.equal("invalid_json", code)
    assert.matches("at character 8", err)
  end)

  it("reports positions of the original text", function()
    local _, err = json.decode('{"a":[],,}')
    assert.matches("at character 9", err)
  end)

  it("rejects NaN and hex numbers", function()
    assert.equal("invalid_json", select(3, json.decode("[NaN]")))
    assert.equal("invalid_json", select(3, json.decode("0x10")))
  end)

  it("rejects trailing garbage", function()
    assert.equal("invalid_json", select(3, json.decode("{} x")))
  end)

  it("rejects an empty document", function()
    assert.equal("invalid_json", select(3, json.decode("")))
  end)

  it("rejects deep nesting", function()
    local text = string.rep("[", 10) .. string.rep("]", 10)
    local v, _, code = json.decode(text, { max_depth = 5 })
    assert.is_nil(v)
    assert.equal("too_deep", code)
    assert.is_table(json.decode(text, { max_depth = 10 }))
  end)

  it("rejects a document over the size limit", function()
    local v, err, code = json.decode("[1,2,3]", { max_size = 6 })
    assert.is_nil(v)
    assert.equal("too_large", code)
    assert.matches("7 bytes", err)
  end)

  it("raises on a non-string", function()
    assert.has_error(function() json.decode(nil) end)
  end)
end)


describe("errors", function()
  it("builds the error body", function()
    assert.same({ error = { code = "not_found", message = "no machine m-1" } },
      errors.body("not_found", "no machine m-1"))
  end)

  it("uses a default message", function()
    assert.equal("no such resource", errors.body("not_found").error.message)
  end)

  it("maps codes to status", function()
    local expected = {
      bad_request = 400, unauthorized = 401, forbidden = 403,
      not_found = 404, method_not_allowed = 405, too_large = 413,
      internal = 500, unavailable = 503, bad_signature = 401,
      target_denied = 403, upstream_timeout = 504,
    }
    for code, status in pairs(expected) do
      assert.equal(status, errors.status(code), code)
    end
  end)

  it("maps unknown codes to 500", function()
    assert.equal(500, errors.status("no_such_code"))
    assert.is_false(errors.known("no_such_code"))
  end)

  it("returns status and JSON", function()
    local status, body = errors.response("forbidden", "scope exec required")
    assert.equal(403, status)
    assert.equal('{"error":{"code":"forbidden","message":"scope exec required"}}',
      body)
  end)

  it("registers a new code", function()
    errors.register("quota_exceeded", 402, "the account's quota is used up")
    assert.equal(402, errors.status("quota_exceeded"))
    assert.equal("the account's quota is used up",
      errors.body("quota_exceeded").error.message)
  end)

  it("raises on a bad registration", function()
    assert.has_error(function() errors.register("Bad Code", 400) end)
    assert.has_error(function() errors.register("ok_code", 200) end)
  end)

  it("raises on a non-string message", function()
    assert.has_error(function() errors.body("internal", {}) end)
  end)
end)
