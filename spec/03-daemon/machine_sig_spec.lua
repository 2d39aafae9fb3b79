-- Machine-token signatures. The expected values are built here by hand
-- from the wire contract (S joined by "\n", v1= + hex HMAC-SHA256), not
-- with machine_sig's own helpers, so a mistake in the module cannot hide
-- in its spec.
local core = require("justavps.core")
local machine_sig = require("justavps.machine_sig")

local crypto = core.crypto

local TOKEN = "machine-token-0123456789abcdef"
local NOW = 1800000000
local NONCE = "abcdefghijklmnop_-0123"

local TS_HEADER = "X-JustAVPS-Machine-Timestamp"
local NONCE_HEADER = "X-JustAVPS-Machine-Nonce"
local SIG_HEADER = "X-JustAVPS-Machine-Signature"


local function hex_sha256(s)
  return crypto.hex_encode(crypto.sha256(s))
end


-- The signature of a call, assembled from the contract.
local function expected_signature(token, method, target, timestamp, nonce, body)
  local s = "JUSTAVPS-MACHINE-V1\n" .. method .. "\n" .. target .. "\n"
    .. timestamp .. "\n" .. nonce .. "\n" .. hex_sha256(body or "")
  return "v1=" .. crypto.hex_encode(crypto.hmac_sha256(token, s))
end


-- A request-like object with a case-insensitive header lookup.
local function make_req(method, target, headers)
  local lower = {}
  for k, v in pairs(headers) do
    lower[k:lower()] = v
  end
  return {
    method = method,
    target = target,
    header = function(_, name)
      return lower[name:lower()]
    end,
    -- As core.http's: a list value stands for a field sent several times.
    header_count = function(_, name)
      local v = lower[name:lower()]
      if type(v) == "table" then
        return #v, v[1]
      end
      return v and 1 or 0, v
    end,
  }
end


local function signed_headers(fields)
  local ts = fields.timestamp or tostring(NOW)
  local nonce = fields.nonce or NONCE
  return {
    [TS_HEADER] = ts,
    [NONCE_HEADER] = nonce,
    [SIG_HEADER] = expected_signature(fields.token or TOKEN,
      fields.method or "POST", fields.target or "/v1/x?a=1", ts, nonce,
      fields.body or "{}"),
  }
end


describe("machine_sig", function()
  local cache

  before_each(function()
    cache = core.nonce.new({ ttl = 120, max_bytes = 64 * 1024 })
  end)

  after_each(function()
    cache:close()
  end)

  describe("sign", function()
    it("matches the contract", function()
      local h = machine_sig.sign(TOKEN, "POST", "/api/v1/machines/m-1/heartbeat",
        '{"a":1}', NOW, NONCE)
      assert.equal(tostring(NOW), h[TS_HEADER])
      assert.equal(NONCE, h[NONCE_HEADER])
      assert.equal(expected_signature(TOKEN, "POST", "/api/v1/machines/m-1/heartbeat",
        tostring(NOW), NONCE, '{"a":1}'), h[SIG_HEADER])
    end)

    it("hashes an absent body as empty", function()
      local h = machine_sig.sign(TOKEN, "GET", "/v1/health", nil, NOW, NONCE)
      assert.equal(expected_signature(TOKEN, "GET", "/v1/health", tostring(NOW),
        NONCE, ""), h[SIG_HEADER])
    end)

    it("makes a fresh valid nonce", function()
      local a = machine_sig.sign(TOKEN, "GET", "/", "")
      local b = machine_sig.sign(TOKEN, "GET", "/", "")
      assert.not_equal(a[NONCE_HEADER], b[NONCE_HEADER])
      assert.truthy(a[NONCE_HEADER]:match("^[A-Za-z0-9_-]+$"))
      assert.is_true(#a[NONCE_HEADER] >= 16 and #a[NONCE_HEADER] <= 64)
    end)

    it("rounds the timestamp down", function()
      local h = machine_sig.sign(TOKEN, "GET", "/", "", NOW + 0.9, NONCE)
      assert.equal(tostring(NOW), h[TS_HEADER])
    end)
  end)

  describe("verify", function()
    local function verify(headers, overrides)
      overrides = overrides or {}
      local req = make_req(overrides.method or "POST",
        overrides.target or "/v1/x?a=1", headers)
      return machine_sig.verify(overrides.token or TOKEN, req,
        overrides.body or "{}", cache, overrides.now or NOW)
    end

    it("accepts a valid call", function()
      assert.is_true(verify(signed_headers({})))
    end)

    it("accepts its own signatures", function()
      local h = machine_sig.sign(TOKEN, "POST", "/v1/x?a=1", "{}", NOW)
      assert.is_true(verify(h))
    end)

    it("rejects missing headers", function()
      for _, name in ipairs({ TS_HEADER, NONCE_HEADER, SIG_HEADER }) do
        local h = signed_headers({ nonce = "nonce-missing-" .. #name .. "xxxx" })
        h[name] = nil
        local ok, msg, code = verify(h)
        assert.is_nil(ok, name)
        assert.equal("missing_signature", code, name)
        assert.truthy(msg:find(name, 1, true), msg)
      end
    end)

    it("rejects each tampered field", function()
      local cases = {
        { what = "method", overrides = { method = "PUT" } },
        { what = "target", overrides = { target = "/v1/x?a=2" } },
        { what = "body", overrides = { body = '{"a":1}' } },
        { what = "token", overrides = { token = TOKEN .. "x" } },
      }
      for i, case in ipairs(cases) do
        local h = signed_headers({ nonce = ("tampered-nonce-%03d"):format(i) })
        local ok, _, code = verify(h, case.overrides)
        assert.is_nil(ok, case.what)
        assert.equal("bad_signature", code, case.what)
      end
    end)

    it("rejects a timestamp changed after signing", function()
      local h = signed_headers({})
      h[TS_HEADER] = tostring(NOW + 1)
      local ok, _, code = verify(h)
      assert.is_nil(ok)
      assert.equal("bad_signature", code)
    end)

    it("rejects a nonce changed after signing", function()
      local h = signed_headers({})
      h[NONCE_HEADER] = NONCE .. "x"
      local ok, _, code = verify(h)
      assert.is_nil(ok)
      assert.equal("bad_signature", code)
    end)

    it("rejects a flipped signature digit", function()
      local h = signed_headers({})
      local sig = h[SIG_HEADER]
      local last = sig:sub(-1) == "0" and "1" or "0"
      h[SIG_HEADER] = sig:sub(1, -2) .. last
      local ok, _, code = verify(h)
      assert.is_nil(ok)
      assert.equal("bad_signature", code)
    end)

    it("rejects a signature without its prefix", function()
      local h = signed_headers({})
      h[SIG_HEADER] = h[SIG_HEADER]:sub(4)
      local _, _, code = verify(h)
      assert.equal("bad_signature", code)
    end)

    it("rejects an uppercase hex signature", function()
      local h = signed_headers({})
      h[SIG_HEADER] = "v1=" .. h[SIG_HEADER]:sub(4):upper()
      local _, _, code = verify(h)
      assert.equal("bad_signature", code)
    end)

    it("rejects a body hash mismatch", function()
      local h = signed_headers({ body = "" })
      local ok, _, code = verify(h, { body = "x" })
      assert.is_nil(ok)
      assert.equal("bad_signature", code)
    end)

    it("accepts timestamps at the window edges", function()
      local past = signed_headers({ timestamp = tostring(NOW - 30),
        nonce = "edge-of-window-past" })
      assert.is_true(verify(past))
      local future = signed_headers({ timestamp = tostring(NOW + 30),
        nonce = "edge-of-window-future" })
      assert.is_true(verify(future))
    end)

    it("rejects a stale timestamp", function()
      local h = signed_headers({ timestamp = tostring(NOW - 31) })
      local ok, _, code = verify(h)
      assert.is_nil(ok)
      assert.equal("stale_timestamp", code)
    end)

    it("rejects a future timestamp", function()
      local h = signed_headers({ timestamp = tostring(NOW + 31) })
      local ok, _, code = verify(h)
      assert.is_nil(ok)
      assert.equal("stale_timestamp", code)
    end)

    it("rejects a malformed timestamp", function()
      for _, ts in ipairs({ "", "1.5", "-1", "1e9", " 1800000000", "0x10" }) do
        local h = signed_headers({ timestamp = ts,
          nonce = "bad-timestamp-" .. ("%04d"):format(#ts) })
        local ok, _, code = verify(h)
        assert.is_nil(ok, ts)
        assert.equal("bad_signature", code, ts)
      end
    end)

    it("rejects a replayed nonce", function()
      local h = signed_headers({})
      assert.is_true(verify(h))
      local ok, _, code = verify(h, { now = NOW + 5 })
      assert.is_nil(ok)
      assert.equal("replayed_nonce", code)
    end)

    it("records no nonce when the signature fails", function()
      local h = signed_headers({})
      local good = h[SIG_HEADER]
      h[SIG_HEADER] = "v1=" .. ("0"):rep(64)
      local _, _, code = verify(h)
      assert.equal("bad_signature", code)
      assert.is_false(cache:seen(NONCE, NOW))
      h[SIG_HEADER] = good
      assert.is_true(verify(h))
    end)

    it("rejects malformed nonces", function()
      local cases = {
        ("a"):rep(15),
        ("a"):rep(65),
        "abcdefghijklmnop!",
        "abcdefghijklmnop.",
        "abcdefghijklmnop ",
        "abcdefghijklmnop/",
        "",
      }
      for _, nonce in ipairs(cases) do
        local h = signed_headers({ nonce = nonce })
        local ok, _, code = verify(h)
        assert.is_nil(ok, nonce)
        assert.equal("bad_nonce", code, nonce)
      end
    end)

    it("accepts nonces of 16 and 64 characters", function()
      for _, nonce in ipairs({ ("b"):rep(16), ("c"):rep(64) }) do
        assert.is_true(verify(signed_headers({ nonce = nonce })), nonce)
      end
    end)

    it("rejects a header sent twice", function()
      local h = signed_headers({})
      h[SIG_HEADER] = { h[SIG_HEADER], h[SIG_HEADER] }
      local _, _, code = verify(h)
      assert.equal("missing_signature", code)
    end)

    it("reports a full nonce cache", function()
      local small = core.nonce.new({ ttl = 120, max_bytes = 4096 })
      local capacity = small:capacity()
      local function try(i)
        local nonce = ("fill-nonce-%08d"):format(i)
        local h = signed_headers({ nonce = nonce })
        return machine_sig.verify(TOKEN, make_req("POST", "/v1/x?a=1", h), "{}",
          small, NOW)
      end
      for i = 1, capacity do
        assert.is_true(try(i))
      end
      local ok, _, code = try(capacity + 1)
      small:close()
      assert.is_nil(ok)
      assert.equal("nonce_cache_full", code)
      assert.equal(503, machine_sig.STATUS[code])
    end)
  end)
end)
