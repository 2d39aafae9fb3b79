-- The rollout policy: each rollout form, the stable percent hash and the
-- checks a rollout passes before a release is stored.
local rollout = require("policies.rollout")


describe("rollout policy", function()
  it("includes every machine for all", function()
    assert.is_true(rollout.includes({ all = true }, { slug = "a-1" }, "1.0.0"))
    assert.is_true(rollout.includes({ all = true }, { slug = "b-2" }, "1.0.0"))
  end)

  it("includes only listed slugs", function()
    local r = { slugs = { "web-1", "db-2" } }
    assert.is_true(rollout.includes(r, { slug = "web-1" }, "1.0.0"))
    assert.is_true(rollout.includes(r, { slug = "db-2" }, "1.0.0"))
    assert.is_false(rollout.includes(r, { slug = "web-10" }, "1.0.0"))
  end)

  it("includes no machine at 0 percent", function()
    for i = 1, 500 do
      assert.is_false(rollout.includes({ percent = 0 }, { slug = "m-" .. i }, "1.0.0"))
    end
  end)

  it("includes every machine at 100 percent", function()
    for i = 1, 500 do
      assert.is_true(rollout.includes({ percent = 100 }, { slug = "m-" .. i }, "1.0.0"))
    end
  end)

  it("includes about N percent of machines", function()
    local included = 0
    for i = 1, 2000 do
      if rollout.includes({ percent = 25 }, { slug = "m-" .. i }, "2.0.0") then
        included = included + 1
      end
    end
    -- 2000 draws at p = 0.25 have a standard deviation of about 19.
    assert.is_true(included > 400, "included " .. included)
    assert.is_true(included < 600, "included " .. included)
  end)

  it("keeps one machine's answer stable", function()
    for i = 1, 200 do
      local machine = { slug = "m-" .. i }
      local first = rollout.includes({ percent = 50 }, machine, "3.1.0")
      for _ = 1, 5 do
        assert.equal(first, rollout.includes({ percent = 50 }, machine, "3.1.0"))
      end
    end
  end)

  it("keeps included machines as percent grows", function()
    for i = 1, 500 do
      local machine = { slug = "m-" .. i }
      if rollout.includes({ percent = 10 }, machine, "4.0.0") then
        assert.is_true(rollout.includes({ percent = 30 }, machine, "4.0.0"))
      end
    end
  end)

  it("seeds the hash with the version", function()
    local differs = false
    for i = 1, 100 do
      if rollout.bucket("m-" .. i, "1.0.0") ~= rollout.bucket("m-" .. i, "1.0.1") then
        differs = true
      end
    end
    assert.is_true(differs)
  end)

  it("includes nothing for an empty rollout", function()
    assert.is_false(rollout.includes({}, { slug = "m-1" }, "1.0.0"))
    assert.is_false(rollout.includes(nil, { slug = "m-1" }, "1.0.0"))
    assert.is_false(rollout.includes({ all = true }, {}, "1.0.0"))
  end)

  describe("check", function()
    local valid = {
      { all = true }, { percent = 0 }, { percent = 12.5 }, { percent = 100 },
      { slugs = { "web-1" } }, { slugs = {} },
    }
    for _, r in ipairs(valid) do
      it("accepts " .. require("justavps.json").encode(r), function()
        assert.is_nil(rollout.check(r))
      end)
    end

    local invalid = {
      { {}, "exactly one" },
      { { all = true, percent = 5 }, "exactly one" },
      { { all = false }, "rollout.all" },
      { { percent = 101 }, "rollout.percent" },
      { { percent = -1 }, "rollout.percent" },
      { { slugs = { "Bad Slug" } }, "rollout.slugs" },
      { "all", "object" },
    }
    for _, case in ipairs(invalid) do
      it("rejects " .. require("justavps.json").encode(case[1]), function()
        local message = rollout.check(case[1])
        assert.is_string(message)
        assert.truthy(message:find(case[2], 1, true), message)
      end)
    end
  end)
end)
