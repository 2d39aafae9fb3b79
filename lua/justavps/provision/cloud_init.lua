-- Cloud-init user-data for a new machine: key-only SSH, a UFW firewall
-- (22 open, the daemon's port only from broker networks), Docker when
-- absent, the daemon binary checked against its SHA-256, its config file
-- and its systemd unit. The platform never logs in afterwards.
--
-- The document is "#cloud-config" followed by JSON. A JSON text is valid
-- YAML, so PyYAML (which cloud-init uses) loads it, and JSON leaves no room
-- for YAML's implicit typing: "0600" stays a string, "no" stays a string,
-- and multi-line file contents need no block scalars. Two differences
-- between JSON and PyYAML remain: raw U+0085 inside a string is folded to
-- a space, and a surrogate pair written as two \u escapes is not joined.
-- The document is therefore kept to printable ASCII, and every input that
-- could carry other bytes is rejected.
--
-- Inputs never become shell text. The provisioning steps are one constant
-- POSIX sh script, written by write_files and run by runcmd with the URL,
-- checksum, port and CIDRs as separate arguments, each validated first.
local core = require("justavps.core")
local json = require("justavps.json")
local config = require("justavps.config")
local cidr = require("justavps.cidr")
local daemon_config = require("justavps.daemon.config")
local systemd = require("justavps.provision.systemd")

local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local byte = string.byte
local sfind = string.find
local smatch = string.match
local sgsub = string.gsub
local slower = string.lower
local ssub = string.sub
local concat = table.concat
local base64_decode = core.crypto.base64_decode

local _M = {}

_M.HEADER = "#cloud-config"

-- Hetzner Cloud rejects user_data larger than 32 KiB. Callers for a
-- provider with a lower limit pass max_size.
_M.MAX_SIZE = 32 * 1024

_M.DAEMON_PATH = systemd.BINARY_PATH
_M.CONFIG_PATH = systemd.CONFIG_PATH
_M.UNIT_PATH = "/etc/systemd/system/" .. systemd.NAME
-- Named 00- so that it sorts before every other drop-in: sshd keeps the
-- first value it reads for a keyword, and Debian's sshd_config includes
-- sshd_config.d/*.conf before its own settings.
_M.SSHD_DROPIN_PATH = "/etc/ssh/sshd_config.d/00-justavps.conf"
_M.SCRIPT_PATH = "/usr/local/lib/justavps/provision.sh"

-- Packages the provisioning script needs, then the shared libraries the
-- justavps binary links (its NEEDED entries, `readelf -d justavps`) and
-- lua-cjson, which it requires at run time: a cloud image ships none of
-- them. libpq5 and libcurl4 are left out because the binary loads them
-- with dlopen() only when core.pg or core.curl is first used, which the
-- daemon never does. Docker (Debian's docker.io) is installed by the
-- script instead, because only the script can skip it when a docker
-- binary already exists.
-- NOTE: these are Debian 12 names. Debian 13 renamed libuv1 (the t64
-- package provides the old name, which apt resolves).
_M.BASE_PACKAGES = { "ufw", "curl", "ca-certificates",
  "libuv1", "libluajit-5.1-2", "lua-cjson" }

-- Cloud-config keys this generator may emit, in output order, with the
-- keys allowed inside each item of list modules. cloud-init's schema check
-- (22.4) accepts unknown keys silently, so a misspelled key would be
-- ignored at boot. check() rejects anything outside this list instead.
_M.TOP_LEVEL_KEYS = {
  "users", "disable_root", "ssh_pwauth", "timezone", "package_update",
  "package_upgrade", "packages", "write_files", "runcmd",
}

_M.ITEM_KEYS = {
  users = { name = true, lock_passwd = true, ssh_authorized_keys = true },
  write_files = { path = true, content = true, owner = true,
    permissions = true },
}

local TOP_LEVEL_SET = {}
for _, key in ipairs(_M.TOP_LEVEL_KEYS) do
  TOP_LEVEL_SET[key] = true
end

local OPTION_KEYS = {
  slug = true, daemon_url = true, daemon_sha256 = true,
  daemon_config = true, ssh_public_keys = true, broker_cidrs = true,
  install_docker = true, timezone = true, extra_packages = true,
  max_size = true,
}

-- Key types OpenSSH accepts in authorized_keys that Hetzner also stores.
local SSH_KEY_TYPES = {
  ["ssh-ed25519"] = true,
  ["ssh-rsa"] = true,
  ["ecdsa-sha2-nistp256"] = true,
  ["ecdsa-sha2-nistp384"] = true,
  ["ecdsa-sha2-nistp521"] = true,
  ["sk-ssh-ed25519@openssh.com"] = true,
  ["sk-ecdsa-sha2-nistp256@openssh.com"] = true,
}

local MAX_URL = 2048
local MAX_SSH_KEY = 16 * 1024
local MAX_LIST = 100

local SSHD_DROPIN = [[
# Written by JustAVPS provisioning: SSH accepts public keys only.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
PermitRootLogin prohibit-password
AuthenticationMethods publickey
]]

-- Runs once from runcmd as
--   sh provision.sh INSTALL_DOCKER PUBLIC_PORT URL SHA256 CIDR...
-- Any failed step stops it with status 1, which cloud-init records as a
-- failed runcmd, and the daemon is then never started, so the platform
-- receives no heartbeat. Messages go to /var/log/cloud-init-output.log.
local PROVISION_SCRIPT = [=[
#!/bin/sh
# Written by JustAVPS provisioning and run once by cloud-init's runcmd.
# Usage: provision.sh INSTALL_DOCKER(yes|no) PUBLIC_PORT URL SHA256 CIDR...
set -eu

log() { printf 'justavps-provision: %s\n' "$*" >&2; }
fail() { log "error: $*"; exit 1; }

[ "$#" -ge 5 ] || fail "expected INSTALL_DOCKER PUBLIC_PORT URL SHA256 CIDR..."
install_docker=$1 public_port=$2 url=$3 sha256=$4
shift 4
# The query string of a signed download URL is a credential: keep it out
# of the log.
shown_url=${url%%\?*}
binary=/usr/local/bin/justavps-daemon
export DEBIAN_FRONTEND=noninteractive

log "checking the sshd configuration and reloading sshd"
# sshd -t fails with "Missing privilege separation directory" without
# /run/sshd, which systemd creates only while ssh.service runs.
mkdir -p /run/sshd
/usr/sbin/sshd -t || fail "sshd -t rejected the SSH configuration"
systemctl try-reload-or-restart ssh.service

log "configuring ufw"
command -v ufw >/dev/null 2>&1 || fail "ufw is not installed"
ufw --force reset >/dev/null
ufw default deny incoming
ufw default allow outgoing
ufw allow 22/tcp
for block in "$@"; do
  ufw allow proto tcp from "$block" to any port "$public_port"
done
ufw --force enable

if [ "$install_docker" = yes ] && ! command -v docker >/dev/null 2>&1; then
  log "installing docker.io"
  # Published container ports bind to loopback unless a run says
  # otherwise: Docker's own iptables rules bypass ufw, and the daemon
  # reaches loopback ports anyway.
  if [ ! -e /etc/docker/daemon.json ]; then
    mkdir -p /etc/docker
    printf '{"ip": "127.0.0.1"}\n' > /etc/docker/daemon.json
  fi
  apt-get -o DPkg::Lock::Timeout=300 install -y docker.io
fi

log "downloading the daemon from $shown_url"
tmp=$(mktemp /usr/local/bin/.justavps-daemon.XXXXXXXX)
trap 'rm -f "$tmp"' EXIT
attempt=1
until curl --fail --silent --show-error --location --globoff \
    --proto '=http,https' --connect-timeout 10 --max-time 300 \
    --retry 3 --retry-connrefused --output "$tmp" "$url"; do
  [ "$attempt" -lt 5 ] || fail "cannot download the daemon from $shown_url"
  attempt=$((attempt + 1))
  sleep 5
done

if ! printf '%s  %s\n' "$sha256" "$tmp" \
    | sha256sum --check --strict --status -; then
  actual=$(sha256sum < "$tmp" | cut -d ' ' -f 1)
  fail "SHA-256 mismatch for $shown_url: expected $sha256, got $actual"
fi
chmod 0755 "$tmp"
version=$("$tmp" --version) || fail "the downloaded daemon does not run"
mv -f "$tmp" "$binary"
trap - EXIT
log "installed $version at $binary"

systemctl daemon-reload
systemctl enable --now justavps-daemon.service
log "justavps-daemon.service started"
]=]


local function fail(code, message)
  return nil, message, code
end


local function is_list(v)
  if type(v) ~= "table" then
    return false
  end
  local n = 0
  for _ in pairs(v) do
    n = n + 1
  end
  return n == #v
end


-- Validation of each input. Each returns the value to use, or nil,
-- message.

local function check_slug(slug)
  if type(slug) ~= "string" or not smatch(slug, "^[a-z0-9-]+$")
      or #slug < 3 or #slug > 40 then
    return nil, "slug must be 3 to 40 characters of a-z, 0-9 and -, got "
      .. json.encode(tostring(slug))
  end
  return slug
end


local function check_sha256(hex)
  if type(hex) ~= "string" or not smatch(hex, "^" .. ("%x"):rep(64) .. "$")
  then
    return nil, "daemon_sha256 must be 64 hexadecimal digits, got "
      .. json.encode(tostring(hex))
  end
  return slower(hex)
end


local function check_host(host)
  if ssub(host, 1, 1) == "[" then
    local literal = smatch(host, "^%[([%x:.]+)%]$")
    if not literal or not sfind(literal, ":", 1, true)
        or not cidr.parse(literal) then
      return nil, "invalid IPv6 literal " .. host
    end
    return host
  end

  if not smatch(host, "^[A-Za-z0-9.-]+$") or #host > 253 then
    return nil, "host must be a DNS name or an IP literal, got " .. host
  end
  for label in (host .. "."):gmatch("([^.]*)%.") do
    if label == "" or #label > 63 or ssub(label, 1, 1) == "-"
        or ssub(label, -1) == "-" then
      return nil, "invalid DNS label in host " .. host
    end
  end
  return host
end


-- Accepts http and https URLs without user information or a fragment, and
-- with a path and query of unreserved characters, percent escapes and
-- / ? & = + , : @. curl runs with --globoff, so brackets would be literal,
-- but they are rejected here all the same.
local function check_url(url)
  local function bad(reason)
    return nil, "daemon_url " .. reason .. ", got "
      .. json.encode(tostring(url))
  end

  if type(url) ~= "string" then
    return bad("must be a string")
  end
  if #url > MAX_URL then
    return bad("is longer than " .. MAX_URL .. " bytes")
  end

  local rest = smatch(url, "^https?://(.*)$")
  if not rest then
    return bad("must start with http:// or https://")
  end

  local authority, tail = smatch(rest, "^([^/?#]*)(.*)$")
  if sfind(authority, "@", 1, true) then
    return bad("must not contain user information")
  end

  local host, port = smatch(authority, "^(.-):(%d+)$")
  if not host then
    host = authority
  elseif tonumber(port) < 1 or tonumber(port) > 65535 then
    return bad("has a port outside 1 to 65535")
  end
  if host == "" then
    return bad("has no host")
  end
  local ok, herr = check_host(host)
  if not ok then
    return bad("has an invalid host: " .. herr)
  end

  if tail ~= "" and not smatch(tail, "^[/?]") then
    return bad("has an invalid path")
  end
  if sfind(tail, "[^A-Za-z0-9%-._~/?&=+,:@%%]") then
    return bad("may contain only letters, digits, percent escapes and "
      .. "- . _ ~ / ? & = + , : @ after the host")
  end
  for escape in tail:gmatch("%%(..)") do
    if not smatch(escape, "^%x%x$") then
      return bad("has a malformed percent escape")
    end
  end
  if smatch(tail, "%%.?$") then
    return bad("has a malformed percent escape")
  end
  return url
end


-- An authorized_keys line "TYPE BASE64 [COMMENT]" without options. The
-- base64 blob must decode and start with the same key type, as OpenSSH
-- checks when it loads the key.
local function check_ssh_key(key)
  if type(key) ~= "string" then
    return nil, "must be a string, got " .. type(key)
  end
  if #key > MAX_SSH_KEY then
    return nil, "is longer than " .. MAX_SSH_KEY .. " bytes"
  end
  if sfind(key, "[^\32-\126]") then
    return nil, "may contain only printable ASCII on one line (a newline, "
      .. "tab or other control character was found)"
  end

  local key_type, blob_text, comment = smatch(key,
    "^(%S+) ([A-Za-z0-9+/]+=?=?)(.*)$")
  if not key_type then
    return nil, "must have the form TYPE BASE64 [COMMENT]"
  end
  if not SSH_KEY_TYPES[key_type] then
    return nil, "has an unsupported key type " .. json.encode(key_type)
  end
  if comment ~= "" and ssub(comment, 1, 1) ~= " " then
    return nil, "must have a space between the key and its comment"
  end

  local blob = base64_decode(blob_text)
  if not blob or #blob < 4 then
    return nil, "has an invalid base64 key blob"
  end
  local b1, b2, b3, b4 = byte(blob, 1, 4)
  local name_len = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
  if ssub(blob, 5, 4 + name_len) ~= key_type then
    return nil, "has a key blob of another type than " .. key_type
  end
  return key
end


local function check_ssh_keys(keys)
  if not is_list(keys) or #keys == 0 or #keys > MAX_LIST then
    return nil, "ssh_public_keys must be a list of 1 to " .. MAX_LIST
      .. " authorized_keys lines"
  end
  local out = {}
  for i, key in ipairs(keys) do
    local ok, err = check_ssh_key(key)
    if not ok then
      return nil, "ssh_public_keys[" .. i .. "] " .. err
    end
    out[i] = key
  end
  return out
end


-- True when every bit of bytes after the first bits is zero.
local function host_bits_zero(bytes, bits)
  for i = 1, #bytes do
    local keep = bits - (i - 1) * 8
    if keep <= 0 then
      if bytes[i] ~= 0 then
        return false
      end
    elseif keep < 8 then
      local unit = 2 ^ (8 - keep)
      if bytes[i] % unit ~= 0 then
        return false
      end
    end
  end
  return true
end


-- A network address with an explicit prefix length, as ufw takes it. The
-- host bits must be zero, IPv4-mapped IPv6 forms are rejected (cidr.lua
-- reads them as IPv4, ufw as IPv6), and a /0 is rejected because it would
-- open the daemon's port to every address.
local function check_cidr(text)
  if type(text) ~= "string" or not smatch(text, "^[%x:.]+/%d+$") then
    return nil, "must be ADDRESS/PREFIX, got " .. json.encode(tostring(text))
  end
  local block, err = cidr.block(text)
  if not block then
    return nil, err
  end
  if sfind(text, ":", 1, true) and #block.bytes == 4 then
    return nil, "IPv4-mapped IPv6 blocks are not accepted, write the IPv4 "
      .. "block instead: " .. text
  end
  if block.bits == 0 then
    return nil, "a /0 block would open the daemon's port to every "
      .. "address: " .. text
  end
  if not host_bits_zero(block.bytes, block.bits) then
    return nil, "host bits must be zero in " .. text
  end
  return text
end


local function check_cidrs(list)
  if not is_list(list) or #list == 0 or #list > MAX_LIST then
    return nil, "broker_cidrs must be a list of 1 to " .. MAX_LIST
      .. " CIDR blocks"
  end
  local out = {}
  for i, text in ipairs(list) do
    local ok, err = check_cidr(text)
    if not ok then
      return nil, "broker_cidrs[" .. i .. "] " .. err
    end
    out[i] = text
  end
  return out
end


local function check_timezone(tz)
  if tz == nil then
    return true
  end
  if type(tz) ~= "string" or #tz > 64
      or not smatch(tz, "^[A-Za-z][A-Za-z0-9_+-]*$")
      and not smatch(tz, "^[A-Za-z][A-Za-z0-9_+-]*/[A-Za-z0-9_+/-]+$")
      or sfind(tz, "//", 1, true) or ssub(tz, -1) == "/" then
    return nil, "timezone must be a tz database name such as Europe/Berlin, "
      .. "got " .. json.encode(tostring(tz))
  end
  return true
end


-- Debian package names: lowercase letters, digits, + - and ., at least two
-- characters, starting with a letter or digit.
local function check_packages(list)
  if list == nil then
    return {}
  end
  if not is_list(list) or #list > MAX_LIST then
    return nil, "extra_packages must be a list of at most " .. MAX_LIST
      .. " package names"
  end
  for i, name in ipairs(list) do
    if type(name) ~= "string" or not smatch(name, "^[a-z0-9][a-z0-9+.-]+$")
        or #name > 100 then
      return nil, "extra_packages[" .. i .. "] must be a Debian package "
        .. "name, got " .. json.encode(tostring(name))
    end
  end
  return list
end


local function same_set(a, b)
  local seen = {}
  for _, v in ipairs(a) do
    seen[v] = true
  end
  for _, v in ipairs(b) do
    if not seen[v] then
      return false
    end
  end
  return #a == #b
end


local function copy_list(list)
  local out = json.array({})
  for i, v in ipairs(list) do
    out[i] = v
  end
  return out
end


-- Checks daemon_config against the daemon's schema and against the rest
-- of the user-data, and returns the JSON text to write to config.json.
-- broker_cidrs is filled in from opts when absent, so the daemon's own
-- check and ufw admit the same networks.
local function build_daemon_config(conf, slug, broker_cidrs)
  local code = "invalid_daemon_config"
  if type(conf) ~= "table" then
    return fail(code, "daemon_config must be a table, got " .. type(conf))
  end

  -- A JSON round trip copies the caller's table and makes what is checked
  -- exactly what is written.
  local text, err = json.encode(conf)
  if not text then
    return fail(code, "daemon_config cannot be encoded as JSON: " .. err)
  end
  if sfind(text, "[\128-\255]") then
    return fail(code, "daemon_config contains non-ASCII text, which the "
      .. "user-data cannot carry unchanged (cloud-init's YAML parser "
      .. "folds U+0085 to a space); use ASCII values")
  end
  local copy = json.decode(text)
  if type(copy) ~= "table" or json.is_array(copy) then
    return fail(code, "daemon_config must be an object")
  end

  if copy.broker_cidrs == nil then
    copy.broker_cidrs = copy_list(broker_cidrs)
  elseif not is_list(copy.broker_cidrs)
      or not same_set(copy.broker_cidrs, broker_cidrs) then
    return fail(code, "daemon_config.broker_cidrs must list the same "
      .. "blocks as broker_cidrs, because ufw and the daemon must admit "
      .. "the same networks; leave it out to copy broker_cidrs")
  end

  text = json.encode(copy)
  local valid, verr = config.validate(daemon_config.schema, json.decode(text))
  if not valid then
    return fail(code, "daemon_config does not match the daemon config "
      .. "schema: " .. sgsub(sgsub(verr, "^invalid config:\n", ""),
        "\n", "; "))
  end

  if valid.slug ~= slug then
    return fail(code, "daemon_config.slug is " .. json.encode(valid.slug)
      .. " but slug is " .. json.encode(slug))
  end
  if valid.update.installed_path ~= _M.DAEMON_PATH then
    return fail(code, "daemon_config.update.installed_path must be "
      .. _M.DAEMON_PATH .. ", where this user-data installs the daemon")
  end
  if valid.public.port == 0 then
    return fail(code, "daemon_config.public.port must be a fixed port, "
      .. "because ufw opens that port to the brokers")
  end

  return text .. "\n", valid
end


-- Checks a cloud-config table against TOP_LEVEL_KEYS and ITEM_KEYS.
-- Returns true, or nil, message, "unknown_key".
function _M.check(doc)
  if type(doc) ~= "table" then
    error("cloud_init.check: doc must be a table, got " .. type(doc), 2)
  end
  for key, value in pairs(doc) do
    if not TOP_LEVEL_SET[key] then
      return fail("unknown_key", "cloud-config key " .. tostring(key)
        .. " is not in the generator's allowlist")
    end
    local item_keys = _M.ITEM_KEYS[key]
    if item_keys then
      for i, item in ipairs(value) do
        for item_key in pairs(item) do
          if not item_keys[item_key] then
            return fail("unknown_key", "cloud-config key " .. key .. "["
              .. i .. "]." .. tostring(item_key)
              .. " is not in the generator's allowlist")
          end
        end
      end
    end
  end
  return true
end


-- Renders the document: the header, then a JSON object with one top-level
-- key per line and one list item per line, in TOP_LEVEL_KEYS order.
local function render(doc)
  local lines = { _M.HEADER, "{" }
  local entries = {}
  for _, key in ipairs(_M.TOP_LEVEL_KEYS) do
    local value = doc[key]
    if value ~= nil then
      local text
      if is_list(value) and type(value[1]) == "table" then
        local items = {}
        for i, item in ipairs(value) do
          items[i] = "    " .. json.encode(item)
        end
        text = "[\n" .. concat(items, ",\n") .. "\n  ]"
      else
        text = json.encode(value)
      end
      entries[#entries + 1] = "  " .. json.encode(key) .. ": " .. text
    end
  end
  lines[#lines + 1] = concat(entries, ",\n")
  lines[#lines + 1] = "}"
  lines[#lines + 1] = ""
  return concat(lines, "\n")
end


local function check_options(opts)
  for key in pairs(opts) do
    if not OPTION_KEYS[key] then
      return fail("invalid_option", "unknown option " .. tostring(key))
    end
  end

  local checks = {
    { "slug", check_slug, "invalid_slug" },
    { "daemon_url", check_url, "invalid_url" },
    { "daemon_sha256", check_sha256, "invalid_sha256" },
    { "ssh_public_keys", check_ssh_keys, "invalid_ssh_key" },
    { "broker_cidrs", check_cidrs, "invalid_cidr" },
    { "timezone", check_timezone, "invalid_option" },
    { "extra_packages", check_packages, "invalid_option" },
  }
  local values = {}
  for _, c in ipairs(checks) do
    local value, err = c[2](opts[c[1]])
    if not value then
      return fail(c[3], err)
    end
    values[c[1]] = value
  end

  local docker = opts.install_docker
  if docker == nil then
    docker = true
  elseif type(docker) ~= "boolean" then
    return fail("invalid_option", "install_docker must be a boolean, got "
      .. type(docker))
  end
  values.install_docker = docker

  local max_size = opts.max_size or _M.MAX_SIZE
  if type(max_size) ~= "number" or max_size < 1 then
    return fail("invalid_option", "max_size must be a positive number of "
      .. "bytes, got " .. tostring(max_size))
  end
  values.max_size = max_size
  return values
end


local function build_document(opts, v, config_text, conf)
  local unit = assert(systemd.unit())

  local packages = copy_list(_M.BASE_PACKAGES)
  for _, name in ipairs(v.extra_packages) do
    packages[#packages + 1] = name
  end

  local command = { "/bin/sh", _M.SCRIPT_PATH,
    v.install_docker and "yes" or "no", tostring(conf.public.port),
    v.daemon_url, v.daemon_sha256 }
  for _, block in ipairs(v.broker_cidrs) do
    command[#command + 1] = block
  end

  local function file(path, content, permissions)
    return { path = path, content = content, owner = "root:root",
      permissions = permissions }
  end

  return {
    -- Only root, which exists already: no default user is created, and
    -- root's password is locked.
    users = { { name = "root", lock_passwd = true,
      ssh_authorized_keys = copy_list(v.ssh_public_keys) } },
    -- false: keys the provider passes in its metadata go to root without
    -- the "Please login as ..." command= prefix.
    disable_root = false,
    ssh_pwauth = false,
    timezone = opts.timezone,
    package_update = true,
    -- An upgrade would add minutes to every first boot. The image's
    -- unattended-upgrades applies security updates instead.
    package_upgrade = false,
    packages = packages,
    write_files = {
      file(_M.SSHD_DROPIN_PATH, SSHD_DROPIN, "0644"),
      file(_M.CONFIG_PATH, config_text, "0600"),
      file(_M.UNIT_PATH, unit, "0644"),
      file(_M.SCRIPT_PATH, PROVISION_SCRIPT, "0755"),
    },
    runcmd = { command },
  }
end


-- Builds the user-data for one machine. opts:
--   slug             machine slug, [a-z0-9-]{3,40}
--   daemon_url       http(s) URL of the daemon binary
--   daemon_sha256    64 hex digits, the binary's SHA-256
--   daemon_config    table for /etc/justavps/config.json; must pass the
--                    daemon config schema
--   ssh_public_keys  list of authorized_keys lines for root
--   broker_cidrs     list of networks allowed to reach the daemon's port
--   install_docker   boolean, default true
--   timezone         optional tz database name
--   extra_packages   optional list of Debian package names
--   max_size         bytes, default MAX_SIZE
-- Returns the user-data text, or nil, message, code. Codes: invalid_slug,
-- invalid_url, invalid_sha256, invalid_ssh_key, invalid_cidr,
-- invalid_daemon_config, invalid_option, unknown_key, too_large.
function _M.user_data(opts)
  if type(opts) ~= "table" then
    error("cloud_init.user_data: opts must be a table, got " .. type(opts),
      2)
  end

  local v, err, code = check_options(opts)
  if not v then
    return nil, err, code
  end

  local config_text, conf, dcode = build_daemon_config(opts.daemon_config,
    v.slug, v.broker_cidrs)
  if not config_text then
    return nil, conf, dcode
  end

  local doc = build_document(opts, v, config_text, conf)
  local ok, cerr, ccode = _M.check(doc)
  if not ok then
    return nil, cerr, ccode
  end

  local text = render(doc)
  -- Every input is validated or escaped to ASCII above. This guards the
  -- invariant that the JSON-as-YAML choice depends on.
  if sfind(text, "[^\10\32-\126]") then
    error("cloud_init.user_data: generated a non-ASCII document")
  end
  if #text > v.max_size then
    return fail("too_large", "the user-data is " .. #text .. " bytes, more "
      .. "than the limit of " .. v.max_size)
  end
  return text
end


-- Exposed for specs: the provisioning script and the sshd drop-in.
_M.PROVISION_SCRIPT = PROVISION_SCRIPT
_M.SSHD_DROPIN = SSHD_DROPIN

return _M
