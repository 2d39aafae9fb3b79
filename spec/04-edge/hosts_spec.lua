-- Host parsing of the edge: machine hosts, port hosts, case and port
-- handling, and hosts that are not the edge's.
local hosts = require("justavps.edge.hosts")

local DOMAIN = "example.test"

describe("edge hosts", function()
  it("parses a machine host", function()
    local h = hosts.parse("pale-fox.example.test", DOMAIN)
    assert.equal("machine", h.kind)
    assert.equal("pale-fox", h.slug)
    assert.is_nil(h.port)
    assert.equal("pale-fox.example.test", h.host)
  end)

  it("parses a port host", function()
    local h = hosts.parse("8080-pale-fox.example.test", DOMAIN)
    assert.equal("port", h.kind)
    assert.equal("pale-fox", h.slug)
    assert.equal(8080, h.port)
  end)

  it("ignores case and keeps the port in host", function()
    local h = hosts.parse("Pale-Fox.Example.TEST:8443", DOMAIN)
    assert.equal("pale-fox", h.slug)
    assert.equal("pale-fox.example.test:8443", h.host)
  end)

  it("accepts a trailing dot", function()
    local h = hosts.parse("pale-fox.example.test.", DOMAIN)
    assert.equal("pale-fox", h.slug)
  end)

  it("treats an out-of-range port label as a slug", function()
    local h = hosts.parse("99999-fox.example.test", DOMAIN)
    assert.equal("machine", h.kind)
    assert.equal("99999-fox", h.slug)
  end)

  it("treats a leading zero as a slug", function()
    local h = hosts.parse("080-fox.example.test", DOMAIN)
    assert.equal("machine", h.kind)
  end)

  local rejected = {
    { "another domain", "pale-fox.example.org" },
    { "the bare domain", "example.test" },
    { "a suffix without a dot", "pale-foxexample.test" },
    { "two labels", "a.pale-fox.example.test" },
    { "a short slug", "ab.example.test" },
    { "a long slug", string.rep("a", 41) .. ".example.test" },
    { "an underscore", "pale_fox.example.test" },
    { "a bad slug on a port host", "80-a_b.example.test" },
    { "an IPv6 literal", "[::1]:80" },
    { "a bad port", "pale-fox.example.test:99999" },
    { "an empty value", "" },
  }
  for _, case in ipairs(rejected) do
    it("rejects " .. case[1], function()
      assert.is_nil(hosts.parse(case[2], DOMAIN))
    end)
  end

  it("rejects nil", function()
    assert.is_nil(hosts.parse(nil, DOMAIN))
  end)
end)
