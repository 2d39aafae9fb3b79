-- justavps.edge_sig, the shared v1 signing module, against the wire
-- contract written out by hand.
local core = require("justavps.core")
local edge_sig = require("justavps.edge_sig")

local crypto = core.crypto

local SECRET = "unit-secret-0123456789abcdef0123456789"

local FIELDS = {
  method = "GET",
  host = "3000-Spec-Machine.Example.test:8443",
  target = "/_port/3000/a%20b?q=1",
  target_ip = "2a01:4f8::10",
  target_port = "80",
  slug = "spec-machine",
  client_ip = "203.0.113.9",
  timestamp = "1700000000",
  nonce = "AbCdEfGhIjKlMnOp_-12",
  broker_id = "broker-eu-1",
}

local EXPECTED = "JUSTAVPS-HMAC-SHA256-V1\nGET\n"
  .. "3000-spec-machine.example.test:8443\n/_port/3000/a%20b?q=1\n"
  .. "2a01:4f8::10\n80\nspec-machine\n203.0.113.9\n1700000000\n"
  .. "AbCdEfGhIjKlMnOp_-12\nbroker-eu-1"


-- Returns a header list as req:header_list() gives it for headers.
local function list_of(headers)
  local list = {}
  for name, value in pairs(headers) do
    list[#list + 1] = { name, value }
  end
  return list
end


describe("edge_sig", function()
  it("builds the string to sign", function()
    assert.equal(EXPECTED, edge_sig.string_to_sign(FIELDS))
  end)

  it("signs with lowercase hex HMAC-SHA256", function()
    local expected = "v1=" .. crypto.hex_encode(
      crypto.hmac_sha256(SECRET, EXPECTED))
    assert.equal(expected, edge_sig.signature(SECRET, FIELDS))
  end)

  it("returns the eight headers from sign", function()
    local headers = edge_sig.sign(SECRET, FIELDS)
    local count = 0
    for _ in pairs(headers) do
      count = count + 1
    end
    assert.equal(8, count)
    assert.equal("2a01:4f8::10", headers["X-JustAVPS-Target-IP"])
    assert.equal("broker-eu-1", headers["X-JustAVPS-Broker"])
    assert.equal(edge_sig.signature(SECRET, FIELDS),
      headers["X-JustAVPS-Signature"])
  end)

  it("returns the same headers as lines", function()
    local headers = edge_sig.sign(SECRET, FIELDS)
    local lines = edge_sig.sign_lines(SECRET, FIELDS)
    local expected = {}
    for _, h in ipairs(edge_sig.HEADERS) do
      expected[#expected + 1] = h.name .. ": " .. headers[h.name] .. "\r\n"
    end
    assert.equal(table.concat(expected), lines)
  end)

  it("rejects an empty secret in sign_lines", function()
    assert.has_error(function()
      edge_sig.sign_lines("", FIELDS)
    end, "edge_sig.sign_lines: secret must be a non-empty string")
  end)

  it("fills a fresh nonce and the current time", function()
    local f = {}
    for k, v in pairs(FIELDS) do
      f[k] = v
    end
    f.nonce, f.timestamp = nil, nil
    local a = edge_sig.sign(SECRET, f)
    local b = edge_sig.sign(SECRET, f)
    assert.are_not.equal(a["X-JustAVPS-Nonce"], b["X-JustAVPS-Nonce"])
    assert.truthy(a["X-JustAVPS-Nonce"]:find("^[A-Za-z0-9_-]+$"))
    local ts = tonumber(a["X-JustAVPS-Timestamp"])
    assert.truthy(math.abs(ts - core.time()) < 5)
    assert.is_nil(f.nonce)
  end)

  it("parses and verifies what it signed", function()
    local headers = edge_sig.sign(SECRET, FIELDS)
    headers.Host = FIELDS.host
    local parsed = assert(edge_sig.parse(list_of(headers)))
    assert.equal("3000-spec-machine.example.test:8443", parsed.host)
    parsed.method, parsed.target = FIELDS.method, FIELDS.target
    assert.is_true(edge_sig.verify(SECRET, parsed, parsed.signature))
    assert.is_false(edge_sig.verify("x" .. SECRET, parsed, parsed.signature))
    parsed.target = "/_port/3000/a%20b?q=2"
    assert.is_false(edge_sig.verify(SECRET, parsed, parsed.signature))
  end)

  it("names a missing header", function()
    local headers = edge_sig.sign(SECRET, FIELDS)
    headers.Host = FIELDS.host
    headers["X-JustAVPS-Timestamp"] = nil
    local f, code, message = edge_sig.parse(list_of(headers))
    assert.is_nil(f)
    assert.equal("missing_header", code)
    assert.truthy(message:find("X-JustAVPS-Timestamp", 1, true))
  end)

  it("reads header names in any case", function()
    local headers = edge_sig.sign(SECRET, FIELDS)
    local lower = { host = FIELDS.host }
    for name, value in pairs(headers) do
      lower[name:lower()] = value
    end
    assert.is_table(edge_sig.parse(list_of(lower)))
  end)

  it("rejects a header sent twice", function()
    local headers = edge_sig.sign(SECRET, FIELDS)
    headers.Host = FIELDS.host
    local list = list_of(headers)
    list[#list + 1] = { "x-justavps-slug", "other-slug" }
    local f, code = edge_sig.parse(list)
    assert.is_nil(f)
    assert.equal("invalid_header", code)
  end)

  it("checks IP literals strictly", function()
    for _, ok in ipairs({ "1.2.3.4", "0.0.0.0", "::1", "2001:db8::1",
      "::ffff:10.0.0.1", "FE80::1" }) do
      assert.is_true(edge_sig.is_ip_literal(ok), ok)
    end
    for _, bad in ipairs({ "01.2.3.4", "1.2.3.04", "1.2.3", "1.2.3.4.5",
      "256.1.1.1", "::g", "fe80::1%lo", "[::1]", "host", "", "1.2.3.4 " }) do
      assert.is_false(edge_sig.is_ip_literal(bad), bad)
    end
  end)

  it("keeps no memory for values too long to be an address", function()
    -- The broker checks the target before the signature, so these come
    -- from anyone who can connect.
    collectgarbage()
    local before = collectgarbage("count")
    for i = 1, 2000 do
      assert.is_false(edge_sig.is_ip_literal(("1"):rep(10000) .. i))
    end
    collectgarbage()
    -- Kept, the values would take about 20 MB; the bound is 2 MiB.
    assert.is_true(collectgarbage("count") - before < 2048)
  end)

  -- Values per header: accepted ones, then rejected ones.
  local FORMATS = {
    { "X-JustAVPS-Target-Port", { "1", "80", "65535" },
      { "0", "080", "65536", "123456", "8a", "", " 80", "-1", "+80" } },
    { "X-JustAVPS-Slug", { "abc", "spec-machine", "a1-" .. ("b"):rep(36) },
      { "ab", "Spec", "a_b", "a.b", "sl\0g", ("a"):rep(41), "s\195\169g" } },
    { "X-JustAVPS-Timestamp", { "0", "1700000000", ("9"):rep(12) },
      { "01", ("9"):rep(13), "1.5", "", "1e9", "\1" } },
    { "X-JustAVPS-Nonce", { ("A"):rep(16), "aZ09_-" .. ("x"):rep(58) },
      { ("A"):rep(15), ("A"):rep(65), ("A"):rep(15) .. ".",
        ("A"):rep(15) .. "=", ("A"):rep(15) .. "\255" } },
    { "X-JustAVPS-Broker", { "b", "Broker.EU_1-a", ("b"):rep(64) },
      { ("b"):rep(65), "b/1", "b 1", "b:1" } },
    { "X-JustAVPS-Signature", { "v1=" .. ("0a"):rep(32) },
      { "v1=" .. ("0A"):rep(32), "v2=" .. ("0a"):rep(32),
        "v1=" .. ("0a"):rep(31), "v1=" .. ("0a"):rep(31) .. "0g",
        "V1=" .. ("0a"):rep(32) } },
  }

  for _, case in ipairs(FORMATS) do
    local name, good, bad = case[1], case[2], case[3]

    it("checks the format of " .. name, function()
      for _, value in ipairs(good) do
        local headers = edge_sig.sign(SECRET, FIELDS)
        headers.Host = FIELDS.host
        headers[name] = value
        local f, code, message = edge_sig.parse(list_of(headers))
        assert.is_table(f, name .. ": " .. value .. ": " .. tostring(message))
        assert.is_nil(code)
      end
      for _, value in ipairs(bad) do
        local headers = edge_sig.sign(SECRET, FIELDS)
        headers.Host = FIELDS.host
        headers[name] = value
        local f, code, message = edge_sig.parse(list_of(headers))
        assert.is_nil(f, name .. ": " .. value)
        assert.equal("invalid_header", code, name .. ": " .. value)
        assert.truthy(message:find(name, 1, true))
      end
    end)
  end

  it("lists the eight header names in HEADER_SET", function()
    local count = 0
    for name in pairs(edge_sig.HEADER_SET) do
      assert.equal(name:lower(), name)
      count = count + 1
    end
    assert.equal(8, count)
    assert.is_true(edge_sig.HEADER_SET["x-justavps-signature"])
  end)
end)
