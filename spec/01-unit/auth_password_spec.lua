-- justavps.auth.password: scrypt hashes, PBKDF2-SHA256 verification and
-- the length policy. Expected hashes come from python3's hashlib, never
-- from the code under test. Most cases use N = 1024 to stay fast, and a
-- few run the default parameters.
local core = require("justavps.core")
local helpers = require("spec.support.helpers")
local password = require("justavps.auth.password")

local crypto = core.crypto

local CHEAP = { N = 1024, r = 8, p = 1 }
local PASSWORD = "correct horse battery staple"

-- Computed by python3:
--   salt = b"JustAVPS-salt-16"
--   hashlib.pbkdf2_hmac("sha256", PASSWORD, salt, 1000, 32)
--   hashlib.scrypt(PASSWORD, salt=salt, n=1024, r=8, p=1, dklen=32)
-- each written as base64url without padding.
local PBKDF2_VECTOR = "pbkdf2-sha256$1000$SnVzdEFWUFMtc2FsdC0xNg"
  .. "$OuE7_TpDYRRb2hvkgrvmijOIhvBEQTeVUXzPEBCU9QA"
local SCRYPT_VECTOR = "scrypt$1024$8$1$SnVzdEFWUFMtc2FsdC0xNg"
  .. "$UGS2yHx_4iTV9_VIDliAzP45cLMpTxNa6YZ3z90Rraw"

local has_python = os.execute("python3 -c '' >/dev/null 2>&1") == 0


-- Runs a python3 script with arguments that need no shell quoting (hex
-- and base64url) and returns its output without the final newline.
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


local PYTHON_PBKDF2 = [[
import base64, hashlib, sys
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
pw, salt = bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2])
n = int(sys.argv[3])
print("pbkdf2-sha256$%d$%s$%s" % (n, b64(salt),
      b64(hashlib.pbkdf2_hmac("sha256", pw, salt, n, 32))))
]]

local PYTHON_SCRYPT = [[
import base64, hashlib, sys
pad = lambda s: s + "=" * (-len(s) % 4)
pw = bytes.fromhex(sys.argv[1])
n, r, p, salt, expected = sys.argv[2:7]
salt = base64.urlsafe_b64decode(pad(salt))
dk = hashlib.scrypt(pw, salt=salt, n=int(n), r=int(r), p=int(p), dklen=32)
print(dk == base64.urlsafe_b64decode(pad(expected)))
]]


describe("password.hash", function()
  it("writes the scrypt format with default parameters", function()
    local stored = assert(password.hash(PASSWORD))
    assert.matches("^scrypt%$32768%$8%$1%$[%w_-]+%$[%w_-]+$", stored)

    local parsed = assert(password.parse(stored))
    assert.equal(16, #parsed.salt)
    assert.equal(32, #parsed.hash)
  end)

  it("uses a new salt for each hash", function()
    local a = assert(password.hash(PASSWORD, CHEAP))
    local b = assert(password.hash(PASSWORD, CHEAP))
    assert.not_equal(a, b)
  end)

  it("rejects a password over 1024 bytes", function()
    local stored, message, code = password.hash(("x"):rep(1025), CHEAP)
    assert.is_nil(stored)
    assert.equal("password_too_long", code)
    assert.equal("password is longer than 1024 bytes", message)
  end)

  it("accepts a password of exactly 1024 bytes", function()
    local long = ("x"):rep(1024)
    local stored = assert(password.hash(long, CHEAP))
    assert.is_true(password.verify(long, stored))
  end)

  it("raises on a password that is not a string", function()
    assert.has_error(function()
      password.hash(12345678)
    end, "password.hash: password must be a string, got number")
  end)

  local matches_python = has_python and it or pending
  matches_python("matches python3 hashlib.scrypt", function()
    local stored = assert(password.hash(PASSWORD, CHEAP))
    local _, n, r, p, salt, hash = stored:match(
      "^(scrypt)%$(%d+)%$(%d+)%$(%d+)%$([%w_-]+)%$([%w_-]+)$")
    local output = python(PYTHON_SCRYPT, crypto.hex_encode(PASSWORD), n, r,
      p, salt, hash)
    assert.equal("True", output)
  end)
end)


describe("password.verify", function()
  local stored

  setup(function()
    stored = assert(password.hash(PASSWORD, CHEAP))
  end)

  it("accepts the right password", function()
    assert.is_true(password.verify(PASSWORD, stored))
  end)

  it("rejects a wrong password", function()
    assert.is_false(password.verify("correct horse battery stapler", stored))
    assert.is_false(password.verify("", stored))
  end)

  it("treats passwords as bytes", function()
    local with_nul = "abc\0def-ghij"
    local nul_stored = assert(password.hash(with_nul, CHEAP))
    assert.is_true(password.verify(with_nul, nul_stored))
    assert.is_false(password.verify("abc", nul_stored))
  end)

  it("verifies a scrypt hash computed by python3", function()
    assert.is_true(password.verify(PASSWORD, SCRYPT_VECTOR))
    assert.is_false(password.verify("Correct horse battery staple",
      SCRYPT_VECTOR))
  end)

  it("verifies a PBKDF2-SHA256 hash computed by python3", function()
    assert.is_true(password.verify(PASSWORD, PBKDF2_VECTOR))
    assert.is_false(password.verify("correct horse battery", PBKDF2_VECTOR))
  end)

  local matches_python = has_python and it or pending
  matches_python("verifies PBKDF2 for a random salt via python3", function()
    local salt = crypto.random_bytes(16)
    local secret = crypto.random_token(20)
    local vector = python(PYTHON_PBKDF2, crypto.hex_encode(secret),
      crypto.hex_encode(salt), "2000")
    assert.matches("^pbkdf2%-sha256%$2000%$", vector)
    assert.is_true(password.verify(secret, vector))
    assert.is_false(password.verify(secret .. "x", vector))
  end)

  it("returns password_too_long before any hashing", function()
    local ok, message, code = password.verify(("x"):rep(1025), stored)
    assert.is_false(ok)
    assert.equal("password_too_long", code)
    assert.equal("password is longer than 1024 bytes", message)
  end)

  it("returns invalid_hash for malformed stored values", function()
    local salt = "SnVzdEFWUFMtc2FsdC0xNg"
    local hash = "UGS2yHx_4iTV9_VIDliAzP45cLMpTxNa6YZ3z90Rraw"
    local cases = {
      "",
      "not a hash",
      "scrypt$1024$8$1$" .. salt,
      "scrypt$1024$8$1$" .. salt .. "$" .. hash .. "$extra",
      "scrypt$1000$8$1$" .. salt .. "$" .. hash,       -- N not a power of 2
      "scrypt$01024$8$1$" .. salt .. "$" .. hash,      -- leading zero
      "scrypt$2097152$8$1$" .. salt .. "$" .. hash,    -- N above 2^20
      "scrypt$1048576$8$1$" .. salt .. "$" .. hash,    -- 1 GiB of memory
      "scrypt$1024$0$1$" .. salt .. "$" .. hash,
      "scrypt$1024$8$1$c2hvcnQ$" .. hash,               -- 5-byte salt
      "scrypt$1024$8$1$" .. salt .. "=$" .. hash,      -- padding
      "scrypt$1024$8$1$" .. salt .. "$" .. hash .. "+",
      "bcrypt$10$" .. salt .. "$" .. hash,
      "pbkdf2-sha256$0$" .. salt .. "$" .. hash,
      "pbkdf2-sha256$20000000$" .. salt .. "$" .. hash,
      "pbkdf2-sha256$1000$" .. salt,
    }
    for _, case in ipairs(cases) do
      local ok, message, code = password.verify(PASSWORD, case)
      assert.is_false(ok, case)
      assert.equal("invalid_hash", code, case)
      assert.is_string(message)
    end

    local ok, _, code = password.verify(PASSWORD, nil)
    assert.is_false(ok)
    assert.equal("invalid_hash", code)
  end)

  it("hashes and verifies on the thread pool", helpers.async(function()
    local default_stored = assert(password.hash(PASSWORD))
    assert.is_true(password.verify(PASSWORD, default_stored))
    assert.is_false(password.verify("wrong password", default_stored))
  end))
end)


describe("password.dummy_verify", function()
  it("returns false for any password", function()
    assert.is_false(password.dummy_verify(PASSWORD))
    assert.is_false(password.dummy_verify(""))
    assert.is_false(password.dummy_verify(("x"):rep(2000)))
  end)
end)


describe("password.needs_rehash", function()
  it("is false for a hash with the current parameters", function()
    local stored = assert(password.hash(PASSWORD, CHEAP))
    assert.is_false(password.needs_rehash(stored, CHEAP))
  end)

  it("is true when a parameter is below the current one", function()
    local stored = assert(password.hash(PASSWORD, CHEAP))
    assert.is_true(password.needs_rehash(stored))
    assert.is_true(password.needs_rehash(stored, { N = 2048, r = 8, p = 1 }))
    assert.is_true(password.needs_rehash(stored, { N = 1024, r = 16, p = 1 }))
    assert.is_true(password.needs_rehash(stored, { N = 1024, r = 8, p = 2 }))
  end)

  it("is false when the stored parameters are stronger", function()
    local stored = assert(password.hash(PASSWORD, { N = 2048, r = 8, p = 1 }))
    assert.is_false(password.needs_rehash(stored, CHEAP))
  end)

  it("is true for PBKDF2 and for malformed values", function()
    assert.is_true(password.needs_rehash(PBKDF2_VECTOR))
    assert.is_true(password.needs_rehash("garbage"))
    assert.is_true(password.needs_rehash(nil))
  end)
end)


describe("password.check_policy", function()
  it("accepts 8 characters and more", function()
    assert.is_true(password.check_policy("12345678"))
    assert.is_true(password.check_policy(PASSWORD))
  end)

  it("rejects fewer than 8 characters", function()
    local ok, message, code = password.check_policy("1234567")
    assert.is_nil(ok)
    assert.equal("password_too_short", code)
    assert.equal("password must be at least 8 characters", message)
  end)

  it("counts UTF-8 characters, not bytes", function()
    local seven = ("é"):rep(7)
    assert.equal(14, #seven)
    local _, _, code = password.check_policy(seven)
    assert.equal("password_too_short", code)
    assert.is_true(password.check_policy(("é"):rep(8)))
  end)

  it("rejects more than 1024 bytes", function()
    local _, _, code = password.check_policy(("é"):rep(513))
    assert.equal("password_too_long", code)
  end)
end)
