-- The edge's broker URLs: the forms accepted and the errors for the rest.
local edge_config = require("justavps.edge.config")

describe("edge broker url", function()
  local accepted = {
    { "http://127.0.0.1:8443", "127.0.0.1", 8443, false },
    { "https://10.0.0.5:8443", "10.0.0.5", 8443, true },
    { "HTTPS://[fd00::5]:443/", "fd00::5", 443, true },
  }

  for _, case in ipairs(accepted) do
    it("accepts " .. case[1], function()
      local host, port, https = edge_config.parse_broker_url(case[1])
      assert.equal(case[2], host)
      assert.equal(case[3], port)
      assert.equal(case[4], https)
    end)
  end

  local rejected = {
    { "ftp://127.0.0.1:21", "scheme" },
    { "http://broker.example:8443", "IP literal" },
    { "http://127.0.0.1", "IP literal" },
    { "http://127.0.0.1:0", "port" },
    { "http://127.0.0.1:8443/path", "no path" },
    { "127.0.0.1:8443", "expected" },
  }

  for _, case in ipairs(rejected) do
    it("rejects " .. case[1], function()
      local host, err = edge_config.parse_broker_url(case[1])
      assert.is_nil(host)
      assert.truthy(err:find(case[2], 1, true), err)
    end)
  end
end)
