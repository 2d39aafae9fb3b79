-- The broker's replay cache at its memory bound. A broker with the
-- smallest cache responds 503 nonce_cache_full once every slot contains a
-- live nonce. It never evicts one to make room, so replays stay rejected.
local core = require("justavps.core")
local helpers = require("support.helpers")
local bp = require("04-broker.broker_process")

local async = helpers.async

-- The smallest cache core.nonce accepts.
local MAX_BYTES = 4096


describe("broker nonce cache", function()
  local broker, app, backend_port

  setup(function()
    helpers.run(function()
      app = bp.backend()
      backend_port = app:port()
      broker = bp.start({
        broker_id = bp.BROKER_ID,
        secret = bp.SECRET,
        insecure_plain_http = true,
        listen = { host = "127.0.0.1", port = 0 },
        nonce = { max_bytes = MAX_BYTES },
        target = { allow_networks = { "127.0.0.1/32" } },
      }, { "--access-log=false" })
      assert(broker.port, "broker did not start; log:\n"
        .. table.concat(broker.lines, "\n"))
    end)
  end)

  teardown(function()
    helpers.run(function()
      assert.equal(0, bp.stop(broker))
      app:close()
    end)
  end)

  it("fills, answers 503 and never evicts", async(function()
    -- The same bound gives the same capacity in any process.
    local probe = assert(core.nonce.new({ ttl = 120, max_bytes = MAX_BYTES }))
    local capacity = probe:capacity()
    assert.equal(MAX_BYTES, probe:bytes())
    probe:close()
    assert.truthy(capacity > 10 and capacity < 1000)

    local first = bp.signed(bp.fields(backend_port))
    local res = bp.send(broker.port, first)
    assert.equal(200, res.status)
    for i = 2, capacity do
      res = bp.send(broker.port, bp.fields(backend_port))
      assert.equal(200, res.status, "request " .. i .. " of " .. capacity)
    end

    local full, _, body = bp.send(broker.port, bp.fields(backend_port))
    assert.equal(503, full.status)
    assert.equal("nonce_cache_full", body.error.code)

    -- The first nonce is still live: a replay is still a replay.
    local replay
    replay, _, body = bp.send(broker.port, first)
    assert.equal(401, replay.status)
    assert.equal("replayed_nonce", body.error.code)

    -- A forged request is rejected by its signature before the cache.
    local forged = bp.signed(bp.fields(backend_port))
    forged.slug = "spec-forged"
    local rejected
    rejected, _, body = bp.send(broker.port, forged)
    assert.equal(401, rejected.status)
    assert.equal("bad_signature", body.error.code)

    assert.truthy(bp.log_matching(broker, "nonce cache full"):find(
      "capacity=" .. capacity, 1, true))
    assert.truthy(bp.log_matching(broker, "broker configured"):find(
      "nonce_capacity=" .. capacity, 1, true))
  end), 60)
end)
