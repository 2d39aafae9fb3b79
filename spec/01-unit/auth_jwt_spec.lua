-- justavps.auth.jwt: HS256 compact tokens. Independent tokens come from
-- RFC 7515, appendix A.1, and from python3's hmac, base64 and json.
local core = require("justavps.core")
local jwt = require("justavps.auth.jwt")

local crypto = core.crypto
local b64 = crypto.base64url_encode

local SECRET = "0123456789abcdef0123456789abcdef"
local NOW = 1700000000

local has_python = os.execute("python3 -c '' >/dev/null 2>&1") == 0


-- Builds a token from raw header and payload texts, signed with secret,
-- so specs can make tokens that encode never would.
local function sign(header_json, payload_json, secret)
  local input = b64(header_json) .. "." .. b64(payload_json)
  return input .. "." .. b64(crypto.hmac_sha256(secret or SECRET, input))
end


local HS256 = '{"alg":"HS256","typ":"JWT"}'


local function payload(exp)
  return '{"exp":' .. (exp or NOW + 60) .. ',"sub":"42"}'
end


local function check(token, opts, secret)
  opts = opts or {}
  if opts.now == nil then
    opts.now = NOW
  end
  return jwt.decode_verify(token, secret or SECRET, opts)
end


-- Runs a python3 script with arguments that need no shell quoting and
-- returns its output without the final newline.
local function python(script, ...)
  local path = os.tmpname()
  local file = assert(io.open(path, "w"))
  file:write(script)
  file:close()
  local command = "python3 " .. path .. " " .. table.concat({ ... }, " ")
  local pipe = assert(io.popen(command .. " 2>&1"))
  local output = pipe:read("*a")
  pipe:close()
  os.remove(path)
  return (output:gsub("\n$", ""))
end


describe("jwt.encode", function()
  it("writes the fixed HS256 header", function()
    local token = assert(jwt.encode({ exp = NOW + 60 }, SECRET))
    local header = token:match("^([^.]+)%.")
    assert.equal("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", header)
    assert.equal(HS256, crypto.base64url_decode(header))
  end)

  it("writes base64url without padding", function()
    for length = 1, 6 do
      local token = assert(jwt.encode({ exp = NOW, s = ("x"):rep(length) },
        SECRET))
      assert.is_nil(token:find("[=+/]"))
      assert.equal(3, select(2, token:gsub("[^.]+", "")))
    end
  end)

  it("requires exp", function()
    assert.has_error(function()
      jwt.encode({ sub = "42" }, SECRET)
    end, "jwt.encode: claims.exp must be a finite number")
  end)

  it("rejects a secret shorter than 32 bytes", function()
    assert.has_error(function()
      jwt.encode({ exp = NOW }, ("k"):rep(31))
    end, "jwt.encode: secret must be at least 32 bytes, got 31")
  end)

  it("returns too_large past 4096 bytes", function()
    local token, message, code = jwt.encode({ exp = NOW,
      blob = ("x"):rep(4000) }, SECRET)
    assert.is_nil(token)
    assert.equal("too_large", code)
    assert.matches("exceeds 4096", message)
  end)
end)


describe("jwt.decode_verify", function()
  it("round-trips claims", function()
    local token = assert(jwt.encode({ sub = "42", exp = NOW + 60,
      roles = { "a", "b" } }, SECRET))
    local claims, header = check(token)
    assert.same({ sub = "42", exp = NOW + 60, roles = { "a", "b" } }, claims)
    assert.same({ alg = "HS256", typ = "JWT" }, header)
  end)

  it("verifies the RFC 7515 A.1 example", function()
    -- RFC 7515, appendix A.1: an HS256 JWS with a 64-byte JWK key and
    -- CRLF line breaks inside the JSON. Its exp is 1300819380.
    local key = crypto.base64url_decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ"
      .. "-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow")
    local token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
      .. ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFt"
      .. "cGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
      .. ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    local claims = jwt.decode_verify(token, key, { now = 1300819379 })
    assert.same({ iss = "joe", exp = 1300819380,
      ["http://example.com/is_root"] = true }, claims)

    local _, _, code = jwt.decode_verify(token, key, { now = 1300819380 })
    assert.equal("token_expired", code)
  end)

  it("verifies a token made by python3", function()
    -- python3: header and claims as json.dumps(separators=(",", ":")),
    -- each base64url without padding, and the HMAC-SHA256 of
    -- "header.payload" under SECRET.
    local token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
      .. ".eyJzdWIiOiI0MiIsImV4cCI6MjAwMDAwMDAwMCwiYXVkIjoianVzdGF2cHM6cHJv"
      .. "eHkiLCJzbHVnIjoicGFsZS1mb3giLCJzY29wZSI6Im1hY2hpbmUifQ"
      .. ".VeU_JRzABj819In0LAbmhoYH5OAfaBTY4lIp5v0sgZk"
    local claims = check(token, { audience = "justavps:proxy" })
    assert.same({ sub = "42", exp = 2000000000, aud = "justavps:proxy",
      slug = "pale-fox", scope = "machine" }, claims)
  end)

  local with_python = has_python and it or pending
  with_python("agrees with python3 on a fresh token", function()
    local token = assert(jwt.encode({ sub = "user-7", exp = NOW + 60 },
      SECRET))
    local output = python([[
import base64, hashlib, hmac, json, sys
pad = lambda s: s + "=" * (-len(s) % 4)
key = bytes.fromhex(sys.argv[1])
header, payload, signature = sys.argv[2].split(".")
mac = hmac.new(key, (header + "." + payload).encode(), hashlib.sha256)
ok = hmac.compare_digest(mac.digest(), base64.urlsafe_b64decode(pad(signature)))
print(ok, json.loads(base64.urlsafe_b64decode(pad(payload)))["sub"])
]], crypto.hex_encode(SECRET), token)
    assert.equal("True user-7", output)
  end)

  it("rejects every alg but HS256 before the signature", function()
    local cases = {
      { '{"alg":"none","typ":"JWT"}', "" },
      { '{"alg":"none"}', "" },
      { '{"alg":"None"}', "" },
      { '{"alg":"HS512","typ":"JWT"}', b64(("s"):rep(64)) },
      { '{"alg":"RS256","typ":"JWT"}', b64(("s"):rep(256)) },
      { '{"alg":"ES256"}', b64(("s"):rep(64)) },
      { '{"alg":"hs256"}', b64(("s"):rep(32)) },
      { '{"alg":["HS256"]}', b64(("s"):rep(32)) },
      { '{"alg":null}', b64(("s"):rep(32)) },
      { '{"typ":"JWT"}', b64(("s"):rep(32)) },
    }
    for _, case in ipairs(cases) do
      local token = b64(case[1]) .. "." .. b64(payload()) .. "." .. case[2]
      local claims, message, code = check(token)
      assert.is_nil(claims, case[1])
      assert.equal("unsupported_alg", code, case[1])
      assert.matches("only HS256 is accepted", message, 1, true)
    end
  end)

  it("rejects alg none even when signed with the secret", function()
    local token = sign('{"alg":"none"}', payload())
    local _, _, code = check(token)
    assert.equal("unsupported_alg", code)
  end)

  it("rejects a tampered payload", function()
    local token = assert(jwt.encode({ sub = "42", exp = NOW + 60 }, SECRET))
    local header, _, signature = token:match("^([^.]+)%.([^.]+)%.([^.]+)$")
    local forged = header .. "." .. b64('{"exp":' .. (NOW + 60)
      .. ',"sub":"1"}') .. "." .. signature
    local claims, message, code = check(forged)
    assert.is_nil(claims)
    assert.equal("bad_signature", code)
    assert.equal("signature does not match", message)
  end)

  it("rejects a tampered header", function()
    local token = assert(jwt.encode({ sub = "42", exp = NOW + 60 }, SECRET))
    local _, body, signature = token:match("^([^.]+)%.([^.]+)%.([^.]+)$")
    local forged = b64('{"alg":"HS256","typ":"JWT","kid":"other"}') .. "."
      .. body .. "." .. signature
    local _, _, code = check(forged)
    assert.equal("bad_signature", code)
  end)

  it("rejects a wrong secret", function()
    local token = assert(jwt.encode({ exp = NOW + 60 }, SECRET))
    local _, _, code = check(token, nil, ("z"):rep(32))
    assert.equal("bad_signature", code)
  end)

  it("rejects a signature of the wrong length", function()
    local token = assert(jwt.encode({ exp = NOW + 60 }, SECRET))
    local _, _, code = check(token:sub(1, -5))
    assert.equal("bad_signature", code)
    _, _, code = check(token:match("^(.*%.)") .. b64(("s"):rep(33)))
    assert.equal("bad_signature", code)
  end)

  it("accepts any secret of a rotation list", function()
    local old, new = ("o"):rep(32), ("n"):rep(32)
    local token = assert(jwt.encode({ exp = NOW + 60 }, old))
    assert.is_table(check(token, nil, { new, old }))
    local _, _, code = check(token, nil, { new })
    assert.equal("bad_signature", code)
  end)

  it("expires at exp", function()
    local token = assert(jwt.encode({ exp = NOW }, SECRET))
    local claims, message, code = check(token)
    assert.is_nil(claims)
    assert.equal("token_expired", code)
    assert.equal("token expired at 1700000000", message)
    assert.is_table(check(token, { now = NOW - 1 }))
  end)

  it("applies leeway to exp", function()
    local token = assert(jwt.encode({ exp = NOW }, SECRET))
    assert.is_table(check(token, { now = NOW + 5, leeway = 10 }))
    local _, _, code = check(token, { now = NOW + 5, leeway = 5 })
    assert.equal("token_expired", code)
  end)

  it("rejects a token before nbf", function()
    local token = assert(jwt.encode({ exp = NOW + 600, nbf = NOW + 30 },
      SECRET))
    local _, message, code = check(token)
    assert.equal("token_not_yet_valid", code)
    assert.equal("token is not valid before 1700000030", message)
    assert.is_table(check(token, { now = NOW + 30 }))
    assert.is_table(check(token, { leeway = 30 }))
    _, _, code = check(token, { leeway = 29 })
    assert.equal("token_not_yet_valid", code)
  end)

  it("requires exp as a number", function()
    local _, message, code = check(sign(HS256, '{"sub":"42"}'))
    assert.equal("missing_claim", code)
    assert.equal("claim exp is missing", message)

    _, _, code = check(sign(HS256, '{"exp":"2000000000"}'))
    assert.equal("invalid_claim", code)

    _, _, code = check(sign(HS256, '{"exp":' .. (NOW + 60)
      .. ',"nbf":"soon"}'))
    assert.equal("invalid_claim", code)
  end)

  it("checks required claims", function()
    local token = assert(jwt.encode({ exp = NOW + 60, sub = "42" }, SECRET))
    assert.is_table(check(token, { required = { "sub" } }))
    local _, message, code = check(token, { required = { "sub", "slug" } })
    assert.equal("missing_claim", code)
    assert.equal("claim slug is missing", message)
  end)

  it("checks the audience", function()
    local one = assert(jwt.encode({ exp = NOW + 60, aud = "edge" }, SECRET))
    local many = assert(jwt.encode({ exp = NOW + 60,
      aud = { "api", "edge" } }, SECRET))
    local none = assert(jwt.encode({ exp = NOW + 60 }, SECRET))

    assert.is_table(check(one, { audience = "edge" }))
    assert.is_table(check(many, { audience = "edge" }))

    local _, _, code = check(one, { audience = "api" })
    assert.equal("wrong_audience", code)
    _, _, code = check(none, { audience = "edge" })
    assert.equal("wrong_audience", code)
    -- A token that names an audience needs a recipient that expects one.
    _, _, code = check(one)
    assert.equal("wrong_audience", code)
  end)

  it("rejects crit and unknown typ, ignores kid", function()
    local _, _, code = check(sign('{"alg":"HS256","crit":["exp"]}',
      payload()))
    assert.equal("unsupported_header", code)

    _, _, code = check(sign('{"alg":"HS256","typ":"at+jwt"}', payload()))
    assert.equal("unsupported_header", code)

    _, _, code = check(sign('{"alg":"HS256","typ":1}', payload()))
    assert.equal("unsupported_header", code)

    assert.is_table(check(sign('{"alg":"HS256","typ":"Jwt"}', payload())))
    assert.is_table(check(sign('{"alg":"HS256","kid":"key-2"}', payload())))
    assert.is_table(check(sign('{"alg":"HS256"}', payload())))
  end)

  it("keeps the last of duplicate JSON keys", function()
    -- cjson keeps the last value of a repeated key, as RFC 7515, section
    -- 5.2 allows. Only the holder of the secret can sign such a payload.
    local token = sign(HS256, '{"exp":1,"exp":' .. (NOW + 60) .. '}')
    local claims = assert(check(token))
    assert.equal(NOW + 60, claims.exp)
  end)

  it("rejects malformed tokens", function()
    local good = assert(jwt.encode({ exp = NOW + 60 }, SECRET))
    local header, body, signature = good:match("^([^.]+)%.([^.]+)%.([^.]+)$")
    local cases = {
      [""] = "empty",
      [header .. "." .. body] = "two parts",
      [good .. "." .. signature] = "four parts",
      [header .. ".." .. signature] = "empty payload",
      [header .. "." .. body .. "=." .. signature] = "padding",
      [header .. "." .. body:sub(1, -2) .. "+" .. "." .. signature] = "plus",
      [header .. "." .. body .. "A." .. signature] = "length 4n+1",
      [b64("not json") .. "." .. body .. "." .. signature] = "header text",
      [b64("[1]") .. "." .. body .. "." .. signature] = "header array",
      [" " .. good] = "leading space",
      [good .. "\n"] = "trailing newline",
      [header .. "." .. ("A"):rep(5000) .. "." .. signature] = "too long",
    }
    for token, name in pairs(cases) do
      local claims, message, code = check(token)
      assert.is_nil(claims, name)
      assert.equal("malformed_token", code, name)
      assert.is_nil(message:find(signature, 1, true), name)
    end
  end)

  it("rejects a signed payload that is not an object", function()
    for _, text in ipairs({ "not json", "[1,2]", "42", '"exp"', "null" }) do
      local _, _, code = check(sign(HS256, text))
      assert.equal("malformed_token", code, text)
    end
  end)

  it("raises on misuse", function()
    assert.has_error(function()
      jwt.decode_verify(nil, SECRET)
    end, "jwt.decode_verify: token must be a string, got nil")
    assert.has_error(function()
      jwt.decode_verify("a.b.c", "short")
    end, "jwt.decode_verify: secret must be at least 32 bytes, got 5")
    assert.has_error(function()
      jwt.decode_verify("a.b.c", SECRET, { leeway = -1 })
    end, "jwt.decode_verify: opts.leeway must be a number >= 0")
  end)
end)
