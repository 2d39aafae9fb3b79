-- justavps.auth.apikey: key format, Authorization parsing, hashing and
-- scopes.
local apikey = require("justavps.auth.apikey")

-- python3: hashlib.sha256(b"sk_live_" + b"A" * 43).hexdigest()
local FIXED_KEY = "sk_live_" .. ("A"):rep(43)
local FIXED_HASH =
  "5647bdab3eff6c5d42956a5199554c4a9b22c23748447c87729bd3f0adc62d22"


describe("apikey.generate", function()
  it("makes sk_live_ and 43 url-safe characters", function()
    local new = assert(apikey.generate())
    assert.equal(51, #new.key)
    assert.matches("^sk_live_[A-Za-z0-9_-]+$", new.key)
    assert.equal(new.key:sub(1, 12), new.prefix)
    assert.equal(apikey.hash(new.key), new.hash)
    assert.matches("^%x+$", new.hash)
    assert.equal(64, #new.hash)
  end)

  it("makes a different key each time", function()
    local seen = {}
    for _ = 1, 100 do
      local key = assert(apikey.generate()).key
      assert.is_nil(seen[key])
      seen[key] = true
    end
  end)

  it("makes keys that parse", function()
    local new = assert(apikey.generate())
    local prefix, key = apikey.parse("Bearer " .. new.key)
    assert.equal(new.prefix, prefix)
    assert.equal(new.key, key)
  end)
end)


describe("apikey.hash", function()
  it("is the hex SHA-256 of the key", function()
    assert.equal(FIXED_HASH, apikey.hash(FIXED_KEY))
  end)
end)


describe("apikey.parse", function()
  it("returns the prefix and the key", function()
    local prefix, key = apikey.parse("Bearer " .. FIXED_KEY)
    assert.equal("sk_live_AAAA", prefix)
    assert.equal(FIXED_KEY, key)
  end)

  it("accepts the scheme in any case", function()
    for _, scheme in ipairs({ "bearer", "BEARER", "bEaReR" }) do
      local _, key = apikey.parse(scheme .. " " .. FIXED_KEY)
      assert.equal(FIXED_KEY, key, scheme)
    end
  end)

  it("accepts extra spaces as RFC 7235 allows", function()
    local _, key = apikey.parse("Bearer   " .. FIXED_KEY)
    assert.equal(FIXED_KEY, key)
    _, key = apikey.parse("  Bearer " .. FIXED_KEY .. " \t")
    assert.equal(FIXED_KEY, key)
  end)

  it("reports a missing or empty header", function()
    local prefix, message, code = apikey.parse(nil)
    assert.is_nil(prefix)
    assert.equal("missing_authorization", code)
    assert.equal("Authorization header is missing", message)

    for _, value in ipairs({ "", "   " }) do
      local empty, _, empty_code = apikey.parse(value)
      assert.is_nil(empty)
      assert.equal("missing_authorization", empty_code)
    end
  end)

  it("rejects other schemes", function()
    local cases = {
      "Basic dXNlcjpwYXNz",
      "Token " .. FIXED_KEY,
      FIXED_KEY,
      "Bearer\t" .. FIXED_KEY,
      "Bearer:" .. FIXED_KEY,
    }
    for _, value in ipairs(cases) do
      local prefix, message, code = apikey.parse(value)
      assert.is_nil(prefix, value)
      assert.equal("unsupported_scheme", code, value)
      assert.is_nil(message:find(FIXED_KEY, 1, true), value)
    end
  end)

  it("rejects malformed keys", function()
    local random = ("A"):rep(43)
    local cases = {
      { "Bearer", "no token" },
      { "Bearer sk_test_" .. random, "test prefix" },
      { "Bearer SK_LIVE_" .. random, "uppercase prefix" },
      { "Bearer pk_live_" .. random, "other prefix" },
      { "Bearer sk_live_" .. random:sub(2), "short" },
      { "Bearer sk_live_" .. random .. "A", "long" },
      { "Bearer sk_live_", "prefix only" },
      { "Bearer sk_live_" .. random:sub(2) .. "+", "plus" },
      { "Bearer sk_live_" .. random:sub(2) .. "=", "padding" },
      { "Bearer sk_live_" .. random:sub(2) .. ".", "dot" },
      { "Bearer sk_live_" .. random:sub(2) .. "\0", "NUL" },
      { "Bearer sk_live_" .. random:sub(3) .. "é", "non-ASCII" },
      { "Bearer " .. FIXED_KEY .. " extra", "trailing word" },
      { "Bearer " .. FIXED_KEY .. ", Basic x", "two credentials" },
      { "Bearer " .. ("A"):rep(2000), "over 1024 bytes" },
    }
    for _, case in ipairs(cases) do
      local prefix, message, code = apikey.parse(case[1])
      assert.is_nil(prefix, case[2])
      assert.equal("invalid_api_key", code, case[2])
      assert.is_nil(message:find(random, 1, true), case[2])
    end
  end)

  it("names the expected length", function()
    local _, message = apikey.parse("Bearer sk_live_abc")
    assert.equal("API key must be 51 characters, got 11", message)
  end)

  it("raises on a header that is not a string", function()
    assert.has_error(function()
      apikey.parse(42)
    end, "apikey.parse: header value must be a string or nil, got number")
  end)
end)


describe("apikey.verify", function()
  it("accepts the key of a stored hash", function()
    assert.is_true(apikey.verify(FIXED_KEY, FIXED_HASH))
  end)

  it("rejects anything else", function()
    local other = "sk_live_" .. ("B"):rep(43)
    assert.is_false(apikey.verify(other, FIXED_HASH))
    assert.is_false(apikey.verify(FIXED_KEY, FIXED_HASH:upper()))
    assert.is_false(apikey.verify(FIXED_KEY, FIXED_HASH:sub(1, 63)))
    assert.is_false(apikey.verify(FIXED_KEY, ""))
    assert.is_false(apikey.verify(nil, FIXED_HASH))
    assert.is_false(apikey.verify(FIXED_KEY, nil))
  end)
end)


describe("apikey.validate_scopes", function()
  it("sorts scopes and drops duplicates", function()
    local scopes = apikey.validate_scopes({ "proxy", "read", "read", "write" })
    assert.same({ "read", "write", "proxy" }, scopes)
  end)

  it("accepts every scope", function()
    assert.same(apikey.SCOPES, apikey.validate_scopes({ "exec", "delete",
      "proxy", "write", "read" }))
  end)

  it("names an unknown scope", function()
    local scopes, message, code = apikey.validate_scopes({ "read", "admin" })
    assert.is_nil(scopes)
    assert.equal("invalid_scope", code)
    assert.equal('unknown scope "admin"; expected one of: read, write, '
      .. "delete, exec, proxy", message)
  end)

  it("rejects scopes in another case or type", function()
    for _, scope in ipairs({ "READ", " read", "", 1, true }) do
      local _, _, code = apikey.validate_scopes({ scope })
      assert.equal("invalid_scope", code, tostring(scope))
    end
  end)

  it("cuts a long unknown scope in the message", function()
    local _, message = apikey.validate_scopes({ ("x"):rep(500) })
    assert.is_true(#message < 150)
  end)

  it("requires at least one scope", function()
    for _, value in ipairs({ {}, "read" }) do
      local scopes, _, code = apikey.validate_scopes(value)
      assert.is_nil(scopes)
      assert.equal("empty_scopes", code)
    end
    local _, _, code = apikey.validate_scopes(nil)
    assert.equal("empty_scopes", code)
  end)
end)


describe("apikey.has_scope", function()
  it("matches exactly", function()
    assert.is_true(apikey.has_scope({ "read", "exec" }, "exec"))
    assert.is_false(apikey.has_scope({ "read" }, "exec"))
  end)

  it("implies no other scope", function()
    assert.is_false(apikey.has_scope({ "write" }, "read"))
    assert.is_false(apikey.has_scope({ "write", "delete", "exec" }, "proxy"))
  end)

  it("is false for a missing list", function()
    assert.is_false(apikey.has_scope(nil, "read"))
    assert.is_false(apikey.has_scope({}, "read"))
  end)
end)
