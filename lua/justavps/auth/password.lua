-- Password hashing for dashboard logins: scrypt for new hashes, and
-- PBKDF2-HMAC-SHA256 accepted when verifying hashes imported from
-- elsewhere.
--
--   local stored = password.hash("correct horse battery staple")
--   if password.verify(input, stored) then ... end
--   if password.needs_rehash(stored) then store(password.hash(input)) end
--
-- Stored formats, with salt and hash in base64url without padding:
--   scrypt$N$r$p$salt$hash
--   pbkdf2-sha256$iterations$salt$hash
-- The KDFs run on the libuv thread pool when called from a coroutine that
-- the core started, and block the loop when called anywhere else.
local core = require("justavps.core")

local crypto = core.crypto
local scrypt = crypto.scrypt
local pbkdf2_sha256 = crypto.pbkdf2_sha256
local random_bytes = crypto.random_bytes
local b64url_encode = crypto.base64url_encode
local b64url_decode = crypto.base64url_decode
local constant_time_equal = crypto.constant_time_equal

local type = type
local error = error
local tonumber = tonumber
local concat = table.concat
local sfind = string.find
local sgsub = string.gsub

local _M = {}

-- Defaults for new hashes. N = 2^15, r = 8, p = 1 needs 32 MiB and takes
-- about 80 ms of one core (see docs/auth.md), which keeps a login endpoint
-- responsive on a 2-core machine while four thread-pool jobs run at once.
-- NOTE: the OWASP Password Storage Cheat Sheet (2023) recommends N = 2^17
-- as a minimum. Raise N here once the platform runs on larger machines;
-- needs_rehash then upgrades each hash at its owner's next login.
_M.SCRYPT_N = 32768
_M.SCRYPT_R = 8
_M.SCRYPT_P = 1
_M.SALT_SIZE = 16
_M.HASH_SIZE = 32

-- Password length limits. MAX_LENGTH is in bytes and bounds the work an
-- unauthenticated request can cause. MIN_LENGTH is in characters (UTF-8
-- code points), the unit NIST SP 800-63B uses.
_M.MAX_LENGTH = 1024
_M.MIN_LENGTH = 8

-- Bounds on parameters read from a stored hash, so a corrupt or hostile
-- row cannot make verify allocate gigabytes or spin for minutes.
local MAX_SCRYPT_N = 2 ^ 20
local MAX_SCRYPT_R = 32
local MAX_SCRYPT_P = 16
local MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
local MAX_PBKDF2_ITERATIONS = 10000000
local MIN_STORED_SIZE = 16
local MAX_STORED_SIZE = 64


local function fail(message, code)
  return nil, message, code
end


local function check_password(password, where)
  if type(password) ~= "string" then
    error(where .. ": password must be a string, got " .. type(password), 3)
  end
end


-- Parses a decimal integer without sign or leading zeros.
local function parse_integer(text)
  if not text or not sfind(text, "^[1-9]%d*$") or #text > 10 then
    return nil
  end
  return tonumber(text)
end


local function is_power_of_two(n)
  while n > 1 do
    if n % 2 ~= 0 then
      return false
    end
    n = n / 2
  end
  return n == 1
end


local function decode_bytes(text)
  local bytes = text and b64url_decode(text)
  if not bytes or sfind(text, "=", 1, true) then
    return nil
  end
  if #bytes < MIN_STORED_SIZE or #bytes > MAX_STORED_SIZE then
    return nil
  end
  return bytes
end


-- Parses a stored hash into a table of its scheme, parameters, salt and
-- hash, or returns nil, message.
local function parse(stored)
  if type(stored) ~= "string" or #stored > 512 then
    return nil, "stored hash is not a string of at most 512 bytes"
  end

  local fields = {}
  for field in (stored .. "$"):gmatch("([^$]*)%$") do
    fields[#fields + 1] = field
  end
  local scheme = fields[1]

  if scheme == "scrypt" and #fields == 6 then
    local n = parse_integer(fields[2])
    local r = parse_integer(fields[3])
    local p = parse_integer(fields[4])
    if not (n and r and p) or n < 2 or n > MAX_SCRYPT_N
        or not is_power_of_two(n) or r > MAX_SCRYPT_R
        or p > MAX_SCRYPT_P or 128 * r * (n + p + 2) > MAX_SCRYPT_MEMORY then
      return nil, "scrypt parameters are malformed or out of range"
    end
    local salt, hash = decode_bytes(fields[5]), decode_bytes(fields[6])
    if not salt or not hash then
      return nil, "scrypt salt or hash is not 16 to 64 bytes of base64url"
    end
    return { scheme = scheme, n = n, r = r, p = p, salt = salt, hash = hash }
  end

  if scheme == "pbkdf2-sha256" and #fields == 4 then
    local iterations = parse_integer(fields[2])
    if not iterations or iterations > MAX_PBKDF2_ITERATIONS then
      return nil, "pbkdf2-sha256 iterations are malformed or above "
        .. MAX_PBKDF2_ITERATIONS
    end
    local salt, hash = decode_bytes(fields[3]), decode_bytes(fields[4])
    if not salt or not hash then
      return nil,
        "pbkdf2-sha256 salt or hash is not 16 to 64 bytes of base64url"
    end
    return { scheme = scheme, iterations = iterations, salt = salt,
      hash = hash }
  end

  return nil, "stored hash is not in the scrypt or pbkdf2-sha256 format"
end


-- Returns the scrypt parameters of a call: opts may override N, r and p,
-- which specs use to keep hashes cheap.
local function parameters(opts)
  local n = opts and opts.N or _M.SCRYPT_N
  local r = opts and opts.r or _M.SCRYPT_R
  local p = opts and opts.p or _M.SCRYPT_P
  return n, r, p
end


-- Hashes password with scrypt and a new random salt. opts may set N, r
-- and p. Returns the stored form, or nil, message, code with the codes
-- "password_too_long" and "crypto_error". Raises when password is not a
-- string or a parameter is out of range.
function _M.hash(password, opts)
  check_password(password, "password.hash")
  if #password > _M.MAX_LENGTH then
    return fail("password is longer than " .. _M.MAX_LENGTH .. " bytes",
      "password_too_long")
  end

  local n, r, p = parameters(opts)
  local salt, message, code = random_bytes(_M.SALT_SIZE)
  if not salt then
    return fail(message, code)
  end

  local derived
  derived, message, code = scrypt(password, salt, n, r, p, _M.HASH_SIZE)
  if not derived then
    return fail(message, code)
  end

  return concat({ "scrypt", n, r, p, b64url_encode(salt),
    b64url_encode(derived) }, "$")
end


local function derive(parsed, password)
  if parsed.scheme == "scrypt" then
    return scrypt(password, parsed.salt, parsed.n, parsed.r, parsed.p,
      #parsed.hash)
  end
  return pbkdf2_sha256(password, parsed.salt, parsed.iterations,
    #parsed.hash)
end


-- Verifies password against a stored hash of either scheme. Returns true
-- on a match and false on a mismatch. Returns false, message, code when
-- the password is too long ("password_too_long"), the stored hash is
-- malformed ("invalid_hash") or OpenSSL fails ("crypto_error"). The final
-- comparison takes the same time wherever the hashes differ.
function _M.verify(password, stored)
  check_password(password, "password.verify")
  if #password > _M.MAX_LENGTH then
    return false, "password is longer than " .. _M.MAX_LENGTH .. " bytes",
      "password_too_long"
  end

  local parsed, reason = parse(stored)
  if not parsed then
    return false, reason, "invalid_hash"
  end

  local derived, message, code = derive(parsed, password)
  if not derived then
    return false, message, code
  end
  return constant_time_equal(derived, parsed.hash)
end


-- A hash of a random password with the current parameters, made on first
-- use by dummy_verify.
local dummy_hash


-- Spends the time of one verify with the current parameters and returns
-- false. Call it when the account does not exist, so that a login's
-- response time does not reveal which accounts do.
function _M.dummy_verify(password)
  check_password(password, "password.dummy_verify")
  if #password > _M.MAX_LENGTH then
    return false
  end
  local n, r, p = parameters()
  local prefix = "scrypt$" .. n .. "$" .. r .. "$" .. p .. "$"
  if not dummy_hash or not sfind(dummy_hash, prefix, 1, true) then
    dummy_hash = _M.hash(b64url_encode(random_bytes(16)))
  end
  _M.verify(password, dummy_hash)
  return false
end


-- Returns true when stored should be replaced by a new hash at the next
-- successful login: it is malformed, uses PBKDF2, uses a smaller N, r or
-- p than the current parameters (or opts), or a shorter salt or hash.
function _M.needs_rehash(stored, opts)
  local parsed = parse(stored)
  if not parsed or parsed.scheme ~= "scrypt" then
    return true
  end
  local n, r, p = parameters(opts)
  return parsed.n < n or parsed.r < r or parsed.p < p
    or #parsed.salt < _M.SALT_SIZE or #parsed.hash < _M.HASH_SIZE
end


-- Counts the characters of a UTF-8 string: every byte that does not
-- continue a multi-byte sequence.
local function utf8_length(s)
  local _, continuation = sgsub(s, "[\128-\191]", "")
  return #s - continuation
end


-- Checks a new password against the length policy. Returns true, or nil,
-- message, code with the codes "password_too_short" and
-- "password_too_long". Raises when password is not a string.
function _M.check_policy(password)
  check_password(password, "password.check_policy")
  if #password > _M.MAX_LENGTH then
    return fail("password is longer than " .. _M.MAX_LENGTH .. " bytes",
      "password_too_long")
  end
  if utf8_length(password) < _M.MIN_LENGTH then
    return fail("password must be at least " .. _M.MIN_LENGTH
      .. " characters", "password_too_short")
  end
  return true
end


-- Exposed for specs and for tools that report on stored hashes.
function _M.parse(stored)
  return parse(stored)
end


return _M
