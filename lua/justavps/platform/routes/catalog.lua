-- GET /api/v1/regions and GET /api/v1/server-types: what machines can be
-- created with, as the provider named in catalog.provider lists it. Each
-- list is reused for catalog.cache_ttl seconds so that dashboard page
-- loads do not each call the provider. Without a provider both answer
-- 503 provider_not_configured.
local core = require("justavps.core")
local log = require("justavps.log")
local json = require("justavps.json")
local api_mod = require("justavps.platform.api")
local state = require("justavps.platform.state")
local providers = require("providers.init")
local config = require("justavps.config")

local ipairs = ipairs

-- Cached lists by provider function name: { at, value, provider }.
-- The table lives until the next reload of this module.
local cache = {}

-- Driver built from the current catalog config, and the provider name it
-- was built for.
local driver, driver_provider


local function get_driver(catalog)
  if driver and driver_provider == catalog.provider then
    return driver
  end
  -- provider_config contains strings only, so numbers and booleans are
  -- converted by the types of the driver's own schema.
  local conf = catalog.provider_config
  local module = providers.get(catalog.provider)
  if module and module.schema then
    conf = config.from_strings(module.schema, conf)
  end
  local new, err, code = providers.new(catalog.provider, conf)
  if not new then
    return nil, err, code
  end
  driver, driver_provider = new, catalog.provider
  return driver
end


local function list(fname, key)
  local catalog = state.conf.catalog
  if catalog.provider == "" then
    return api_mod.error(503, "provider_not_configured", "no provider is "
      .. "configured for regions and server types; set catalog.provider "
      .. "and catalog.provider_config")
  end

  local now = core.now()
  local entry = cache[fname]
  if entry and entry.provider == catalog.provider
      and now - entry.at < catalog.cache_ttl then
    return 200, { [key] = entry.value }
  end

  local d, err, code = get_driver(catalog)
  if not d then
    log.err("catalog provider could not be set up", {
      provider = catalog.provider, error = err, code = code })
    return api_mod.error(503, "provider_unavailable", "the provider "
      .. catalog.provider .. " could not be set up; check "
      .. "catalog.provider_config")
  end

  local value
  value, err, code = d[fname](d)
  if not value then
    log.err("catalog provider call failed", { provider = catalog.provider,
      call = fname, error = err, code = code })
    return api_mod.error(502, "provider_unavailable", "the provider "
      .. catalog.provider .. " did not return its list; retry later")
  end

  local out = json.array()
  for i, item in ipairs(value) do
    out[i] = item
  end
  cache[fname] = { at = now, value = out, provider = catalog.provider }
  return 200, { [key] = out }
end


return function(api)
  api:route({
    method = "GET", path = "/api/v1/regions", name = "list_regions",
    auth = "user", scope = "read",
    summary = "List the regions machines can be created in",
    handler = function()
      return list("list_regions", "regions")
    end,
  })

  api:route({
    method = "GET", path = "/api/v1/server-types",
    name = "list_server_types", auth = "user", scope = "read",
    summary = "List the server types machines can be created with",
    handler = function()
      return list("list_server_types", "server_types")
    end,
  })
end
