-- Cloud-init user-data and SSH keys for new machines. The generated
-- document is checked with the real validator (`cloud-init schema`, Debian
-- package cloud-init) and loaded with PyYAML, the parser cloud-init uses at
-- boot. The embedded provisioning script is checked with `sh -n` and
-- shellcheck. Nothing here runs the user-data.
local core = require("justavps.core")
local helpers = require("support.helpers")
local json = require("justavps.json")
local config = require("justavps.config")
local daemon_config = require("justavps.daemon.config")
local cloud_init = require("justavps.provision.cloud_init")
local sshkey = require("justavps.provision.sshkey")

local async = helpers.async
local crypto = core.crypto

local SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGT1QMWBFp2lBcHkJ5zyn0U0BQ7GqoXdu185t3KQJ2BM"
  .. " deploy@example.com"
local SHA256 = ("0123456789abcdef"):rep(4)
local TOKEN = "tok_0123456789abcdef0123456789abcdef"


local function sample_opts(overrides)
  local opts = {
    slug = "demo-machine",
    daemon_url = "http://127.0.0.1:8080/releases/1.2.3/justavps-daemon",
    daemon_sha256 = SHA256,
    daemon_config = {
      slug = "demo-machine",
      token = TOKEN,
      platform_url = "http://127.0.0.1:8080",
    },
    ssh_public_keys = { SSH_KEY },
    broker_cidrs = { "10.0.0.0/8", "192.0.2.16/28", "2001:db8::/32" },
    timezone = "Europe/Berlin",
    extra_packages = { "htop" },
  }
  for k, v in pairs(overrides or {}) do
    opts[k] = v
  end
  return opts
end


-- Runs a program to completion. Returns its status and its output, with
-- stderr merged into stdout.
local function run(file, args, env)
  local p = assert(core.proc.spawn({ file = file, args = args, env = env,
    stdout = "pipe", stderr = "stdout" }))
  local parts = {}
  while true do
    local chunk = p.stdout:read()
    if not chunk then
      break
    end
    parts[#parts + 1] = chunk
  end
  p.stdout:close()
  local status = p:wait(120)
  return status, table.concat(parts)
end


local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end


local function temp_dir()
  local status, out = run("mktemp", { "-d", "-t", "justavps-ci-spec.XXXXXX" })
  assert(status == 0, out)
  return (out:gsub("\n$", ""))
end


local function remove_tree(dir)
  assert(dir:match("/justavps%-ci%-spec%.[^/]+$"), "refusing to remove " .. dir)
  run("rm", { "-rf", dir })
end


-- Decodes the JSON that follows the #cloud-config line.
local function parse(text)
  local header, body = text:match("^([^\n]*)\n(.*)$")
  assert.equal("#cloud-config", header)
  return assert(json.decode(body))
end


local function write_file_entry(doc, path)
  for _, item in ipairs(doc.write_files) do
    if item.path == path then
      return item
    end
  end
  return nil
end


local function deep_equal(a, b)
  if type(a) ~= type(b) then
    return false
  end
  if type(a) ~= "table" then
    return a == b
  end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k]) then
      return false
    end
  end
  for k in pairs(b) do
    if a[k] == nil then
      return false
    end
  end
  return true
end


-- Runs `cloud-init schema --config-file` on text. Returns the lines that
-- are neither the success line nor an empty deprecations header, plus the
-- exit status and the whole output.
local function cloud_init_schema(text)
  local dir = temp_dir()
  local path = dir .. "/user-data.yaml"
  write_file(path, text)
  local status, out = run("cloud-init", { "schema", "--config-file", path })
  remove_tree(dir)

  local unexpected = {}
  for line in out:gmatch("[^\n]+") do
    if line ~= "Valid cloud-config: " .. path
        and not line:match("^Cloud config schema deprecations:%s*$") then
      unexpected[#unexpected + 1] = line
    end
  end
  return unexpected, status, out
end


-- Loads text with PyYAML's safe_load, as cloud-init does at boot, and
-- returns the result re-encoded as JSON by Python.
local function pyyaml_load(text)
  local dir = temp_dir()
  local path = dir .. "/user-data.yaml"
  write_file(path, text)
  local status, out = run("/usr/bin/python3", { "-c",
    "import json, sys, yaml\n"
    .. "doc = yaml.safe_load(open(sys.argv[1], 'rb'))\n"
    .. "sys.stdout.write(json.dumps(doc))\n", path })
  remove_tree(dir)
  assert(status == 0, out)
  return assert(json.decode(out))
end


describe("cloud_init.user_data", function()
  it("passes the real cloud-init schema check without warnings",
    async(function()
      local text = assert(cloud_init.user_data(sample_opts()))
      local unexpected, status, out = cloud_init_schema(text)
      assert.equal(0, status, "cloud-init schema output:\n" .. out)
      assert.same({}, unexpected, "cloud-init schema output:\n" .. out)
    end, 60))

  it("schema gate catches an invalid document", async(function()
    -- The same gate as above must fail on a wrong type, or its passing
    -- result proves nothing.
    local text = assert(cloud_init.user_data(sample_opts()))
    local broken = text:gsub('"package_update": true', '"package_update": "yes"')
    local unexpected, status = cloud_init_schema(broken)
    assert.equal(1, status)
    assert.is_true(#unexpected > 0)
  end, 60))

  it("loads identically with PyYAML and JSON", async(function()
    local opts = sample_opts()
    -- Quotes, backslashes, a tab and DEL must all arrive unchanged in
    -- config.json.
    opts.daemon_config.token = "tok_\"quoted\"\\back\tslash\127_0123456789"
    local text = assert(cloud_init.user_data(opts))
    local from_yaml = pyyaml_load(text)
    local from_json = parse(text)
    assert.is_true(deep_equal(from_json, from_yaml))
    local entry = write_file_entry(from_yaml, cloud_init.CONFIG_PATH)
    assert.equal(opts.daemon_config.token, json.decode(entry.content).token)
  end, 60))

  it("is printable ASCII and within the size limit", function()
    local text = assert(cloud_init.user_data(sample_opts()))
    assert.is_nil(text:find("[^\n\32-\126]"))
    assert.is_true(#text <= cloud_init.MAX_SIZE)
  end)

  it("embeds a config.json that passes the daemon schema", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts())))
    local entry = write_file_entry(doc, cloud_init.CONFIG_PATH)
    assert.is_table(entry)
    assert.equal("0600", entry.permissions)
    assert.equal("root:root", entry.owner)

    local conf = assert(json.decode(entry.content))
    local valid, err = config.validate(daemon_config.schema, conf)
    assert.is_table(valid, err)
    assert.equal("demo-machine", valid.slug)
    assert.equal(TOKEN, valid.token)
    assert.equal("http://127.0.0.1:8080", valid.platform_url)
    -- broker_cidrs was absent, so the user-data's list is copied in.
    assert.same({ "10.0.0.0/8", "192.0.2.16/28", "2001:db8::/32" },
      { valid.broker_cidrs[1], valid.broker_cidrs[2], valid.broker_cidrs[3] })
  end)

  it("does not modify the caller's daemon_config", function()
    local opts = sample_opts()
    assert(cloud_init.user_data(opts))
    assert.is_nil(opts.daemon_config.broker_cidrs)
  end)

  it("writes the unit, the sshd drop-in and the script", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts())))
    local unit = write_file_entry(doc, cloud_init.UNIT_PATH)
    assert.is_table(unit)
    assert.equal("0644", unit.permissions)
    assert.truthy(unit.content:find("\nExecStart=/usr/local/bin/justavps-daemon "
      .. "daemon --config /etc/justavps/config.json", 1, true))

    local dropin = write_file_entry(doc, cloud_init.SSHD_DROPIN_PATH)
    assert.is_table(dropin)
    assert.truthy(dropin.content:find("\nPasswordAuthentication no\n", 1, true))
    assert.truthy(dropin.content:find("\nPermitRootLogin prohibit-password\n", 1,
      true))
    assert.truthy(dropin.content:find("\nAuthenticationMethods publickey\n", 1,
      true))

    local script = write_file_entry(doc, cloud_init.SCRIPT_PATH)
    assert.is_table(script)
    assert.equal(cloud_init.PROVISION_SCRIPT, script.content)
  end)

  it("gives root the keys and turns passwords off", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts({
      ssh_public_keys = { SSH_KEY, (SSH_KEY:gsub(" deploy@example.com$", "")) },
    }))))
    assert.equal(1, #doc.users)
    assert.equal("root", doc.users[1].name)
    assert.is_true(doc.users[1].lock_passwd)
    assert.same({ SSH_KEY, (SSH_KEY:gsub(" deploy@example.com$", "")) },
      doc.users[1].ssh_authorized_keys)
    assert.is_false(doc.ssh_pwauth)
    assert.is_false(doc.disable_root)
  end)

  it("passes inputs to the script as arguments", function()
    local opts = sample_opts()
    local doc = parse(assert(cloud_init.user_data(opts)))
    assert.equal(1, #doc.runcmd)
    assert.same({ "/bin/sh", cloud_init.SCRIPT_PATH, "yes", "80",
      opts.daemon_url, SHA256, "10.0.0.0/8", "192.0.2.16/28",
      "2001:db8::/32" }, doc.runcmd[1])
  end)

  it("opens the configured public port to each broker", function()
    local opts = sample_opts()
    opts.daemon_config.public = { port = 8081 }
    opts.install_docker = false
    local doc = parse(assert(cloud_init.user_data(opts)))
    local command = doc.runcmd[1]
    assert.equal("no", command[3])
    assert.equal("8081", command[4])
    local script = cloud_init.PROVISION_SCRIPT
    assert.truthy(script:find("\nufw allow 22/tcp\n", 1, true))
    assert.truthy(script:find("\nufw default deny incoming\n", 1, true))
    assert.truthy(script:find('\nfor block in "$@"; do\n  ufw allow proto tcp '
      .. 'from "$block" to any port "$public_port"\ndone\n', 1, true))
    assert.truthy(script:find("\nufw --force enable\n", 1, true))
    for i, block in ipairs(opts.broker_cidrs) do
      assert.equal(block, command[6 + i])
    end
  end)

  it("adds extra packages and the timezone", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts())))
    assert.same({ "ufw", "curl", "ca-certificates", "libuv1",
      "libluajit-5.1-2", "lua-cjson", "htop" }, doc.packages)
    assert.equal("Europe/Berlin", doc.timezone)
    assert.is_true(doc.package_update)
  end)

  it("uses only allowlisted keys", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts())))
    assert.is_true(cloud_init.check(doc))
  end)

  it("provisioning script passes sh -n and shellcheck", async(function()
    local dir = temp_dir()
    local path = dir .. "/provision.sh"
    write_file(path, cloud_init.PROVISION_SCRIPT)
    local status, out = run("sh", { "-n", path })
    assert.equal(0, status, out)
    local sc_status, sc_out = run("shellcheck", { "-s", "sh", path })
    remove_tree(dir)
    assert.equal(0, sc_status, "shellcheck output:\n" .. sc_out)
  end, 60))
end)


describe("sshd drop-in", function()
  -- sshd -T prints the effective settings. It needs /run/sshd, which only
  -- a running ssh.service creates, so it runs with a private tmpfs on /run
  -- in its own mount namespace (unshare -m, needs root).
  local SSHD_T = 'mount -t tmpfs tmpfs /run && mkdir /run/sshd && '
    .. 'exec /usr/sbin/sshd -T -f "$1" -h "$2"'

  it("wins over later settings in sshd -T", async(function()
    local dir = temp_dir()
    local status, out = run("ssh-keygen", { "-q", "-t", "ed25519", "-N", "",
      "-f", dir .. "/host_key" })
    assert.equal(0, status, out)
    assert.equal(0, run("mkdir", { dir .. "/sshd_config.d" }))
    write_file(dir .. "/sshd_config.d/00-justavps.conf", cloud_init.SSHD_DROPIN)
    -- A later drop-in and the main file try to turn passwords back on, as
    -- an image's own configuration might.
    write_file(dir .. "/sshd_config.d/50-cloud-init.conf",
      "PasswordAuthentication yes\n")
    write_file(dir .. "/sshd_config", "Include " .. dir .. "/sshd_config.d/*.conf\n"
      .. "PasswordAuthentication yes\nPermitRootLogin yes\n"
      .. "KbdInteractiveAuthentication yes\n")

    local sstatus, settings = run("unshare", { "-m", "sh", "-c", SSHD_T, "sh",
      dir .. "/sshd_config", dir .. "/host_key" })
    remove_tree(dir)
    assert.equal(0, sstatus, "sshd -T output:\n" .. settings)
    assert.truthy(settings:find("\npasswordauthentication no\n", 1, true))
    assert.truthy(settings:find("\nkbdinteractiveauthentication no\n", 1, true))
    assert.truthy(settings:find("\npermitemptypasswords no\n", 1, true))
    -- sshd -T prints prohibit-password under its older name.
    assert.truthy(settings:find("\npermitrootlogin without-password\n", 1, true))
    assert.truthy(settings:find("\nauthenticationmethods publickey\n", 1, true))
  end, 60))
end)


describe("cloud_init.check", function()
  it("rejects an unknown top-level key", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts())))
    doc.pakages = { "nginx" }
    local ok, err, code = cloud_init.check(doc)
    assert.is_nil(ok)
    assert.equal("unknown_key", code)
    assert.truthy(err:find("pakages", 1, true))
  end)

  it("rejects an unknown key in a write_files item", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts())))
    doc.write_files[2].pemissions = "0644"
    local ok, err, code = cloud_init.check(doc)
    assert.is_nil(ok)
    assert.equal("unknown_key", code)
    assert.truthy(err:find("write_files[2].pemissions", 1, true))
  end)

  it("rejects an unknown key in a users item", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts())))
    doc.users[1].sudo = "ALL=(ALL) NOPASSWD:ALL"
    local ok, _, code = cloud_init.check(doc)
    assert.is_nil(ok)
    assert.equal("unknown_key", code)
  end)
end)


describe("cloud_init.user_data rejects", function()
  local function bad_config(changes)
    local conf = { slug = "demo-machine", token = TOKEN }
    for k, v in pairs(changes) do
      conf[k] = v
    end
    return conf
  end

  local cases = {
    { "short sha256", { daemon_sha256 = SHA256:sub(2) }, "invalid_sha256",
      "daemon_sha256" },
    { "non-hex sha256", { daemon_sha256 = SHA256:sub(2) .. "g" },
      "invalid_sha256", "daemon_sha256" },
    { "sha256 with a newline", { daemon_sha256 = SHA256 .. "\n" },
      "invalid_sha256", "daemon_sha256" },
    { "uppercase slug", { slug = "Demo" }, "invalid_slug", "slug" },
    { "short slug", { slug = "ab" }, "invalid_slug", "slug" },
    { "slug with a quote", { slug = "demo'x" }, "invalid_slug", "slug" },
    { "url with a space", { daemon_url = "http://127.0.0.1/a b" },
      "invalid_url", "daemon_url" },
    { "url with shell text", { daemon_url = "http://127.0.0.1/$(id)" },
      "invalid_url", "daemon_url" },
    { "url with a quote", { daemon_url = "http://127.0.0.1/a'b" },
      "invalid_url", "daemon_url" },
    { "file url", { daemon_url = "file:///etc/passwd" }, "invalid_url",
      "daemon_url" },
    { "url with credentials", { daemon_url = "http://u:p@127.0.0.1/x" },
      "invalid_url", "daemon_url" },
    { "url with a bad escape", { daemon_url = "http://127.0.0.1/%zz" },
      "invalid_url", "daemon_url" },
    { "url with a bad port", { daemon_url = "http://127.0.0.1:70000/x" },
      "invalid_url", "daemon_url" },
    { "url with a newline", { daemon_url = "http://127.0.0.1/x\n" },
      "invalid_url", "daemon_url" },
    { "cidr with host bits", { broker_cidrs = { "10.0.0.1/8" } },
      "invalid_cidr", "host bits" },
    { "cidr without prefix", { broker_cidrs = { "10.0.0.1" } },
      "invalid_cidr", "broker_cidrs[1]" },
    { "cidr /0", { broker_cidrs = { "0.0.0.0/0" } }, "invalid_cidr", "/0" },
    { "cidr prefix too long", { broker_cidrs = { "10.0.0.0/33" } },
      "invalid_cidr", "broker_cidrs[1]" },
    { "cidr with shell text", { broker_cidrs = { "10.0.0.0/8;id" } },
      "invalid_cidr", "broker_cidrs[1]" },
    { "ipv4-mapped cidr", { broker_cidrs = { "::ffff:10.0.0.0/8" } },
      "invalid_cidr", "IPv4-mapped" },
    { "empty broker list", { broker_cidrs = {} }, "invalid_cidr",
      "broker_cidrs" },
    { "key with a newline", { ssh_public_keys = { SSH_KEY .. "\nssh-rsa AAAA" } },
      "invalid_ssh_key", "ssh_public_keys[1]" },
    { "key with options", { ssh_public_keys = { 'command="sh" ' .. SSH_KEY } },
      "invalid_ssh_key", "ssh_public_keys[1]" },
    { "key of the wrong type",
      { ssh_public_keys = { (SSH_KEY:gsub("^ssh%-ed25519", "ssh-rsa")) } },
      "invalid_ssh_key", "another type" },
    { "key with bad base64",
      { ssh_public_keys = { "ssh-ed25519 AAAA!AAA comment" } },
      "invalid_ssh_key", "ssh_public_keys[1]" },
    { "no keys", { ssh_public_keys = {} }, "invalid_ssh_key",
      "ssh_public_keys" },
    { "config with an unknown key",
      { daemon_config = bad_config({ tokn = "x" }) },
      "invalid_daemon_config", "tokn: unknown key" },
    { "config without a token",
      { daemon_config = { slug = "demo-machine" } },
      "invalid_daemon_config", "token: required key is missing" },
    { "config with a bad port",
      { daemon_config = bad_config({ public = { port = "eighty" } }) },
      "invalid_daemon_config", "public.port" },
    { "config for another slug",
      { daemon_config = bad_config({ slug = "other-machine" }) },
      "invalid_daemon_config", "daemon_config.slug" },
    { "config with other brokers",
      { daemon_config = bad_config({ broker_cidrs = { "10.0.0.0/8" } }) },
      "invalid_daemon_config", "daemon_config.broker_cidrs" },
    { "config with another binary path",
      { daemon_config = bad_config({ update = { installed_path = "/opt/d" } }) },
      "invalid_daemon_config", "installed_path" },
    { "config with port 0",
      { daemon_config = bad_config({ public = { port = 0 } }) },
      "invalid_daemon_config", "public.port" },
    { "config with non-ASCII text",
      { daemon_config = bad_config({ shell = "/bin/\194\133sh" }) },
      "invalid_daemon_config", "non-ASCII" },
    { "config that is not a table", { daemon_config = "{}" },
      "invalid_daemon_config", "daemon_config" },
    { "unknown option", { instal_docker = false }, "invalid_option",
      "instal_docker" },
    { "install_docker as a string", { install_docker = "no" },
      "invalid_option", "install_docker" },
    { "bad timezone", { timezone = "Europe/Berlin; id" }, "invalid_option",
      "timezone" },
    { "bad package name", { extra_packages = { "htop", "-oAPT::x" } },
      "invalid_option", "extra_packages[2]" },
  }

  for _, case in ipairs(cases) do
    local name, overrides, code, fragment = case[1], case[2], case[3],
      case[4]
    it(name, function()
      local text, err, got = cloud_init.user_data(sample_opts(overrides))
      assert.is_nil(text)
      assert.equal(code, got)
      assert.truthy(err:find(fragment, 1, true),
        "message lacks " .. fragment .. ": " .. tostring(err))
    end)
  end

  it("a document over the size limit", function()
    local text, err, code = cloud_init.user_data(sample_opts({
      max_size = 4096 }))
    assert.is_nil(text)
    assert.equal("too_large", code)
    assert.truthy(err:find("4096", 1, true))
  end)
end)


describe("cloud_init.user_data accepts", function()
  it("IPv6 hosts, ports and query strings in the URL", function()
    local url = "https://[::1]:8443/r/justavps?X-Sig=a%2Fb&exp=1"
    local doc = parse(assert(cloud_init.user_data(sample_opts({
      daemon_url = url }))))
    assert.equal(url, doc.runcmd[1][5])
  end)

  it("an uppercase sha256 as lowercase", function()
    local doc = parse(assert(cloud_init.user_data(sample_opts({
      daemon_sha256 = SHA256:upper() }))))
    assert.equal(SHA256, doc.runcmd[1][6])
  end)

  it("matching broker_cidrs in the config", function()
    local opts = sample_opts()
    opts.daemon_config.broker_cidrs = { "2001:db8::/32", "10.0.0.0/8",
      "192.0.2.16/28" }
    assert.is_string(cloud_init.user_data(opts))
  end)
end)


describe("sshkey.generate", function()
  it("makes an ed25519 key pair with fingerprints", async(function()
    local _, before = run("sh", { "-c", "ls -d /tmp/justavps-sshkey.* 2>/dev/null" })
    local key = assert(sshkey.generate({ comment = "demo-machine" }))
    local _, after = run("sh", { "-c", "ls -d /tmp/justavps-sshkey.* 2>/dev/null" })
    assert.equal(before, after, "the temporary key directory was left behind")
    assert.truthy(key.public_key:match(
      "^ssh%-ed25519 AAAAC3NzaC1lZDI1NTE5[A-Za-z0-9+/]+=* demo%-machine$"))
    assert.truthy(key.private_key:match(
      "^%-%-%-%-%-BEGIN OPENSSH PRIVATE KEY%-%-%-%-%-\n"))
    assert.truthy(key.private_key:match(
      "\n%-%-%-%-%-END OPENSSH PRIVATE KEY%-%-%-%-%-\n$"))
    assert.truthy(key.fingerprint_md5:match("^%x%x" .. (":%x%x"):rep(15) .. "$"))
    assert.truthy(key.fingerprint_sha256:match("^SHA256:[A-Za-z0-9+/]+$"))
  end, 30))

  it("reports the SHA256 fingerprint of its key", async(function()
    local key = assert(sshkey.generate())
    -- The OpenSSH SHA256 fingerprint is the unpadded base64 SHA-256 of the
    -- decoded key blob.
    local blob = assert(crypto.base64_decode(key.public_key:match("^%S+ (%S+)")))
    local expected = "SHA256:"
      .. crypto.base64_encode(crypto.sha256(blob)):gsub("=+$", "")
    assert.equal(expected, key.fingerprint_sha256)
  end, 30))

  it("makes a key the user-data accepts", async(function()
    local key = assert(sshkey.generate())
    assert.is_string(cloud_init.user_data(sample_opts({
      ssh_public_keys = { key.public_key } })))
  end, 30))

  it("makes a new key on every call", async(function()
    local a = assert(sshkey.generate())
    local b = assert(sshkey.generate())
    assert.are_not.equal(a.public_key, b.public_key)
    assert.are_not.equal(a.fingerprint_md5, b.fingerprint_md5)
  end, 30))

  it("rejects a comment with a space", async(function()
    local key, err, code = sshkey.generate({ comment = "a b" })
    assert.is_nil(key)
    assert.equal("invalid_option", code)
    assert.truthy(err:find("comment", 1, true))
  end, 30))
end)


describe("cloud_init.BASE_PACKAGES", function()
  -- Packages a Debian cloud image always has.
  local PRESENT = { libc6 = true, libssl3 = true }

  it("installs every library the binary needs", function()
    local bin = (os.getenv("JV_BUILD_DIR") or "build") .. "/justavps"
    local readelf = assert(io.popen("readelf -d " .. bin))
    local needed = {}
    for line in readelf:lines() do
      local name = line:match("%(NEEDED%).-%[(.-)%]")
      -- A sanitizer build (tools/test.sh --sanitize) links the sanitizer
      -- runtimes, which a release binary never needs.
      if name and not name:match("^lib[a-z]*san%.so") then
        needed[#needed + 1] = name
      end
    end
    readelf:close()
    assert.is_true(#needed > 0, "readelf found no NEEDED entry in " .. bin)

    local wanted = {}
    for _, name in ipairs(cloud_init.BASE_PACKAGES) do
      wanted[name] = true
    end
    for _, lib in ipairs(needed) do
      -- Several packages may ship a file of that name (libc6 and
      -- libc6-i386 both have a libm.so.6, in other directories), and
      -- dpkg lists them in no set order: one of them must be installed.
      local dpkg = assert(io.popen("dpkg -S '*/" .. lib .. "' 2>/dev/null"))
      local owners, covered = {}, false
      for line in dpkg:lines() do
        for owner in (line:match("^(.-): /") or ""):gmatch("[^,%s]+") do
          owner = owner:match("^([^:]+)")
          owners[#owners + 1] = owner
          covered = covered or wanted[owner] or PRESENT[owner] or false
        end
      end
      dpkg:close()
      assert.is_true(#owners > 0, "no package owns " .. lib)
      assert.is_true(covered, lib .. " comes from "
        .. table.concat(owners, " or ") .. ", which BASE_PACKAGES lacks")
    end
    -- The binary requires cjson at run time rather than linking it.
    assert.is_true(wanted["lua-cjson"])
  end)
end)
