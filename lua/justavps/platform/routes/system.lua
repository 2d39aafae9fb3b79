-- Routes about the API itself: health and the OpenAPI document.
local db = require("justavps.db.db")

return function(api)
  api:route({
    method = "GET", path = "/api/v1/health", name = "health",
    auth = "none", summary = "Liveness and database reachability",
    handler = function()
      local _, err, code = db.one("SELECT 1 AS ok")
      if code then
        return 503, { status = "degraded", database = { code = code,
          message = err } }
      end
      return 200, { status = "ok" }
    end,
  })

  api:route({
    method = "GET", path = "/api/v1/openapi.json", name = "openapi",
    auth = "none", summary = "This API as an OpenAPI 3.1 document",
    handler = function()
      return 200, api:openapi()
    end,
  })
end
