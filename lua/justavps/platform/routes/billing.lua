-- Billing with Stripe: POST /api/v1/billing/checkout starts a Checkout
-- Session for the caller's account, and POST /api/v1/billing/webhook
-- receives Stripe's signed events. A webhook is verified before its JSON
-- is parsed and is recorded once per Stripe event id, so a repeated
-- delivery changes nothing.
local log = require("justavps.log")
local json = require("justavps.json")
local api_mod = require("justavps.platform.api")
local state = require("justavps.platform.state")
local stripe = require("justavps.platform.stripe")

local type = type
local ipairs = ipairs
local concat = table.concat

-- Largest webhook body accepted. Stripe events are a few KiB.
local MAX_WEBHOOK_BODY = 512 * 1024

-- Settings Checkout needs, in the order a message lists them.
local CHECKOUT_SETTINGS = { "base_url", "secret_key", "price_id",
  "success_url", "cancel_url" }


local function database_error(what, err, code)
  if code == "database_unavailable" or code == "timeout" then
    log.err(what .. " failed: database unavailable", { error = err,
      code = code })
    return api_mod.error(503, "database_unavailable",
      "the database is unavailable; retry later")
  end
  log.err(what .. " failed", { error = err, code = code })
  return api_mod.error(500, "internal", "internal server error")
end


local function checkout(ctx)
  local conf = state.conf.stripe
  local missing = {}
  for _, name in ipairs(CHECKOUT_SETTINGS) do
    if conf[name] == "" then
      missing[#missing + 1] = "stripe." .. name
    end
  end
  if #missing > 0 then
    return api_mod.error(503, "billing_not_configured", "billing is off: "
      .. "set " .. concat(missing, ", "))
  end

  local account_id = ctx.user.account_id
  local customer, cerr, ccode = stripe.customer_of(account_id)
  if cerr then
    return database_error("billing customer lookup", cerr, ccode)
  end

  local params = {
    { "mode", "subscription" },
    { "line_items[0][price]", conf.price_id },
    { "line_items[0][quantity]", "1" },
    { "success_url", conf.success_url },
    { "cancel_url", conf.cancel_url },
    { "client_reference_id", account_id },
    { "metadata[account_id]", account_id },
  }
  if customer then
    params[#params + 1] = { "customer", customer }
  elseif ctx.user.email then
    params[#params + 1] = { "customer_email", ctx.user.email }
  end

  local session, err, code = stripe.create_checkout_session({
    base_url = conf.base_url, secret_key = conf.secret_key,
    timeout = conf.timeout, params = params })
  if not session then
    log.err("Checkout Session not created", { account_id = account_id,
      error = err, code = code })
    return api_mod.error(502, "stripe_unavailable", "Stripe did not "
      .. "create the Checkout Session; retry later")
  end
  log.info("Checkout Session created", { account_id = account_id,
    session_id = session.id })
  return 201, { id = session.id, url = session.url }
end


local function webhook(ctx)
  local secret = state.conf.stripe.webhook_secret
  if secret == "" then
    return api_mod.error(503, "billing_not_configured", "webhooks are off: "
      .. "set stripe.webhook_secret")
  end

  local payload = ctx.raw_body
  local ok, err, code = stripe.verify(payload,
    ctx.req:header("stripe-signature"), secret,
    { tolerance = state.conf.stripe.tolerance })
  if not ok then
    log.warn("webhook rejected", { error = err, code = code })
    return api_mod.error(400, code, err)
  end

  local event = json.decode(payload)
  if type(event) ~= "table" or type(event.id) ~= "string"
      or type(event.type) ~= "string" then
    return api_mod.error(400, "invalid_request",
      "the event must be a JSON object with string id and type")
  end

  local outcome, rerr, rcode = stripe.record_event(event, payload)
  if not outcome then
    -- Stripe retries a delivery that does not get a 2xx, so the event is
    -- not lost.
    return database_error("webhook " .. event.id, rerr, rcode)
  end
  log.info("webhook received", { event_id = event.id, type = event.type,
    outcome = outcome })
  return 200, { received = true, duplicate = outcome == "duplicate" }
end


return function(api)
  api:route({
    method = "POST", path = "/api/v1/billing/checkout",
    name = "create_checkout_session", auth = "user", scope = "write",
    status = 201,
    summary = "Start a Stripe Checkout Session for the caller's account",
    handler = checkout,
  })

  api:route({
    method = "POST", path = "/api/v1/billing/webhook",
    name = "stripe_webhook", auth = "none", raw_body = true,
    max_body = MAX_WEBHOOK_BODY,
    summary = "Receive a Stripe event signed with Stripe-Signature",
    handler = webhook,
  })
end
