-- Billing against a real platform process, a fresh database and a fake
-- Stripe API on loopback: Checkout Session creation, signed webhooks
-- (recorded once per event id, applied to billing_customers), rejected
-- signatures, and the 503 answers of a platform without billing or a
-- catalog provider.
local core = require("justavps.core")
local fixtures = require("support.fixtures")
local json = require("justavps.json")
local helpers = require("support.helpers")

local async = helpers.async
local crypto = core.crypto

local platform = require("support.platform")

local WEBHOOK_SECRET = "whsec_test_secret"
local SECRET_KEY = "sk_test_fake_0123456789"


local function read_fixture(name)
  return fixtures.read("stripe/" .. name)
end


local function parse_form(body)
  local out = {}
  for pair in body:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=(.*)$")
    local function decode(s)
      return (s:gsub("+", " "):gsub("%%(%x%x)", function(h)
        return string.char(tonumber(h, 16))
      end))
    end
    out[decode(k)] = decode(v)
  end
  return out
end


-- Starts a fake Stripe API that answers POST /v1/checkout/sessions and
-- records each request it gets in seen.
local function start_fake_stripe()
  local seen = {}
  local server = assert(core.http.listen({ host = "127.0.0.1", port = 0,
    access_log = false,
    handler = function(req)
      local parts = {}
      while true do
        local chunk = req:read()
        if not chunk then
          break
        end
        parts[#parts + 1] = chunk
      end
      local form = parse_form(table.concat(parts))
      seen[#seen + 1] = { method = req.method, path = req.path,
        authorization = req:header("authorization"), form = form }
      local headers = { ["Content-Type"] = "application/json" }
      if req.path ~= "/v1/checkout/sessions" then
        return 404, headers, json.encode({ error = { message = "no route" } })
      end
      if form.cancel_url == "http://127.0.0.1/fail" then
        return 400, headers, json.encode({ error = { message = "bad request" } })
      end
      return 200, headers, json.encode({ id = "cs_test_" .. #seen,
        object = "checkout.session",
        url = "https://checkout.example.com/c/pay/cs_test_" .. #seen })
    end,
  }))
  return server, seen
end


local function sign(payload, t, secret)
  t = tostring(t or os.time())
  return "t=" .. t .. ",v1="
    .. crypto.hex_encode(crypto.hmac_sha256(secret or WEBHOOK_SECRET, t .. "." .. payload))
end


describe("platform billing", function()
  local db, stripe_server, stripe_seen
  local processes = {}
  local port, bare_port
  local owner

  local function sql(query, params)
    return db:sql(query, params)
  end

  -- Sends a request to the platform on on_port (default: the one with
  -- Stripe configured).
  local function request(method, path, headers, body, on_port)
    return platform.request_port(on_port or port, method, path, headers,
      body)
  end

  -- Starts a platform with the extra environment and returns its port.
  local function start_platform(extra)
    local p = platform.start(db, { env = extra })
    processes[#processes + 1] = p
    return p.port
  end

  local function webhook(payload, header, on_port)
    return request("POST", "/api/v1/billing/webhook",
      { ["Content-Type"] = "application/json", ["Stripe-Signature"] = header },
      payload, on_port)
  end

  local function event_count(id)
    return tonumber(sql("SELECT count(*) AS n FROM billing_events "
      .. "WHERE stripe_event_id = $1", { id })[1].n)
  end

  setup(function()
    helpers.run(function()
      db = platform.database()
      stripe_server, stripe_seen = start_fake_stripe()
      port = start_platform({
        JUSTAVPS_PLATFORM_STRIPE_BASE_URL = "http://127.0.0.1:" .. stripe_server:port(),
        JUSTAVPS_PLATFORM_STRIPE_SECRET_KEY = SECRET_KEY,
        JUSTAVPS_PLATFORM_STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET,
        JUSTAVPS_PLATFORM_STRIPE_PRICE_ID = "price_pro_monthly",
        JUSTAVPS_PLATFORM_STRIPE_SUCCESS_URL = "https://app.example.com/billing/ok",
        JUSTAVPS_PLATFORM_STRIPE_CANCEL_URL = "https://app.example.com/billing",
      })
      bare_port = start_platform()

      owner = processes[1]:signup("payer@example.com")
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      for _, p in ipairs(processes) do
        p:stop()
      end
      if stripe_server then
        stripe_server:close()
      end
      if db then
        db:drop()
      end
    end, 60)
  end)

  local function as_session(on_port)
    return { Cookie = owner.cookie, ["X-CSRF-Token"] = owner.csrf,
      ["Content-Type"] = "application/json" }, on_port
  end

  it("creates a Checkout Session at Stripe", async(function()
    local headers = as_session()
    local status, body = request("POST", "/api/v1/billing/checkout", headers, "")
    assert.equal(201, status, json.encode(body))
    assert.truthy(body.id:find("^cs_test_"))
    assert.truthy(body.url:find("^https://checkout.example.com/"))

    local call = stripe_seen[#stripe_seen]
    assert.equal("POST", call.method)
    assert.equal("/v1/checkout/sessions", call.path)
    assert.equal("Bearer " .. SECRET_KEY, call.authorization)
    assert.equal("subscription", call.form.mode)
    assert.equal("price_pro_monthly", call.form["line_items[0][price]"])
    assert.equal("1", call.form["line_items[0][quantity]"])
    assert.equal(owner.account_id, call.form.client_reference_id)
    assert.equal("payer@example.com", call.form.customer_email)
    assert.equal("https://app.example.com/billing/ok", call.form.success_url)
  end))

  it("records a webhook once", async(function()
    local payload = read_fixture("checkout_session_completed.json")
      :gsub('"client_reference_id": "user_1234"',
        '"client_reference_id": "' .. owner.account_id .. '"')
    assert.truthy(payload:find(owner.account_id, 1, true))

    local status, body = webhook(payload, sign(payload))
    assert.equal(200, status, json.encode(body))
    assert.is_false(body.duplicate)
    local again_status, again = webhook(payload, sign(payload))
    assert.equal(200, again_status)
    assert.is_true(again.duplicate)

    assert.equal(1, event_count("evt_1TestCheckoutCompleted01"))
    local event = sql("SELECT account_id, processed_at IS NOT NULL AS done, "
      .. "error FROM billing_events WHERE stripe_event_id = $1",
      { "evt_1TestCheckoutCompleted01" })[1]
    assert.equal(owner.account_id, event.account_id)
    assert.is_true(event.done)
    local customer = sql("SELECT stripe_customer_id, stripe_subscription_id "
      .. "FROM billing_customers WHERE account_id = $1", { owner.account_id })[1]
    assert.equal("cus_TestCustomer0001", customer.stripe_customer_id)
    assert.equal("sub_1TestSubscription0001", customer.stripe_subscription_id)
  end))

  it("applies a subscription status", async(function()
    local payload = read_fixture("customer_subscription_updated.json")
    local status = webhook(payload, sign(payload))
    assert.equal(200, status)
    local customer = sql("SELECT subscription_status, "
      .. "extract(epoch FROM current_period_end)::bigint AS period_end "
      .. "FROM billing_customers WHERE account_id = $1", { owner.account_id })[1]
    assert.equal("past_due", customer.subscription_status)
    assert.equal(1789894890, tonumber(customer.period_end))
  end))

  it("records an invoice event for the customer's account", async(function()
    local payload = read_fixture("invoice_payment_failed.json")
    local status = webhook(payload, sign(payload))
    assert.equal(200, status)
    local event = sql("SELECT account_id, type FROM billing_events "
      .. "WHERE stripe_event_id = $1", { "evt_1TestInvoicePayFailed01" })[1]
    assert.equal(owner.account_id, event.account_id)
    assert.equal("invoice.payment_failed", event.type)
  end))

  it("uses the known customer at Checkout", async(function()
    local status = request("POST", "/api/v1/billing/checkout", as_session(), "")
    assert.equal(201, status)
    local call = stripe_seen[#stripe_seen]
    assert.equal("cus_TestCustomer0001", call.form.customer)
    assert.is_nil(call.form.customer_email)
  end))

  local payload = read_fixture("invoice_paid.json")
  local rejected = {
    { "a tampered payload", payload:gsub("1900", "1"), sign(payload),
      "invalid_signature" },
    { "a wrong secret", payload, sign(payload, nil, "whsec_wrong_secret"),
      "invalid_signature" },
    { "an old timestamp", payload, sign(payload, os.time() - 301),
      "timestamp_outside_tolerance" },
    { "no signature header", payload, nil, "invalid_signature_header" },
    { "only a v0 signature", payload, sign(payload):gsub("v1=", "v0="),
      "invalid_signature_header" },
  }
  for _, case in ipairs(rejected) do
    it("rejects " .. case[1], async(function()
      assert.are_not.equal(case[2], nil)
      local status, body = webhook(case[2], case[3])
      assert.equal(400, status)
      assert.equal(case[4], body.error.code)
      assert.equal(0, event_count("evt_1TestInvoicePaid000001"))
    end))
  end

  it("rejects a signed body that is not an event", async(function()
    local body_text = '{"object":"event"}'
    local status, body = webhook(body_text, sign(body_text))
    assert.equal(400, status)
    assert.equal("invalid_request", body.error.code)
  end))

  it("answers 503 without billing settings", async(function()
    local headers = as_session()
    local status, body = request("POST", "/api/v1/billing/checkout", headers, "",
      bare_port)
    assert.equal(503, status)
    assert.equal("billing_not_configured", body.error.code)
    assert.truthy(body.error.message:find("stripe.base_url", 1, true))

    local wstatus, wbody = webhook(payload, sign(payload), bare_port)
    assert.equal(503, wstatus)
    assert.equal("billing_not_configured", wbody.error.code)
    assert.equal(0, event_count("evt_1TestInvoicePaid000001"))
  end))

  it("answers 503 without a catalog provider", async(function()
    for _, path in ipairs({ "/api/v1/regions", "/api/v1/server-types" }) do
      local status, body = request("GET", path, as_session())
      assert.equal(503, status)
      assert.equal("provider_not_configured", body.error.code)
    end
  end))
end)
