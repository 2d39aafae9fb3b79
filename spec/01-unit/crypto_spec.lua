-- core.crypto against published vectors. Every expected value below comes
-- from a standard's test vectors or from python3's hashlib/hmac/base64,
-- never from the code under test.
local cjson = require("cjson")
local fixtures = require("support.fixtures")
local core = require("justavps.core")
local helpers = require("spec.support.helpers")

local crypto = core.crypto

local function hex(s)
  return crypto.hex_encode(s)
end

-- Decodes hex without the code under test, so a broken hex_decode cannot
-- hide a broken digest.
local function unhex(s)
  return (s:gsub("..", function(pair)
    return string.char(tonumber(pair, 16))
  end))
end

local function read_fixture(name)
  return fixtures.read(name)
end


describe("crypto.hmac_sha256", function()
  local fixture = cjson.decode(read_fixture("hmac_sha256_rfc4231.json"))

  it("loads every RFC 4231 case from the fixture", function()
    assert.equal(6, #fixture.cases)
  end)

  for _, case in ipairs(fixture.cases) do
    it("matches RFC 4231 case " .. case.test_case, function()
      local key = unhex(case.key_hex)
      local data = unhex(case.data_hex)

      assert.equal(case.key_length, #key)
      assert.equal(case.data_length, #data)
      if case.data_ascii then
        assert.equal(case.data_ascii, data)
      end

      local mac = crypto.hmac_sha256(key, data)
      assert.equal(32, #mac)
      assert.equal(case.expected_hex, hex(mac))
    end)
  end

  -- crypto.hmac_sha256 keeps keyed contexts for up to 16 keys of at most
  -- 256 bytes; these cases cross both limits.
  it("stays right as its key cache turns over", function()
    local first = fixture.cases[1]
    local key = unhex(first.key_hex)
    local data = unhex(first.data_hex)
    for round = 1, 3 do
      for i = 1, 40 do
        crypto.hmac_sha256(("k"):rep(i) .. round, "filler")
      end
      assert.equal(first.expected_hex, hex(crypto.hmac_sha256(key, data)))
    end
  end)

  it("hashes keys longer than a block first", function()
    -- RFC 2104: a key longer than the 64-byte block is replaced by its
    -- hash, so both must give the same MAC. The 300-byte key also takes
    -- the uncached path.
    for _, length in ipairs({ 65, 200, 256, 257, 300 }) do
      local long = ("x"):rep(length)
      assert.equal(hex(crypto.hmac_sha256(crypto.sha256(long), "msg")),
        hex(crypto.hmac_sha256(long, "msg")), "key of " .. length)
    end
  end)

  it("accepts an empty key and message", function()
    -- python3: hmac.new(b"", b"", "sha256").hexdigest()
    assert.equal("b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad",
      hex(crypto.hmac_sha256("", "")))
  end)

  it("raises on non-string arguments", function()
    assert.has_error(function() crypto.hmac_sha256(nil, "x") end)
    assert.has_error(function() crypto.hmac_sha256("k", 42) end)
    assert.has_error(function() crypto.hmac_sha256("k") end)
  end)
end)


describe("crypto.hmac_sha256_join", function()
  local fixture = cjson.decode(read_fixture("hmac_sha256_rfc4231.json"))

  -- Splits s at each occurrence of sep.
  local function split(s, sep)
    local parts, from = {}, 1
    while true do
      local at = s:find(sep, from, true)
      if not at then
        parts[#parts + 1] = s:sub(from)
        return parts
      end
      parts[#parts + 1] = s:sub(from, at - 1)
      from = at + #sep
    end
  end

  it("matches RFC 4231 split at spaces",
    function()
      local checked = 0
      for _, case in ipairs(fixture.cases) do
        if case.data_ascii and case.data_ascii:find(" ", 1, true)
            and not case.truncate_to_bits then
          local parts = split(case.data_ascii, " ")
          assert.is_true(#parts > 1)
          assert.equal(case.expected_hex, crypto.hmac_sha256_join(
            unhex(case.key_hex), " ", unpack(parts)), case.test_case)
          checked = checked + 1
        end
      end
      assert.is_true(checked >= 2)
    end)

  it("matches hmac_sha256 across chunks",
    function()
      -- Fields and separators shorter than, equal to and longer than the
      -- chunk the fields are copied through.
      local fields = { "", "a", ("b"):rep(511), ("c"):rep(512), ("d"):rep(513),
        ("e"):rep(2000), "f" }
      for _, sep in ipairs({ "", "\n", ("-"):rep(600) }) do
        for _, key in ipairs({ "k", ("K"):rep(256) }) do
          assert.equal(hex(crypto.hmac_sha256(key, table.concat(fields, sep))),
            crypto.hmac_sha256_join(key, sep, unpack(fields)),
            "separator of " .. #sep .. ", key of " .. #key)
        end
      end
    end)

  it("takes numbers and one field", function()
    assert.equal(hex(crypto.hmac_sha256("key", "443\n1700000000")),
      crypto.hmac_sha256_join("key", "\n", 443, 1700000000))
    assert.equal(hex(crypto.hmac_sha256("key", "only")),
      crypto.hmac_sha256_join("key", ",", "only"))
  end)

  it("signs with empty and long keys",
    function()
      for _, key in ipairs({ "", ("z"):rep(257), ("y"):rep(5000) }) do
        assert.equal(hex(crypto.hmac_sha256(key, "a\nb\nc")),
          crypto.hmac_sha256_join(key, "\n", "a", "b", "c"),
          "key of " .. #key)
      end
    end)

  it("raises on missing or bad fields", function()
    assert.has_error(function() crypto.hmac_sha256_join("k", "\n") end)
    assert.has_error(function()
      crypto.hmac_sha256_join("k", "\n", "a", {})
    end)
    assert.has_error(function()
      crypto.hmac_sha256_join("k", "\n", "a", nil, "c")
    end)
    assert.has_error(function() crypto.hmac_sha256_join(nil, "\n", "a") end)
    -- The cached key still signs correctly after the raises.
    assert.equal(hex(crypto.hmac_sha256("k", "a")),
      crypto.hmac_sha256_join("k", "\n", "a"))
  end)
end)


describe("crypto.sha256", function()
  -- The FIPS 180-2 example messages plus the empty string, with digests
  -- recomputed by python3 hashlib.
  local vectors = {
    { "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
    { "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
    { "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
      "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
    { string.rep("a", 1000000),
      "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0" },
  }

  it("matches the FIPS 180-2 vectors", function()
    for _, v in ipairs(vectors) do
      local digest = crypto.sha256(v[1])
      assert.equal(32, #digest)
      assert.equal(v[2], hex(digest))
    end
  end)

  it("hashes binary data with NUL bytes", function()
    -- python3: hashlib.sha256(b"a\0b").hexdigest()
    assert.equal("59b271ae1bbcb1d31d41929817f4b16fb439eb4f31520b5ad1d5ce98920a7138",
      hex(crypto.sha256("a\0b")))
  end)

  it("raises on a number", function()
    assert.has_error(function() crypto.sha256(123) end)
  end)
end)


describe("crypto.sha256_new", function()
  it("matches the one-shot digest across pieces", function()
    local h = crypto.sha256_new()
    for _ = 1, 1000 do
      h:update(string.rep("a", 1000))
    end
    assert.equal("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
      hex(h:final()))
  end)

  it("chains update calls", function()
    local digest = crypto.sha256_new():update("a"):update(""):update("bc"):final()
    assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
      hex(digest))
  end)

  it("hashes nothing as the empty string", function()
    assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
      hex(crypto.sha256_new():final()))
  end)

  it("raises after final", function()
    local h = crypto.sha256_new()
    h:final()
    assert.has_error(function() h:update("x") end)
    assert.has_error(function() h:final() end)
  end)

  it("raises on a non-string update", function()
    local h = crypto.sha256_new()
    assert.has_error(function() h:update(1) end)
  end)
end)


describe("crypto.sha1", function()
  it("matches the FIPS 180-2 abc vector", function()
    assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", hex(crypto.sha1("abc")))
  end)

  it("computes the RFC 6455 WebSocket accept example", function()
    local key = "dGhlIHNhbXBsZSBub25jZQ=="
    local guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    assert.equal("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
      crypto.base64_encode(crypto.sha1(key .. guid)))
  end)
end)


describe("crypto.hex", function()
  it("encodes lowercase", function()
    assert.equal("00ff10abcdef", crypto.hex_encode("\0\255\16\171\205\239"))
    assert.equal("", crypto.hex_encode(""))
  end)

  it("round-trips every byte value", function()
    local bytes = {}
    for i = 0, 255 do
      bytes[#bytes + 1] = string.char(i)
    end
    local all = table.concat(bytes)
    assert.equal(all, crypto.hex_decode(crypto.hex_encode(all)))
  end)

  it("decodes uppercase digits", function()
    assert.equal("\171\205", crypto.hex_decode("ABcd"))
  end)

  it("rejects an odd length", function()
    local ok, err, code = crypto.hex_decode("abc")
    assert.is_nil(ok)
    assert.equal("invalid", code)
    assert.matches("odd length 3", err, 1, true)
  end)

  it("rejects a non-hex character", function()
    local ok, err, code = crypto.hex_decode("a0g1")
    assert.is_nil(ok)
    assert.equal("invalid", code)
    assert.matches("offset 2", err, 1, true)
  end)

  it("rejects whitespace and a 0x prefix", function()
    assert.is_nil((crypto.hex_decode(" a0 ")))
    assert.is_nil((crypto.hex_decode("0xab")))
  end)
end)


describe("crypto.base64", function()
  -- The RFC 4648 test vectors, recomputed by python3 base64.
  local vectors = {
    { "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" }, { "foo", "Zm9v" },
    { "foob", "Zm9vYg==" }, { "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" },
  }

  it("matches the RFC 4648 vectors", function()
    for _, v in ipairs(vectors) do
      assert.equal(v[2], crypto.base64_encode(v[1]))
      assert.equal(v[1], crypto.base64_decode(v[2]))
    end
  end)

  it("uses + and / and keeps padding", function()
    assert.equal("+/+/", crypto.base64_encode("\251\255\191"))
    assert.equal("/w==", crypto.base64_encode("\255"))
  end)

  it("round-trips random data of many lengths", function()
    for n = 1, 70 do
      local data = crypto.random_bytes(n)
      assert.equal(data, crypto.base64_decode(crypto.base64_encode(data)))
    end
  end)

  local bad = {
    { "Zg=", "not a multiple of 4" },
    { "Zg", "not a multiple of 4" },
    { "Zm9v\n", "not a multiple of 4" },
    { "Zm9*", "offset 3" },
    { "Z===", "offset 1" },
    { "Zg==Zg==", "offset 2" },
    { "Zh==", "non-zero bits" },
    { "Zm9=", "non-zero bits" },
    { "-_-_", "offset 0" },
  }

  for _, case in ipairs(bad) do
    it("rejects " .. string.format("%q", case[1]), function()
      local ok, err, code = crypto.base64_decode(case[1])
      assert.is_nil(ok)
      assert.equal("invalid", code)
      assert.matches(case[2], err, 1, true)
    end)
  end
end)


describe("crypto.base64url", function()
  it("uses - and _ without padding", function()
    assert.equal("-_-_", crypto.base64url_encode("\251\255\191"))
    assert.equal("_w", crypto.base64url_encode("\255"))
    assert.equal("Zm8", crypto.base64url_encode("fo"))
    assert.equal("", crypto.base64url_encode(""))
  end)

  it("decodes with or without padding", function()
    assert.equal("\255", crypto.base64url_decode("_w"))
    assert.equal("\255", crypto.base64url_decode("_w=="))
    assert.equal("fo", crypto.base64url_decode("Zm8"))
    assert.equal("fo", crypto.base64url_decode("Zm8="))
    assert.equal("foobar", crypto.base64url_decode("Zm9vYmFy"))
  end)

  it("round-trips random data of many lengths", function()
    for n = 1, 70 do
      local data = crypto.random_bytes(n)
      local encoded = crypto.base64url_encode(data)
      assert.is_nil(encoded:find("[^A-Za-z0-9_-]"))
      assert.equal(data, crypto.base64url_decode(encoded))
    end
  end)

  local bad = {
    { "Z", "single character" },
    { "Zm9vY", "single character" },
    { "+/+/", "URL-safe alphabet" },
    { "Zg=", "padding" },
    { "Z=g=", "offset 1" },
    { "Zm9v!", "single character" },
    { "Zm9v!A", "offset 4" },
    { "_x", "non-zero bits" },
  }

  for _, case in ipairs(bad) do
    it("rejects " .. string.format("%q", case[1]), function()
      local ok, err, code = crypto.base64url_decode(case[1])
      assert.is_nil(ok)
      assert.equal("invalid", code)
      assert.matches(case[2], err, 1, true)
    end)
  end
end)


describe("crypto.constant_time_equal", function()
  it("compares equal strings", function()
    assert.is_true(crypto.constant_time_equal("", ""))
    assert.is_true(crypto.constant_time_equal("abc", "abc"))
    assert.is_true(crypto.constant_time_equal("a\0b", "a\0b"))
  end)

  it("compares different strings", function()
    assert.is_false(crypto.constant_time_equal("abc", "abd"))
    assert.is_false(crypto.constant_time_equal("a\0b", "a\0c"))
    assert.is_false(crypto.constant_time_equal("xbc", "abc"))
  end)

  it("returns false for different lengths", function()
    assert.is_false(crypto.constant_time_equal("abc", "abcd"))
    assert.is_false(crypto.constant_time_equal("", "a"))
  end)

  it("raises on non-strings", function()
    assert.has_error(function() crypto.constant_time_equal("a", nil) end)
    assert.has_error(function() crypto.constant_time_equal(1, 1) end)
  end)
end)


describe("crypto.random_bytes", function()
  it("returns the requested length", function()
    for _, n in ipairs({ 1, 16, 32, 1000, 65536 }) do
      assert.equal(n, #crypto.random_bytes(n))
    end
  end)

  it("does not repeat", function()
    local seen = {}
    for _ = 1, 1000 do
      local value = crypto.random_bytes(16)
      assert.is_nil(seen[value])
      seen[value] = true
    end
  end)

  it("uses every byte value", function()
    local data = crypto.random_bytes(65536)
    local counts = {}
    for i = 1, #data do
      local b = data:byte(i)
      counts[b] = (counts[b] or 0) + 1
    end
    -- About 256 of each is expected; under 100 would be far outside
    -- chance for a uniform source.
    for b = 0, 255 do
      assert.is_true((counts[b] or 0) > 100, "byte " .. b .. " is rare")
    end
  end)

  it("raises on a size out of range", function()
    assert.has_error(function() crypto.random_bytes(0) end)
    assert.has_error(function() crypto.random_bytes(65537) end)
    assert.has_error(function() crypto.random_bytes(1.5) end)
    assert.has_error(function() crypto.random_bytes(-1) end)
    assert.has_error(function() crypto.random_bytes(0 / 0) end)
    assert.has_error(function() crypto.random_bytes("x") end)
  end)
end)


describe("crypto.random_token", function()
  it("returns URL-safe characters of the requested length", function()
    for _, n in ipairs({ 1, 16, 43, 64, 4096 }) do
      local token = crypto.random_token(n)
      assert.equal(n, #token)
      assert.is_nil(token:find("[^A-Za-z0-9_-]"))
    end
  end)

  it("uses all 64 characters", function()
    local token = crypto.random_token(65536)
    local counts = {}
    for c in token:gmatch(".") do
      counts[c] = (counts[c] or 0) + 1
    end
    local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for c in alphabet:gmatch(".") do
      -- About 1024 of each is expected.
      assert.is_true((counts[c] or 0) > 700, "character " .. c .. " is rare")
    end
  end)

  it("does not repeat", function()
    assert.are_not.equal(crypto.random_token(32), crypto.random_token(32))
  end)

  it("raises on a size out of range", function()
    assert.has_error(function() crypto.random_token(0) end)
    assert.has_error(function() crypto.random_token(65537) end)
  end)
end)


describe("crypto.pbkdf2_sha256", function()
  -- The first two are from RFC 7914 section 11; the rest are the RFC 6070
  -- inputs with SHA-256. All were recomputed with python3
  -- hashlib.pbkdf2_hmac("sha256", ...).
  local vectors = {
    { "passwd", "salt", 1, 64,
      "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
      .. "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783" },
    { "Password", "NaCl", 80000, 64,
      "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56"
      .. "a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d" },
    { "password", "salt", 1, 32,
      "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b" },
    { "password", "salt", 2, 32,
      "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43" },
    { "password", "salt", 4096, 32,
      "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a" },
    { "passwordPASSWORDpassword", "saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 40,
      "348c89dbcbd32b2f32d814b8116e84cf2b17347ebc1800181c4e2a1fb8dd53e1c635518c7dac47e9" },
    { "pass\0word", "sa\0lt", 4096, 16, "89b69d0516f829893c696226650a8687" },
  }

  for i, v in ipairs(vectors) do
    it("matches vector " .. i .. " (c = " .. v[3] .. ")", function()
      assert.equal(v[5], hex(crypto.pbkdf2_sha256(v[1], v[2], v[3], v[4])))
    end)
  end

  it("raises on bad parameters", function()
    assert.has_error(function() crypto.pbkdf2_sha256("p", "s", 0, 32) end)
    assert.has_error(function() crypto.pbkdf2_sha256("p", "s", 1, 0) end)
    assert.has_error(function() crypto.pbkdf2_sha256("p", "s", 1, 1025) end)
    assert.has_error(function() crypto.pbkdf2_sha256("p", nil, 1, 32) end)
  end)

  it("runs on the thread pool inside a core coroutine", helpers.async(function()
    local ticks, done = 0, false

    core.spawn(function()
      while not done do
        ticks = ticks + 1
        core.sleep(0.001)
      end
    end)

    -- python3: hashlib.pbkdf2_hmac("sha256", b"Password", b"NaCl", 300000, 32)
    local key = crypto.pbkdf2_sha256("Password", "NaCl", 300000, 32)
    done = true
    assert.equal("131b923e7e8757d00966719f019cf0d18c1ab68cd4f8c0c98dd072acfbd2f310", hex(key))
    -- The loop kept serving the other coroutine while the key was derived.
    assert.is_true(ticks > 1, "the loop stalled: " .. ticks .. " ticks")
  end))
end)


describe("crypto.scrypt", function()
  -- RFC 7914 section 12, the two smallest vectors, recomputed with python3
  -- hashlib.scrypt.
  it("matches the N = 16 vector", function()
    assert.equal("77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442"
      .. "fcd0069ded0948f8326a753a0fc81f17e8d3e0fb2e0d3628cf35e20c38d18906",
      hex(crypto.scrypt("", "", 16, 1, 1, 64)))
  end)

  it("matches the N = 1024 vector", function()
    assert.equal("fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
      .. "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640",
      hex(crypto.scrypt("password", "NaCl", 1024, 8, 16, 64)))
  end)

  it("matches the N = 16 vector on the thread pool", helpers.async(function()
    assert.equal("77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442"
      .. "fcd0069ded0948f8326a753a0fc81f17e8d3e0fb2e0d3628cf35e20c38d18906",
      hex(crypto.scrypt("", "", 16, 1, 1, 64)))
  end))

  it("raises when N is not a power of 2", function()
    assert.has_error(function() crypto.scrypt("p", "s", 1000, 8, 1, 32) end)
    assert.has_error(function() crypto.scrypt("p", "s", 1, 8, 1, 32) end)
  end)

  it("raises when the memory needed is over the limit", function()
    local ok, err = pcall(crypto.scrypt, "p", "s", 2 ^ 30, 8, 1, 32)
    assert.is_false(ok)
    assert.matches("limit of 1024 MiB", err, 1, true)
  end)

  it("raises on r or p of 0", function()
    assert.has_error(function() crypto.scrypt("p", "s", 16, 0, 1, 32) end)
    assert.has_error(function() crypto.scrypt("p", "s", 16, 1, 0, 32) end)
  end)
end)


describe("machine-token signature", function()
  -- S is JUSTAVPS-MACHINE-V1, method, request-target, timestamp, nonce and
  -- the hex SHA-256 of the body, joined by "\n", signed with the token.
  local token = "machine-token-example"
  local body = '{"version":"0.1.0"}'
  local parts = {
    "JUSTAVPS-MACHINE-V1", "POST", "/api/v1/machines/brave-otter-42/heartbeat",
    "1700000000", "nonce_0123456789abcdef",
  }

  local function signed_string(body_hash)
    local fields = { unpack(parts) }
    fields[#fields + 1] = body_hash
    return table.concat(fields, "\n")
  end

  it("matches a value computed with python3 hmac", function()
    -- python3: hmac.new(token, S, "sha256").hexdigest()
    local s = signed_string(hex(crypto.sha256(body)))
    assert.equal("701d838178929148f2eb418c3c97c99636c033fc2efa6874d65299f6df4929d2",
      hex(crypto.sha256(body)))
    assert.equal("2d9ef3e51f327e88082cd955e1c2b40aab0de7f8239668d329400f6cbff4abff",
      hex(crypto.hmac_sha256(token, s)))
  end)

  it("matches the openssl command line", function()
    local s = signed_string(hex(crypto.sha256_new():update(body):final()))
    local path = os.tmpname()
    local file = assert(io.open(path, "wb"))
    file:write(s)
    file:close()

    local pipe = io.popen("openssl dgst -sha256 -hmac '" .. token .. "' -r < "
      .. path .. " 2>/dev/null")
    local output = pipe and pipe:read("*a") or ""
    if pipe then
      pipe:close()
    end
    os.remove(path)

    local expected = output:match("^(%x+)")
    if not expected then
      pending("the openssl command is not installed")
      return
    end

    assert.equal(expected, hex(crypto.hmac_sha256(token, s)))
  end)
end)
