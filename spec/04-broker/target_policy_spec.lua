-- The broker's target policy as a pure function: no process and no
-- socket, so public addresses can be judged without being dialed.
local policy = require("policies.broker_target")

local DEFAULTS = { allow_networks = {}, deny_networks = {}, allow_ports = {} }


describe("broker target policy", function()
  local denied = {
    "0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "100.64.0.1",
    "100.127.255.254", "127.0.0.1", "127.8.9.10", "169.254.169.254",
    "169.254.0.1", "172.16.0.1", "172.31.255.255", "192.0.0.8",
    "192.0.2.1", "192.168.1.1", "198.18.0.1", "198.51.100.1",
    "203.0.113.1", "224.0.0.1", "239.255.255.250", "240.0.0.1",
    "255.255.255.255", "::", "::1", "::127.0.0.1", "::ffff:127.0.0.1",
    "::ffff:169.254.169.254", "::ffff:a9fe:a9fe", "64:ff9b::a00:1",
    "2001:db8::1", "2002:a00:1::1", "2001::1", "fc00::1", "fd00:ec2::254",
    "fe80::1", "FE80::1", "fec0::1", "ff02::1",
  }

  for _, ip in ipairs(denied) do
    it("denies " .. ip .. " by default", function()
      local ok, reason = policy.allowed(ip, 80, DEFAULTS)
      assert.is_false(ok)
      assert.is_string(reason)
    end)
  end

  local public = { "8.8.8.8", "1.1.1.1", "100.63.255.255", "100.128.0.0",
    "172.15.255.255", "172.32.0.0", "192.169.0.1", "2a01:4f8::1",
    "2606:4700::1111", "::ffff:8.8.8.8" }

  for _, ip in ipairs(public) do
    it("allows public " .. ip, function()
      assert.is_true(policy.allowed(ip, 80, DEFAULTS))
    end)
  end

  it("denies what is not an IP literal", function()
    for _, s in ipairs({ "localhost", "", "1.2.3", "fe80::1%eth0" }) do
      assert.is_false(policy.allowed(s, 80, DEFAULTS))
    end
  end)

  it("allows a reserved range named in allow_networks", function()
    local conf = { allow_networks = { "127.0.0.0/8", "::1/128" },
      deny_networks = {}, allow_ports = {} }
    assert.is_true(policy.allowed("127.0.0.1", 80, conf))
    assert.is_true(policy.allowed("::1", 80, conf))
    assert.is_true(policy.allowed("::ffff:127.0.0.1", 80, conf))
    assert.is_false(policy.allowed("169.254.169.254", 80, conf))
    assert.is_false(policy.allowed("10.0.0.1", 80, conf))
  end)

  it("lets deny_networks win over allow_networks", function()
    local conf = { allow_networks = { "127.0.0.0/8" },
      deny_networks = { "127.0.0.2/32", "8.8.8.0/24" }, allow_ports = {} }
    assert.is_true(policy.allowed("127.0.0.1", 80, conf))
    local ok, reason = policy.allowed("127.0.0.2", 80, conf)
    assert.is_false(ok)
    assert.truthy(reason:find("127.0.0.2/32", 1, true))
    assert.is_false(policy.allowed("8.8.8.8", 80, conf))
    assert.is_true(policy.allowed("8.8.4.4", 80, conf))
  end)

  it("limits ports to allow_ports when set", function()
    local conf = { allow_networks = {}, deny_networks = {},
      allow_ports = { 80 } }
    assert.is_true(policy.allowed("8.8.8.8", 80, conf))
    local ok, reason = policy.allowed("8.8.8.8", 22, conf)
    assert.is_false(ok)
    assert.truthy(reason:find("allow_ports", 1, true))
  end)

  it("validates its network lists", function()
    assert.is_true(policy.validate(DEFAULTS))
    local ok, err = policy.validate({ allow_networks = { "10.0.0.0/40" },
      deny_networks = {} })
    assert.is_nil(ok)
    assert.truthy(err:find("allow_networks", 1, true))
    ok, err = policy.validate({ allow_networks = {},
      deny_networks = { "nonsense" } })
    assert.is_nil(ok)
    assert.truthy(err:find("deny_networks", 1, true))
  end)
end)
