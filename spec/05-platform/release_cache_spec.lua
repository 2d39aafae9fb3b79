-- The release list cache behind the update offer of heartbeats, run in
-- this process against a fresh database: a cached list hides a release
-- inserted behind the platform's back, and a publish through
-- releases.create empties the cache at once.
local core = require("justavps.core")
local helpers = require("support.helpers")
local spec_pg = require("support.pg")

local async = helpers.async

local BIN = os.getenv("JUSTAVPS_TEST_BIN")
  or ((os.getenv("JV_BUILD_DIR") or "build") .. "/justavps")

local SHA = string.rep("ab", 32)

local settings = spec_pg.settings()


local function connect(dbname)
  return assert(core.pg.connect({ host = settings.PGHOST,
    port = settings.PGPORT, user = settings.PGUSER,
    dbname = dbname or settings.PGDATABASE }, { timeout = 30 }))
end


describe("release cache of the update offer", function()
  local dbname, db, releases

  setup(function()
    helpers.run(function()
      dbname = string.format("justavps_spec_%d_%06d", os.time(),
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
    end, 90)

    db = require("justavps.db.db")
    db.setup({ url = string.format("host=%s port=%s user=%s dbname=%s",
      settings.PGHOST, settings.PGPORT, settings.PGUSER, dbname) })
    releases = require("justavps.platform.releases")
  end)

  teardown(function()
    helpers.run(function()
      db.close()
      local c = connect()
      c:query('DROP DATABASE IF EXISTS "' .. dbname .. '" WITH (FORCE)')
      c:close()
    end, 60)
  end)

  local machine = { id = "00000000-0000-4000-8000-000000000000",
    slug = "cache-1" }

  it("serves the cached list until a publish", async(function()
    assert.is_nil(releases.offer(machine, "1.0.0"))

    -- Not through releases.create, as another platform process would
    -- publish: the cached empty list stays.
    assert(db.query("INSERT INTO releases (version, url, sha256, rollout) "
      .. "VALUES ('1.1.0', 'https://example.com/a', $1, '{\"all\": true}')",
      { SHA }))
    assert.is_nil(releases.offer(machine, "1.0.0"))

    assert(releases.create({ version = "1.2.0",
      url = "https://example.com/b", sha256 = SHA,
      rollout = { all = true } }))
    local offer = releases.offer(machine, "1.0.0")
    assert.is_table(offer)
    assert.equal("1.2.0", offer.version)
    assert.equal("https://example.com/b", offer.url)

    releases.invalidate_cache()
    assert.equal("1.2.0", releases.offer(machine, "1.0.0").version)
    assert.is_nil(releases.offer(machine, "1.2.0"))
  end))

  it("reads the list once for concurrent misses", async(function()
    releases.invalidate_cache()
    local list = releases.list
    local reads = 0
    releases.list = function(...)
      reads = reads + 1
      return list(...)
    end
    local offers = {}
    local left = 10
    local done = core.waiter()
    for i = 1, 10 do
      core.spawn(function()
        offers[i] = releases.offer(machine, "1.0.0")
        left = left - 1
        if left == 0 then
          done:wake()
        end
      end)
    end
    if left > 0 then
      done:wait(10)
    end
    releases.list = list
    assert.equal(1, reads)
    for i = 1, 10 do
      assert.equal("1.2.0", offers[i].version, "offer " .. i)
    end
  end))
end)
