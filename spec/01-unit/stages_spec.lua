-- The provisioning stage table and stages.transition against a real,
-- freshly migrated database: every allowed move updates the machine and
-- writes its event in the caller's transaction, and a sample of forbidden
-- moves writes nothing.
local core = require("justavps.core")
local helpers = require("support.helpers")
local stages = require("justavps.provision.stages")
local db = require("justavps.db.db")

local async = helpers.async

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")


local spec_pg = require("support.pg")
local pg_settings = spec_pg.settings


describe("stage table", function()
  it("lists a row for every stage", function()
    for _, stage in ipairs(stages.STAGES) do
      assert.is_table(stages.TRANSITIONS[stage], stage)
    end
  end)

  it("names only known stages as targets", function()
    for from, targets in pairs(stages.TRANSITIONS) do
      assert.is_true(stages.is_stage(from), from)
      for to in pairs(targets) do
        assert.is_true(stages.is_stage(to), from .. " -> " .. to)
      end
    end
  end)

  it("never allows staying in a stage", function()
    for _, stage in ipairs(stages.STAGES) do
      assert.is_false(stages.allowed(stage, stage), stage)
    end
  end)

  it("allows nothing after deleted", function()
    assert.same({}, stages.next_stages("deleted"))
  end)

  it("reaches deleted only through deleting", function()
    for _, from in ipairs(stages.STAGES) do
      assert.equal(from == "deleting", stages.allowed(from, "deleted"), from)
    end
  end)
end)


describe("stages.transition", function()
  local settings = pg_settings()
  local dbname, machine_id

  local function connect(name)
    return assert(core.pg.connect({ host = settings.PGHOST,
      port = settings.PGPORT, user = settings.PGUSER,
      dbname = name or settings.PGDATABASE }, { timeout = 30 }))
  end

  setup(function()
    helpers.run(function()
      dbname = string.format("justavps_stages_%d_%06d", os.time(),
        math.random(0, 999999))
      local c = connect()
      assert(c:query('CREATE DATABASE "' .. dbname .. '"'))
      c:close()

      local env = helpers.child_env({ PGHOST = settings.PGHOST,
        PGPORT = settings.PGPORT, PGUSER = settings.PGUSER,
        PGDATABASE = dbname })
      local m = assert(core.proc.spawn{ file = BIN, args = { "migrate" },
        env = env, stdout = "null", stderr = "null" })
      assert.equal(0, m:wait(60))

      db.setup({ url = string.format("host=%s port=%s user=%s dbname=%s",
        settings.PGHOST, settings.PGPORT, settings.PGUSER, dbname) })
      local acct = assert(db.one("INSERT INTO accounts (name) VALUES ($1) "
        .. "RETURNING id", { "stages" }))
      machine_id = assert(db.one("INSERT INTO machines (slug, account_id, "
        .. "name, provider, region, server_type, token) VALUES ($1, $2, $3, "
        .. "'local', 'local', 'local', $4) RETURNING id", { "st-1", acct.id,
        "st", string.rep("t", 48) })).id
    end, 90)
  end)

  teardown(function()
    helpers.run(function()
      db.close()
      local c = connect()
      c:query('DROP DATABASE IF EXISTS "' .. dbname .. '" WITH (FORCE)')
      c:close()
    end, 60)
  end)

  local function reset(stage)
    assert(db.query("UPDATE machines SET stage = $2, deleted_at = NULL "
      .. "WHERE id = $1", { machine_id, stage }))
  end

  local function current()
    return assert(db.one("SELECT stage::text AS stage, deleted_at IS NOT "
      .. "NULL AS gone, (SELECT count(*) FROM machine_events WHERE "
      .. "machine_id = $1)::int AS events FROM machines WHERE id = $1",
      { machine_id }))
  end

  local function move(to, detail)
    return db.tx(function(tx)
      return stages.transition(tx, { id = machine_id, slug = "st-1" }, to,
        detail)
    end)
  end

  for _, from in ipairs(stages.STAGES) do
    for _, to in ipairs(stages.next_stages(from)) do
      it("moves " .. from .. " to " .. to, async(function()
        reset(from)
        local before = current().events
        local event, err = move(to, { step = from })
        assert.is_table(event, err)
        assert.equal(to, event.stage)
        assert.equal(from, event.from)
        local now = current()
        assert.equal(to, now.stage)
        assert.equal(before + 1, now.events)
        assert.equal(to == "deleted", now.gone)
        local row = assert(db.one("SELECT stage::text AS stage, "
          .. "detail->>'step' AS step FROM machine_events WHERE id = $1",
          { event.id }))
        assert.equal(to, row.stage)
        assert.equal(from, row.step)
      end))
    end
  end

  local forbidden = {
    { "services_ready", "server_creating" },
    { "cloud_init_done", "cloud_init_running" },
    { "server_created", "server_creating" },
    { "services_ready", "services_ready" },
    { "failed", "services_ready" },
    { "deleting", "services_ready" },
    { "deleting", "deleting" },
    { "deleted", "deleting" },
    { "deleted", "failed" },
    { "server_creating", "deleted" },
  }

  for _, case in ipairs(forbidden) do
    it("rejects " .. case[1] .. " to " .. case[2], async(function()
      reset(case[1])
      local before = current().events
      local event, err, code = move(case[2])
      assert.is_nil(event)
      assert.equal("invalid_transition", code)
      assert.truthy(err:find(case[1], 1, true))
      local now = current()
      assert.equal(case[1], now.stage)
      assert.equal(before, now.events)
    end))
  end

  it("rolls back with the caller's transaction", async(function()
    reset("server_created")
    local before = current().events
    local ok, err, code = db.tx(function(tx)
      local event = assert(stages.transition(tx, { id = machine_id },
        "cloud_init_running"))
      assert.is_number(event.id)
      return nil, "abandoned by the spec", "spec_abort"
    end)
    assert.is_nil(ok)
    assert.equal("abandoned by the spec", err)
    assert.equal("spec_abort", code)
    local now = current()
    assert.equal("server_created", now.stage)
    assert.equal(before, now.events)
  end))

  it("reports an unknown machine", async(function()
    local event, _, code = db.tx(function(tx)
      return stages.transition(tx,
        { id = "00000000-0000-4000-8000-000000000000" }, "failed")
    end)
    assert.is_nil(event)
    assert.equal("not_found", code)
  end))

  it("raises on an unknown stage", function()
    assert.has_error(function()
      stages.transition({}, { id = machine_id }, "rebooting")
    end)
  end)
end)
