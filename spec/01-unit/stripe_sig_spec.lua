-- Stripe webhook signatures (the v1 scheme of Stripe-Signature) against
-- test vectors computed apart from this code with python3 hmac and
-- hashlib, plus header parsing and form encoding of the Checkout call.
local json = require("justavps.json")
local fixtures = require("support.fixtures")
local stripe = require("justavps.platform.stripe")

local SECRET = "whsec_test_secret"
local BODY = '{"id":"evt_test_webhook","object":"event"}'
local V1 = "f7ce7f288c4790b5ca55ef895aa690d984fb194728c44f2f97cd19873e2a7e1f"


local function read_fixture(name)
  return fixtures.read("stripe/" .. name)
end


describe("stripe webhook signature", function()
  local vectors = json.decode(read_fixture("signature_vectors.json"))

  it("has the vectors", function()
    assert.is_true(#vectors.cases >= 12)
  end)

  for _, case in ipairs(vectors.cases) do
    it("vector " .. case.name, function()
      local payload = case.payload or read_fixture(case.payload_file)
      local ok, err, code = stripe.verify(payload, case.header, case.secret,
        { now = case.now, tolerance = vectors.tolerance_seconds })
      if case.expect == "valid" then
        assert.is_true(ok, err)
      else
        assert.is_nil(ok)
        assert.is_string(err)
        assert.is_string(code)
      end
    end)
  end

  it("signs the documented vector", function()
    assert.equal(V1, stripe.sign(BODY, "1784538100", SECRET))
  end)

  local header = "t=1784538100,v1=" .. V1

  it("accepts the second of two v1", function()
    assert.is_true(stripe.verify(BODY, "t=1784538100,v1=" .. ("0"):rep(64)
      .. ",v1=" .. V1, SECRET, { now = 1784538105 }))
  end)

  it("rejects a v0 without v1", function()
    local ok, _, code = stripe.verify(BODY, "t=1784538100,v0=" .. V1, SECRET,
      { now = 1784538105 })
    assert.is_nil(ok)
    assert.equal("invalid_signature_header", code)
  end)

  it("rejects a tampered payload", function()
    local ok, _, code = stripe.verify(BODY .. " ", header, SECRET,
      { now = 1784538105 })
    assert.is_nil(ok)
    assert.equal("invalid_signature", code)
  end)

  it("rejects a wrong secret", function()
    local ok, _, code = stripe.verify(BODY, header, "whsec_wrong_secret",
      { now = 1784538105 })
    assert.is_nil(ok)
    assert.equal("invalid_signature", code)
  end)

  it("rejects an old timestamp", function()
    local ok, _, code = stripe.verify(BODY, header, SECRET, { now = 1784538401 })
    assert.is_nil(ok)
    assert.equal("timestamp_outside_tolerance", code)
  end)

  it("accepts age equal to tolerance", function()
    assert.is_true(stripe.verify(BODY, header, SECRET, { now = 1784538400 }))
  end)

  it("rejects a far future timestamp", function()
    local ok, _, code = stripe.verify(BODY, header, SECRET, { now = 1784537799 })
    assert.is_nil(ok)
    assert.equal("timestamp_outside_tolerance", code)
  end)

  it("applies a custom tolerance", function()
    local ok = stripe.verify(BODY, header, SECRET, { now = 1784538111, tolerance = 10 })
    assert.is_nil(ok)
  end)

  local bad_headers = {
    { "missing header", nil },
    { "empty header", "" },
    { "no t", "v1=" .. V1 },
    { "non-numeric t", "t=abc,v1=" .. V1 },
    { "negative t", "t=-5,v1=" .. V1 },
    { "two t", "t=1784538100,t=1784538100,v1=" .. V1 },
    { "spaces", "t=1784538100, v1=" .. V1 },
  }
  for _, case in ipairs(bad_headers) do
    it("rejects header with " .. case[1], function()
      local ok, err = stripe.verify(BODY, case[2], SECRET, { now = 1784538105 })
      assert.is_nil(ok)
      assert.is_string(err)
    end)
  end

  it("raises without a secret", function()
    assert.has_error(function()
      stripe.verify(BODY, header, "")
    end)
  end)
end)


describe("stripe form encoding", function()
  it("encodes brackets and reserved characters", function()
    assert.equal("line_items%5B0%5D%5Bprice%5D=price_1&success_url="
      .. "https%3A%2F%2Fx.test%2Fok%3Fa%3D1%26b%3D2",
      stripe.form_encode({ { "line_items[0][price]", "price_1" },
        { "success_url", "https://x.test/ok?a=1&b=2" } }))
  end)
end)
