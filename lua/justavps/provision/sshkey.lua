-- SSH key pairs for new machines, made by OpenSSH's ssh-keygen.
--
-- The core has no Ed25519 binding. `openssl genpkey -algorithm ed25519`
-- writes PKCS#8 PEM, but OpenSSH clients and providers expect an
-- "ssh-ed25519 AAAA..." public key and an "OPENSSH PRIVATE KEY" file, whose
-- format (check words, padding, key blob layout) would have to be rebuilt
-- by hand here. ssh-keygen writes both formats. It also prints the MD5
-- fingerprint that Hetzner Cloud reports for a registered key, which the
-- core cannot compute because it has no MD5.
--
-- generate() spawns processes and waits for them, so it must run in a
-- coroutine the core started (core.spawn or a request handler).
local core = require("justavps.core")

local type = type
local error = error
local tostring = tostring
local concat = table.concat
local smatch = string.match
local io_open = io.open
local os_remove = os.remove
local proc = core.proc

local _M = {}

-- Seconds each ssh-keygen or mktemp run may take.
_M.TIMEOUT = 30

_M.DEFAULT_COMMENT = "justavps"


-- Runs file with args and returns its output (stdout and stderr), or nil,
-- message, code.
local function run(file, args)
  local p, err, code = proc.spawn({ file = file, args = args,
    stdout = "pipe", stderr = "stdout" })
  if not p then
    return nil, file .. ": " .. tostring(err), code
  end

  local parts = {}
  p.stdout:settimeout(_M.TIMEOUT)
  while true do
    local chunk, rerr, rcode = p.stdout:read()
    if not chunk then
      if rcode ~= "closed" then
        p:kill("SIGKILL")
        p.stdout:close()
        return nil, file .. ": reading its output failed: " .. tostring(rerr),
          rcode
      end
      break
    end
    parts[#parts + 1] = chunk
  end
  p.stdout:close()

  local status, werr, wcode = p:wait(_M.TIMEOUT)
  if not status then
    p:kill("SIGKILL")
    return nil, file .. " did not exit: " .. tostring(werr), wcode
  end
  local output = concat(parts)
  if status ~= 0 then
    return nil, file .. " exited with status " .. status .. ": "
      .. output:sub(1, 500), "failed"
  end
  return output
end


local function read_file(path)
  local f, err = io_open(path, "rb")
  if not f then
    return nil, err
  end
  local data = f:read("*a")
  f:close()
  return data
end


local function fingerprint(pub_path, hash)
  local out, err, code = run("ssh-keygen", { "-l", "-E", hash, "-f",
    pub_path })
  if not out then
    return nil, err, code
  end
  return smatch(out, "^%d+ (%S+) "), out
end


local function generate_in(dir, comment)
  local key_path = dir .. "/id_ed25519"
  local pub_path = key_path .. ".pub"

  local generated, err, code = run("ssh-keygen", { "-q", "-t", "ed25519",
    "-N", "", "-C", comment, "-f", key_path })
  if not generated then
    return nil, err, code
  end

  local private_key, rerr = read_file(key_path)
  if not private_key then
    return nil, "cannot read the private key: " .. tostring(rerr), "failed"
  end
  local public_key, perr = read_file(pub_path)
  if not public_key then
    return nil, "cannot read the public key: " .. tostring(perr), "failed"
  end
  public_key = smatch(public_key, "^(ssh%-ed25519 [A-Za-z0-9+/=]+ ?[^\n]*)\n?$")
  if not public_key then
    return nil, "ssh-keygen wrote an unexpected public key file", "failed"
  end

  -- The output is "256 MD5:b7:2f:... comment (ED25519)", and Hetzner shows
  -- the hex part.
  local md5, out = fingerprint(pub_path, "md5")
  md5 = md5 and smatch(md5, "^MD5:(%x%x[%x:]*)$")
  if not md5 then
    return nil, "cannot parse the MD5 fingerprint from ssh-keygen: "
      .. tostring(out), "failed"
  end
  local sha256, sout = fingerprint(pub_path, "sha256")
  if not sha256 or not smatch(sha256, "^SHA256:[A-Za-z0-9+/]+$") then
    return nil, "cannot parse the SHA256 fingerprint from ssh-keygen: "
      .. tostring(sout), "failed"
  end

  return {
    public_key = public_key,
    private_key = private_key,
    fingerprint_md5 = md5,
    fingerprint_sha256 = sha256,
  }
end


-- Generates an Ed25519 key pair. opts.comment (optional, letters, digits
-- and @ . _ -, default "justavps") ends the public key line. Returns
-- { public_key, private_key, fingerprint_md5, fingerprint_sha256 }:
-- public_key is one authorized_keys line without a newline, private_key
-- the OpenSSH private key file (unencrypted), fingerprint_md5 colon-
-- separated hex as Hetzner Cloud reports it, and fingerprint_sha256 as
-- "SHA256:<base64>" as `ssh-keygen -l` prints it. Returns nil, message,
-- code on failure (code ENOENT when ssh-keygen is missing). The key files
-- exist only in a mode 0700 temporary directory during the call.
function _M.generate(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("sshkey.generate: opts must be a table, got " .. type(opts), 2)
  end
  local comment = opts.comment or _M.DEFAULT_COMMENT
  if type(comment) ~= "string" or not smatch(comment, "^[A-Za-z0-9@._-]*$")
      or #comment > 100 then
    return nil, "comment must be at most 100 letters, digits and @ . _ -, "
      .. "got " .. tostring(comment), "invalid_option"
  end

  -- mktemp -d creates the directory with mode 0700.
  local out, err, code = run("mktemp", { "-d", "-t",
    "justavps-sshkey.XXXXXXXXXX" })
  if not out then
    return nil, err, code
  end
  local dir = smatch(out, "^(/[^\n]+)\n?$")
  if not dir then
    return nil, "mktemp printed an unexpected path: " .. out, "failed"
  end

  local result, gerr, gcode = generate_in(dir, comment)
  os_remove(dir .. "/id_ed25519")
  os_remove(dir .. "/id_ed25519.pub")
  local removed, rerr = os_remove(dir)
  if not removed then
    return nil, "cannot remove the temporary key directory " .. dir .. ": "
      .. tostring(rerr), "failed"
  end
  if not result then
    return nil, gerr, gcode
  end
  return result
end


return _M
