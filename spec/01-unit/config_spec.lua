local config = require("justavps.config")
local json = require("justavps.json")

local declaration = {
  fields = {
    { broker = { type = "record", fields = {
      { id = { type = "string", required = true, match = "^[a-z0-9-]+$",
        description = "broker id the edge signs for" } },
      { listen = { type = "record", fields = {
        { host = { type = "string", default = "127.0.0.1" } },
        { port = { type = "integer", between = { 1, 65535 },
          default = 8443 } },
      } } },
      { nonce_ttl = { type = "duration", default = "2m" } },
      { max_body = { type = "size", default = "16M" } },
      { ratio = { type = "number", min = 0, max = 1, default = 0.5 } },
      { strict = { type = "boolean", default = true } },
    } } },
    { log_level = { type = "string", one_of = { "debug", "info", "warn" },
      default = "info" } },
    { domains = { type = "array", elements = { type = "string" },
      default = {}, len_max = 3 } },
    { ports = { type = "array", elements = { type = "integer", min = 1 } } },
    { limits = { type = "map", values = { type = "integer", min = 0 } } },
  },
}

local schema = config.schema(declaration)

local function env_from(t)
  return function(name)
    return t[name]
  end
end

local function load(data, env)
  return config.load({ schema = schema, data = data,
    getenv = env_from(env or {}) })
end

local function tmpfile(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end


describe("config", function()
  it("applies defaults", function()
    local c = assert(load({ broker = { id = "b-1" } }))
    assert.equal("b-1", c.broker.id)
    assert.equal("127.0.0.1", c.broker.listen.host)
    assert.equal(8443, c.broker.listen.port)
    assert.equal(120, c.broker.nonce_ttl)
    assert.equal(16 * 1024 * 1024, c.broker.max_body)
    assert.equal(0.5, c.broker.ratio)
    assert.is_true(c.broker.strict)
    assert.equal("info", c.log_level)
    assert.same({}, c.domains)
    assert.is_nil(c.ports)
  end)

  it("keeps given values", function()
    local c = assert(load({
      broker = { id = "b-2", listen = { port = 9000 }, nonce_ttl = 30,
        strict = false },
      domains = { "a.example", "b.example" },
      limits = { ["team.a"] = 3 },
    }))
    assert.equal(9000, c.broker.listen.port)
    assert.equal(30, c.broker.nonce_ttl)
    assert.is_false(c.broker.strict)
    assert.same({ "a.example", "b.example" }, c.domains)
    assert.equal(3, c.limits["team.a"])
  end)

  it("does not change its input", function()
    local data = { broker = { id = "b-3" } }
    assert(load(data))
    assert.same({ broker = { id = "b-3" } }, data)
  end)

  it("names the full path of a bad value", function()
    local c, err, code = load({ broker = { id = "b", listen = { port = 0 } } })
    assert.is_nil(c)
    assert.equal("invalid_config", code)
    assert.matches("broker.listen.port: expected integer between 1 and "
      .. "65535, got 0", err, 1, true)
  end)

  it("lists all errors, not just the first", function()
    local _, err, _, errors = load({
      broker = { listen = { port = "x" }, ratio = 2 },
      log_level = "loud",
      extra = true,
    })
    local paths = {}
    for _, e in ipairs(errors) do
      paths[e.path] = e.message
    end
    assert.equal("required key is missing", paths["broker.id"])
    assert.equal('expected integer between 1 and 65535, got "x"',
      paths["broker.listen.port"])
    assert.equal("expected number at least 0 at most 1, got 2",
      paths["broker.ratio"])
    assert.equal('expected string one of debug, info, warn, got "loud"',
      paths.log_level)
    assert.equal("unknown key", paths.extra)
    assert.equal(5, #errors)
    assert.matches("extra: unknown key", err, 1, true)
  end)

  it("rejects unknown nested keys with their path", function()
    local _, _, _, errors = load({ broker = { id = "b", listen = { prot = 1 } } })
    assert.equal("broker.listen.prot", errors[1].path)
    assert.equal("unknown key", errors[1].message)
  end)

  local bad_values = {
    { "a string for a boolean", { strict = "yes" }, "broker.strict" },
    { "a fraction for an integer", { listen = { port = 80.5 } },
      "broker.listen.port" },
    { "a bad duration", { nonce_ttl = "soon" }, "broker.nonce_ttl" },
    { "a negative duration", { nonce_ttl = -1 }, "broker.nonce_ttl" },
    { "a bad size", { max_body = "lots" }, "broker.max_body" },
    { "a pattern mismatch", { id = "B_1" }, "broker.id" },
    { "an array for a record", { listen = { 1, 2 } }, "broker.listen" },
    { "a string for a record", { listen = "0.0.0.0:80" }, "broker.listen" },
  }

  for _, case in ipairs(bad_values) do
    it("rejects " .. case[1], function()
      local broker = { id = "b" }
      for k, v in pairs(case[2]) do
        broker[k] = v
      end
      local c, _, code, errors = load({ broker = broker })
      assert.is_nil(c)
      assert.equal("invalid_config", code)
      assert.equal(case[3], errors[1].path)
    end)
  end

  it("names array elements by index", function()
    local _, _, _, errors = load({ broker = { id = "b" },
      ports = { 80, "x", -1 } })
    assert.equal("ports[2]", errors[1].path)
    assert.equal("ports[3]", errors[2].path)
  end)

  it("checks array length", function()
    local _, _, _, errors = load({ broker = { id = "b" },
      domains = { "a", "b", "c", "d" } })
    assert.equal("domains", errors[1].path)
    assert.matches("of length at most 3", errors[1].message)
  end)

  it("describes a pattern in words when the field has match_text",
    function()
      local email_schema = config.schema({ fields = {
        { email = { type = "string", match = "^[^@]+@[^@]+$",
          match_text = "an email address" } },
      } })
      local c, err = config.validate(email_schema, { email = "nobody" })
      assert.is_nil(c)
      assert.matches("that is an email address", err, 1, true)
      assert.falsy(err:find("^[^@]", 1, true), err)
    end)

  it("names odd map keys in brackets", function()
    local _, _, _, errors = load({ broker = { id = "b" },
      limits = { ["a.b"] = -1, plain = "x" } })
    local paths = {}
    for _, e in ipairs(errors) do
      paths[e.path] = true
    end
    assert.is_true(paths['limits["a.b"]'])
    assert.is_true(paths["limits.plain"])
    assert.equal(2, #errors)
  end)

  it("rejects an array for a map", function()
    local _, _, _, errors = load({ broker = { id = "b" }, limits = { 1 } })
    assert.equal("limits", errors[1].path)
  end)

  it("treats JSON null as absent", function()
    local c = assert(load({ broker = { id = "b", listen = { port = json.null } } }))
    assert.equal(8443, c.broker.listen.port)
  end)

  describe("environment", function()
    it("overrides a nested key", function()
      local c = assert(load({ broker = { id = "b" } },
        { JUSTAVPS_BROKER_LISTEN_PORT = "9443" }))
      assert.equal(9443, c.broker.listen.port)
    end)

    it("names the variable of a bad override", function()
      local _, err = load({ broker = { id = "b" } },
        { JUSTAVPS_BROKER_LISTEN_PORT = "abc" })
      assert.matches('broker.listen.port (from JUSTAVPS_BROKER_LISTEN_PORT): '
        .. 'expected integer between 1 and 65535, got "abc"', err, 1, true)
    end)

    it("parses booleans, durations and lists", function()
      local c = assert(load({}, {
        JUSTAVPS_BROKER_ID = "from-env",
        JUSTAVPS_BROKER_STRICT = "no",
        JUSTAVPS_BROKER_NONCE_TTL = "90s",
        JUSTAVPS_DOMAINS = "a.example, b.example",
        JUSTAVPS_PORTS = "[80, 443]",
        JUSTAVPS_LIMITS = '{"x": 1}',
      }))
      assert.equal("from-env", c.broker.id)
      assert.is_false(c.broker.strict)
      assert.equal(90, c.broker.nonce_ttl)
      assert.same({ "a.example", "b.example" }, c.domains)
      assert.same({ 80, 443 }, c.ports)
      assert.equal(1, c.limits.x)
    end)

    it("converts comma lists to the element type", function()
      local c = assert(load({ broker = { id = "b" } },
        { JUSTAVPS_PORTS = "80,443" }))
      assert.same({ 80, 443 }, c.ports)
    end)

    it("reports invalid JSON in an override", function()
      local c, err = load({ broker = { id = "b" } },
        { JUSTAVPS_LIMITS = "{x" })
      assert.is_nil(c)
      assert.matches("limits (from JUSTAVPS_LIMITS): json decode", err, 1,
        true)
    end)

    it("lists the variables a schema accepts", function()
      local names = {}
      for _, v in ipairs(config.env_variables(schema)) do
        names[#names + 1] = v.name
      end
      assert.same({
        "JUSTAVPS_BROKER_ID", "JUSTAVPS_BROKER_LISTEN_HOST",
        "JUSTAVPS_BROKER_LISTEN_PORT", "JUSTAVPS_BROKER_NONCE_TTL",
        "JUSTAVPS_BROKER_MAX_BODY", "JUSTAVPS_BROKER_RATIO",
        "JUSTAVPS_BROKER_STRICT", "JUSTAVPS_LOG_LEVEL", "JUSTAVPS_DOMAINS",
        "JUSTAVPS_PORTS", "JUSTAVPS_LIMITS",
      }, names)
    end)

    it("uses another prefix", function()
      local c = assert(config.load({ schema = schema, env_prefix = "JV",
        getenv = env_from({ JV_BROKER_ID = "jv" }) }))
      assert.equal("jv", c.broker.id)
    end)

    it("raises when two keys map to one variable", function()
      assert.has_error(function()
        config.schema({ fields = {
          { a_b = { type = "string" } },
          { a = { type = "record", fields = { { b = { type = "string" } } } } },
        } })
      end)
    end)
  end)

  describe("files", function()
    it("loads a JSON file", function()
      local path = tmpfile('{"broker":{"id":"file-b"}}')
      local c = assert(config.load({ schema = schema, path = path,
        getenv = env_from({}) }))
      os.remove(path)
      assert.equal("file-b", c.broker.id)
    end)

    it("lets the environment win over the file", function()
      local path = tmpfile('{"broker":{"id":"file-b"}}')
      local c = assert(config.load({ schema = schema, path = path,
        getenv = env_from({ JUSTAVPS_BROKER_ID = "env-b" }) }))
      os.remove(path)
      assert.equal("env-b", c.broker.id)
    end)

    it("reports a missing file", function()
      local c, err, code = config.load({ schema = schema,
        path = "/nonexistent/justavps.json" })
      assert.is_nil(c)
      assert.equal("read_failed", code)
      assert.matches("/nonexistent/justavps.json", err, 1, true)
    end)

    it("reports invalid JSON with the file name", function()
      local path = tmpfile('{"broker":')
      local c, err, code = config.load({ schema = schema, path = path })
      os.remove(path)
      assert.is_nil(c)
      assert.equal("invalid_json", code)
      assert.matches(path, err, 1, true)
    end)

    it("rejects a file that is not an object", function()
      local path = tmpfile('[1]')
      local c, _, code = config.load({ schema = schema, path = path })
      os.remove(path)
      assert.is_nil(c)
      assert.equal("invalid_config", code)
    end)
  end)

  describe("result", function()
    local c

    before_each(function()
      c = assert(load({ broker = { id = "b" } }))
    end)

    it("raises on reads of undeclared keys", function()
      assert.has_error(function() return c.broker.lisen end)
    end)

    it("returns nil for declared keys without value", function()
      assert.is_nil(c.ports)
    end)

    it("raises on new keys", function()
      assert.has_error(function() c.broker.new_key = 1 end)
      assert.has_error(function() c.domains[1] = "x" end)
    end)

    it("encodes back to JSON with arrays kept", function()
      assert.matches('"domains":[]', json.encode(c), 1, true)
    end)
  end)

  describe("schema", function()
    local bad = {
      { "an unknown type", { { a = { type = "text" } } } },
      { "an array without elements", { { a = { type = "array" } } } },
      { "a map without values", { { a = { type = "map" } } } },
      { "a bad between", { { a = { type = "integer", between = { 1 } } } } },
      { "a duplicate field", { { a = { type = "string" } },
        { a = { type = "string" } } } },
      { "two names in one entry", { { a = { type = "string" },
        b = { type = "string" } } } },
      { "a default that fails its field",
        { { a = { type = "integer", default = "x" } } } },
    }

    for _, case in ipairs(bad) do
      it("raises on " .. case[1], function()
        assert.has_error(function() config.schema({ fields = case[2] }) end)
      end)
    end

    it("raises when load has no schema", function()
      assert.has_error(function() config.load({}) end)
    end)
  end)
end)


describe("config.from_strings", function()
  local typed = config.schema({ fields = {
    { attempts = { type = "integer", default = 3 } },
    { verbose = { type = "boolean", default = false } },
    { name = { type = "string", default = "x" } },
  } })

  it("converts values by field type", function()
    local out = config.from_strings(typed, { attempts = "5",
      verbose = "yes", name = "42" })
    assert.equal(5, out.attempts)
    assert.is_true(out.verbose)
    assert.equal("42", out.name)
  end)

  it("leaves unknown and bad values for validate", function()
    local out = config.from_strings(typed, { attempts = "many",
      extra = "1" })
    assert.equal("many", out.attempts)
    assert.equal("1", out.extra)
    local valid, err = config.validate(typed, out)
    assert.is_nil(valid)
    assert.truthy(err:find("attempts", 1, true))
    assert.truthy(err:find("extra", 1, true))
  end)
end)
