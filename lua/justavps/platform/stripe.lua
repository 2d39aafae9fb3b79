-- Stripe billing: webhook signature verification, the Checkout Session
-- call, and the data layer of billing_events and billing_customers.
--
-- Webhook signatures follow Stripe's v1 scheme, as the official SDKs
-- verify it (stripe-python stripe/_webhook.py, stripe-node
-- src/Webhooks.ts): the Stripe-Signature header is a comma-separated list
-- of key=value items with one t (Unix seconds) and one or more v1 (hex
-- HMAC-SHA256, key = the whole endpoint secret including "whsec_", message
-- = t .. "." .. raw body). Any v1 may match, v0 and other items are
-- ignored, and an age above the tolerance is rejected.
local core = require("justavps.core")
local db = require("justavps.db.db")
local json = require("justavps.json")

local crypto = core.crypto
local hmac_sha256 = crypto.hmac_sha256
local hex_encode = crypto.hex_encode
local constant_time_equal = crypto.constant_time_equal

local type = type
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local format = string.format
local byte = string.byte
local smatch = string.match
local sgsub = string.gsub
local sgmatch = string.gmatch
local concat = table.concat
local os_time = os.time

local _M = {}

-- Default webhook tolerance in seconds, the SDKs' default.
_M.DEFAULT_TOLERANCE = 300

-- Largest Checkout response read.
local MAX_RESPONSE = 256 * 1024

local UUID_PATTERN = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-"
  .. "%x%x%x%x%x%x%x%x%x%x%x%x$"


-- Parses a Stripe-Signature header. Returns the t item as sent and the
-- list of v1 values, or nil, message.
function _M.parse_header(header)
  if type(header) ~= "string" or header == "" then
    return nil, "missing Stripe-Signature header"
  end
  local t
  local signatures = {}
  for item in sgmatch(header .. ",", "([^,]*),") do
    local key, value = smatch(item, "^([^=]*)=(.*)$")
    if key == "t" then
      if t ~= nil then
        return nil, "Stripe-Signature has more than one t item"
      end
      t = value
    elseif key == "v1" then
      signatures[#signatures + 1] = value
    end
  end
  -- At most 15 digits, so the number converts to a Lua number exactly.
  if not t or not smatch(t, "^%d%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?$")
  then
    return nil, "Stripe-Signature has no valid t (timestamp) item"
  end
  if #signatures == 0 then
    return nil, "Stripe-Signature has no v1 signature"
  end
  return t, signatures
end


-- Returns the lowercase hex v1 signature of payload at timestamp t (a
-- string, as it appears in the header) under secret.
function _M.sign(payload, t, secret)
  return hex_encode(hmac_sha256(secret, t .. "." .. payload))
end


-- Verifies a webhook delivery. payload is the raw body, header the
-- Stripe-Signature value, secret the endpoint signing secret. opts: now
-- (Unix seconds, default the clock), tolerance (seconds, default 300).
-- Returns true, or nil, message, code where code is
-- "invalid_signature_header", "invalid_signature" or
-- "timestamp_outside_tolerance". A timestamp more than the tolerance in
-- the future is rejected as well, a local choice the SDKs do not make.
function _M.verify(payload, header, secret, opts)
  if type(payload) ~= "string" or type(secret) ~= "string"
      or secret == "" then
    error("stripe.verify: payload and a non-empty secret are required", 2)
  end
  opts = opts or {}
  local t, signatures = _M.parse_header(header)
  if not t then
    return nil, signatures, "invalid_signature_header"
  end

  local expected = _M.sign(payload, t, secret)
  -- Every v1 is compared, so the time taken does not depend on which
  -- one matched.
  local matched = false
  for _, candidate in ipairs(signatures) do
    if constant_time_equal(expected, candidate) then
      matched = true
    end
  end
  if not matched then
    return nil, "no v1 signature matches the payload", "invalid_signature"
  end

  local now = opts.now or os_time()
  local tolerance = opts.tolerance or _M.DEFAULT_TOLERANCE
  local age = now - tonumber(t)
  if age > tolerance or age < -tolerance then
    return nil, format("signature timestamp is %d seconds from now, "
      .. "outside the tolerance of %d seconds", age, tolerance),
      "timestamp_outside_tolerance"
  end
  return true
end


-- Checkout ---------------------------------------------------------------

local function percent_encode(s)
  return (sgsub(tostring(s), "[^%w%-%._~]", function(c)
    return format("%%%02X", byte(c))
  end))
end


-- Encodes a list of { name, value } pairs as
-- application/x-www-form-urlencoded, the body form of Stripe's API.
function _M.form_encode(params)
  local parts = {}
  for i, pair in ipairs(params) do
    parts[i] = percent_encode(pair[1]) .. "=" .. percent_encode(pair[2])
  end
  return concat(parts, "&")
end


-- Sends one request through core.curl, which resolves names and speaks
-- TLS, so production can set base_url to https://api.stripe.com. opts:
-- method, url, headers, body, timeout. Returns status, body text, or nil,
-- message, code. Reuse is off: a create must never be resent by libcurl.
local function default_http_request(opts)
  local res, err, code = core.curl.request({ method = opts.method,
    url = opts.url, headers = opts.headers, body = opts.body,
    timeout = opts.timeout, max_body = MAX_RESPONSE, reuse = false })
  if not res then
    return nil, err, code
  end
  return res.status, res.body
end

-- The function Checkout calls send requests with. Tests and other
-- transports replace it with one of the same contract.
_M.http_request = default_http_request


-- Creates a Checkout Session (POST {base_url}/v1/checkout/sessions).
-- opts: base_url, secret_key, timeout, params (a list of { name, value }
-- form pairs). Returns the decoded session (with id and url), or nil,
-- message, code where code is "stripe_unavailable" for a failed call and
-- "stripe_error" for a response other than 200.
function _M.create_checkout_session(opts)
  local url = (sgsub(opts.base_url, "/+$", "")) .. "/v1/checkout/sessions"
  local status, text, code = _M.http_request({
    method = "POST", url = url, timeout = opts.timeout,
    headers = {
      Authorization = "Bearer " .. opts.secret_key,
      ["Content-Type"] = "application/x-www-form-urlencoded",
    },
    body = _M.form_encode(opts.params),
  })
  if not status then
    return nil, "Stripe call failed: " .. tostring(text) .. " ("
      .. tostring(code) .. ")", "stripe_unavailable"
  end
  local decoded = json.decode(text)
  if status ~= 200 then
    local message = type(decoded) == "table"
      and type(decoded.error) == "table"
      and type(decoded.error.message) == "string"
      and decoded.error.message or "no message"
    return nil, format("Stripe returned status %d: %s", status,
      message:sub(1, 300)), "stripe_error"
  end
  if type(decoded) ~= "table" or type(decoded.id) ~= "string"
      or type(decoded.url) ~= "string" then
    return nil, "Stripe returned a Checkout Session without id or url",
      "stripe_error"
  end
  return decoded
end


-- Data layer -------------------------------------------------------------

-- Returns the Stripe customer id of an account, or nil when it has none,
-- or nil, message, code on a database failure.
function _M.customer_of(account_id)
  local rows, err, code = db.rows(
    "SELECT stripe_customer_id FROM billing_customers "
      .. "WHERE account_id = $1", { account_id })
  if not rows then
    return nil, err, code
  end
  return rows[1] and rows[1].stripe_customer_id or nil
end


local function string_or_nil(v)
  return type(v) == "string" and v ~= "" and v or nil
end


-- Returns the account id an event concerns: the checkout session's
-- client_reference_id when it names an account, else the account whose
-- billing_customers row has the event's customer.
local function account_of(tx, object)
  local reference = string_or_nil(object.client_reference_id)
  if reference and smatch(reference, UUID_PATTERN) then
    local rows, err, code = tx:rows(
      "SELECT id FROM accounts WHERE id = $1", { reference })
    if not rows then
      return nil, err, code
    end
    if rows[1] then
      return rows[1].id
    end
  end
  local customer = string_or_nil(object.customer)
  if customer then
    local rows, err, code = tx:rows(
      "SELECT account_id FROM billing_customers "
        .. "WHERE stripe_customer_id = $1", { customer })
    if not rows then
      return nil, err, code
    end
    if rows[1] then
      return rows[1].account_id
    end
  end
  return false
end


-- Returns the latest current_period_end of a subscription's items (Unix
-- seconds), or nil. Since API version 2025-03-31 the period is per item.
local function period_end(subscription)
  local items = type(subscription.items) == "table"
    and subscription.items.data
  local latest
  if type(items) == "table" then
    for _, item in ipairs(items) do
      local v = type(item) == "table" and item.current_period_end
      if type(v) == "number" and (not latest or v > latest) then
        latest = v
      end
    end
  end
  return latest
end


-- Applies an event to billing_customers. Returns true, a note for
-- billing_events.error when the event could not be applied, or nil,
-- message, code on a database failure.
local function apply_event(tx, event_type, object, account_id)
  if event_type == "checkout.session.completed" then
    local customer = string_or_nil(object.customer)
    if not account_id or not customer then
      return true, "checkout session names no known account or customer"
    end
    local _, err, code = tx:query(
      "INSERT INTO billing_customers (account_id, stripe_customer_id, "
        .. "stripe_subscription_id) VALUES ($1, $2, $3) "
        .. "ON CONFLICT (account_id) DO UPDATE SET "
        .. "stripe_customer_id = EXCLUDED.stripe_customer_id, "
        .. "stripe_subscription_id = COALESCE("
        .. "EXCLUDED.stripe_subscription_id, "
        .. "billing_customers.stripe_subscription_id)",
      { account_id, customer, string_or_nil(object.subscription), n = 3 })
    if code then
      return nil, err, code
    end
    return true
  end

  if event_type == "customer.subscription.created"
      or event_type == "customer.subscription.updated"
      or event_type == "customer.subscription.deleted" then
    local customer = string_or_nil(object.customer)
    local status = string_or_nil(object.status)
    if not customer or not status then
      return true, "subscription event without customer or status"
    end
    local rows, err, code = tx:rows(
      "UPDATE billing_customers SET stripe_subscription_id = $2, "
        .. "subscription_status = $3, "
        .. "current_period_end = to_timestamp($4) "
        .. "WHERE stripe_customer_id = $1 RETURNING account_id",
      { customer, string_or_nil(object.id), status, period_end(object),
        n = 4 })
    if not rows then
      return nil, err, code
    end
    if not rows[1] then
      return true, "no account has customer " .. customer
    end
    return true
  end

  -- Invoices and other types are recorded only: the subscription events
  -- carry the status that access depends on.
  return true
end


-- Records a verified webhook event and applies it, in one transaction.
-- event is the decoded body and payload the raw body. Returns "recorded"
-- or "duplicate" (the event id was recorded before, so nothing is done),
-- or nil, message, code.
function _M.record_event(event, payload)
  return db.tx(function(tx)
    local object = type(event.data) == "table"
      and type(event.data.object) == "table" and event.data.object or {}
    local account_id, aerr, acode = account_of(tx, object)
    if account_id == nil then
      return nil, aerr, acode
    end
    account_id = account_id or nil

    local inserted, err, code = tx:rows(
      "INSERT INTO billing_events (stripe_event_id, type, account_id, "
        .. "payload) VALUES ($1, $2, $3, $4::jsonb) "
        .. "ON CONFLICT (stripe_event_id) DO NOTHING RETURNING id",
      { event.id, event.type, account_id, payload, n = 4 })
    if not inserted then
      return nil, err, code
    end
    if not inserted[1] then
      return "duplicate"
    end

    local ok, note, ncode = apply_event(tx, event.type, object, account_id)
    if not ok then
      return nil, note, ncode
    end
    local _, uerr, ucode = tx:query(
      "UPDATE billing_events SET processed_at = now(), error = $2 "
        .. "WHERE id = $1", { inserted[1].id, note, n = 2 })
    if ucode then
      return nil, uerr, ucode
    end
    return "recorded"
  end)
end


return _M
