-- The provider conformance suite: the behaviour every provider driver
-- shares, run against one driver. A provider spec calls
--
--   require("06-providers.conformance")("hetzner", factory)
--
-- where factory() runs inside a core coroutine and returns a context:
--   driver            the driver under test
--   server_request(slug)  a valid create_server request for that slug
--   server_count()    (optional) how many servers the provider holds
--   close()           (optional) releases what the factory started
local core = require("justavps.core")
local helpers = require("support.helpers")
local providers = require("providers.init")
local assert = require("luassert")

local async = helpers.async


-- Runs fn(ctx) with a fresh context and closes it afterwards, also when
-- fn raises.
local function with_context(factory, fn)
  return async(function()
    local ctx = factory()
    local ok, err = xpcall(fn, debug.traceback, ctx)
    if ctx.close then
      ctx.close()
    end
    if not ok then
      error(err, 0)
    end
  end, 30)
end


local function assert_shape(fname, value)
  local ok, problem = providers.check_result(fname, value)
  assert(ok, problem)
end


-- Polls get_server_status until it reports want, at most tries times.
local function wait_status(driver, id, want, tries)
  local last
  for _ = 1, tries do
    local status, err, code = driver:get_server_status(id)
    assert(status, tostring(err) .. " " .. tostring(code))
    last = status.status
    if last == want then
      return status
    end
    core.sleep(0.02)
  end
  error("server " .. id .. " still " .. tostring(last) .. ", expected "
    .. want)
end


return function(name, factory)
  -- busted gives each spec file its own environment holding describe and
  -- it, so take them from the calling spec rather than from _G.
  local env = getfenv(2)
  local describe, it = env.describe, env.it
  describe("provider conformance: " .. name, function()
    it("driver has every interface function", with_context(factory,
      function(ctx)
        assert(providers.check_driver(ctx.driver))
      end))

    it("list_regions returns regions", with_context(factory, function(ctx)
      local regions, err = ctx.driver:list_regions()
      assert(regions, err)
      assert.is_true(#regions > 0)
      assert_shape("list_regions", regions)
    end))

    it("list_server_types names known regions", with_context(factory,
      function(ctx)
        local regions = assert(ctx.driver:list_regions())
        local known = {}
        for _, r in ipairs(regions) do
          known[r.id] = true
        end
        local types, err = ctx.driver:list_server_types()
        assert(types, err)
        assert.is_true(#types > 0)
        assert_shape("list_server_types", types)
        for _, t in ipairs(types) do
          for _, region in ipairs(t.locations) do
            assert(known[region], t.id .. " names unknown region " ..
              tostring(region))
          end
        end
      end))

    it("create_server returns the result shape", with_context(factory,
      function(ctx)
        local req = ctx.server_request("conf-create")
        local server, err, code = ctx.driver:create_server(req)
        assert(server, tostring(err) .. " " .. tostring(code))
        assert_shape("create_server", server)
        assert.equal(req.region, server.region)
        assert.equal(req.server_type, server.server_type)
      end))

    it("create_server is idempotent by slug", with_context(factory,
      function(ctx)
        local req = ctx.server_request("conf-again")
        local first = assert(ctx.driver:create_server(req))
        local second, err = ctx.driver:create_server(req)
        assert(second, err)
        assert.equal(first.id, second.id)
        if ctx.server_count then
          assert.equal(1, ctx.server_count())
        end
      end))

    it("get_server_status reaches running", with_context(factory,
      function(ctx)
        local server = assert(ctx.driver:create_server(
          ctx.server_request("conf-status")))
        local status = wait_status(ctx.driver, server.id, "running", 50)
        assert_shape("get_server_status", status)
        assert.equal(server.id, status.id)
      end))

    it("get_server_status of unknown id is not_found", with_context(factory,
      function(ctx)
        local status, err, code = ctx.driver:get_server_status("987654321")
        assert.is_nil(status)
        assert.is_string(err)
        assert.equal("not_found", code)
      end))

    it("create_image returns an image id", with_context(factory,
      function(ctx)
        local server = assert(ctx.driver:create_server(
          ctx.server_request("conf-image")))
        local image, err = ctx.driver:create_image(server.id,
          { description = "conformance snapshot" })
        assert(image, err)
        assert_shape("create_image", image)
      end))

    it("delete_server is idempotent", with_context(factory, function(ctx)
      local server = assert(ctx.driver:create_server(
        ctx.server_request("conf-delete")))
      local result, err = ctx.driver:delete_server("conf-delete")
      assert(result, err)
      assert_shape("delete_server", result)
      local _, _, code = ctx.driver:get_server_status(server.id)
      assert.equal("not_found", code)
      result, err = ctx.driver:delete_server("conf-delete")
      assert(result, err)
      assert.is_true(result.deleted)
      result, err = ctx.driver:delete_server(server.id)
      assert(result, err)
      if ctx.server_count then
        assert.equal(0, ctx.server_count())
      end
    end))

    it("create_server rejects a bad slug", with_context(factory,
      function(ctx)
        local req = ctx.server_request("conf-bad")
        req.slug = "Not A Slug"
        local server, err, code = ctx.driver:create_server(req)
        assert.is_nil(server)
        assert.is_string(err)
        assert.equal("invalid_request", code)
      end))

    it("failures use the fixed error codes", with_context(factory,
      function(ctx)
        local checks = {
          { ctx.driver:get_server_status("987654321") },
          { ctx.driver:create_server({}) },
          { ctx.driver:delete_server("") },
        }
        for i, result in ipairs(checks) do
          assert.is_nil(result[1])
          assert(providers.is_error_code(result[3]),
            "check " .. i .. " returned code " .. tostring(result[3]))
        end
      end))
  end)
end
