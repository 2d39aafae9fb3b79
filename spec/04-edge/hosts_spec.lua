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
  describe("lookup", function()
    local VALUES = {
      "pale-fox.example.test",
      "8080-pale-fox.example.test",
      "Pale-Fox.Example.TEST:8443",
      "pale-fox.other.test",
      "[::1]:8080",
      "",
    }

    it("returns what parse returns", function()
      for _, value in ipairs(VALUES) do
        for _ = 1, 2 do
          assert.same(hosts.parse(value, DOMAIN), hosts.lookup(value, DOMAIN),
            value)
        end
      end
      assert.is_nil(hosts.lookup(nil, DOMAIN))
    end)

    it("parses again for another domain", function()
      local h = hosts.lookup("pale-fox.example.test", DOMAIN)
      assert.equal("pale-fox", h.slug)
      assert.is_nil(hosts.lookup("pale-fox.example.test", "other.test"))
      local other = hosts.lookup("pale-fox.other.test", "other.test")
      assert.equal("pale-fox", other.slug)
      assert.equal("pale-fox.example.test",
        hosts.lookup("pale-fox.example.test", DOMAIN).host)
    end)

    it("keeps no memory for hosts that are not the edge's", function()
      collectgarbage()
      local before = collectgarbage("count")
      for i = 1, 2000 do
        assert.is_nil(hosts.lookup(("x"):rep(10000) .. i .. ".elsewhere",
          DOMAIN))
      end
      collectgarbage()
      -- Kept, the values would take about 20 MB; the bound is 2 MiB.
      assert.is_true(collectgarbage("count") - before < 2048)
    end)

    it("stays correct past its bound", function()
      for i = 1, 3000 do
        local value = "m" .. i .. "-fox.example.test"
        assert.equal("m" .. i .. "-fox", hosts.lookup(value, DOMAIN).slug)
      end
      assert.equal("m1-fox", hosts.lookup("m1-fox.example.test", DOMAIN).slug)
    end)
  end)
end)
