-- The platform's API framework: routes declared as data, one dispatcher
-- that matches, authenticates, reads and validates the JSON body and calls
-- the handler, and the OpenAPI 3.1 document built from the same table.
--
-- A route is
--   { method = "POST", path = "/api/v1/machines/{slug}/heartbeat",
--     summary = "…", auth = "none" | "machine" | "user", scope = "write",
--     body = { fields = { { name = field }, ... } },   -- justavps.config
--     max_body = bytes, handler = function(ctx) return status, table end }
-- where ctx has req, params, query, body (validated table), raw_body and
-- whatever the auth step adds (ctx.machine, ctx.user, ...).
local core = require("justavps.core")
local router = require("justavps.router")
local config = require("justavps.config")
local json = require("justavps.json")
local log = require("justavps.log")

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local concat = table.concat
local sgsub = string.gsub
local sfind = string.find
local valid_utf8 = core.ws.valid_utf8

local _M = {}

local Api = {}
Api.__index = Api

local JSON_HEADERS = { ["Content-Type"] = "application/json" }

-- Request bodies larger than this are rejected unless a route sets its
-- own max_body.
local DEFAULT_MAX_BODY = 64 * 1024


-- Returns a new, empty API. auth maps an auth kind to a function
-- auth(ctx, route) returning true, or status, code, message.
function _M.new(opts)
  opts = opts or {}
  return setmetatable({
    router = router.new(),
    routes = {},
    auth = opts.auth or {},
    title = opts.title or "JustAVPS API",
    version = opts.version or "1",
  }, Api)
end


-- Adds a route. Raises on a malformed declaration.
function Api:route(spec)
  if type(spec.handler) ~= "function" then
    error("api:route: " .. tostring(spec.path) .. ": handler missing", 2)
  end
  if spec.auth == nil then
    error("api:route: " .. tostring(spec.path) .. ": auth missing "
      .. "(use auth = \"none\" for a public route)", 2)
  end
  if spec.body then
    spec.body_schema = config.schema(spec.body)
  end
  self.router:add(spec)
  self.routes[#self.routes + 1] = spec
end


-- Returns status, headers, body for an error in the shape every
-- JustAVPS component uses.
function _M.error(status, code, message)
  return status, JSON_HEADERS,
    json.encode({ error = { code = code, message = message } }) .. "\n"
end


local function reply(status, value)
  if value == nil then
    return status, JSON_HEADERS, ""
  end
  return status, JSON_HEADERS, json.encode(value) .. "\n"
end


-- Reads the whole request body, at most max bytes. Returns the body or
-- nil, status, code, message.
local function read_body(req, max)
  local length = req:header("content-length")
  if length and tonumber(length) and tonumber(length) > max then
    return nil, 413, "too_large", "request body larger than " .. max
      .. " bytes"
  end

  local parts, total = {}, 0
  while true do
    local data, err, code = req:read()
    if not data then
      if err then
        return nil, 400, "bad_request", "request body: " .. tostring(err)
          .. " (" .. tostring(code) .. ")"
      end
      break
    end
    total = total + #data
    if total > max then
      return nil, 413, "too_large", "request body larger than " .. max
        .. " bytes"
    end
    parts[#parts + 1] = data
  end
  return concat(parts)
end


-- Returns true when s is text PostgreSQL can store: valid UTF-8 without
-- a NUL byte.
local function storable(s)
  return not sfind(s, "\0", 1, true) and valid_utf8(s)
end
_M.storable = storable


-- Returns the path ("$.name", "$.tags[2]") of the first string in v, key
-- or value, that is not storable, or nil when there is none.
local function unstorable_path(v, path)
  if type(v) == "string" then
    return not storable(v) and path or nil
  end
  if type(v) ~= "table" then
    return nil
  end
  for k, x in pairs(v) do
    local sub
    if type(k) == "string" then
      if not storable(k) then
        return path .. " (a key)"
      end
      sub = path .. "." .. k
    else
      sub = path .. "[" .. tostring(k) .. "]"
    end
    local found = unstorable_path(x, sub)
    if found then
      return found
    end
  end
  return nil
end
_M.unstorable_path = unstorable_path


-- Validates the decoded body against the route's schema. Returns the
-- validated table or nil, message naming the first bad field.
local function validate_body(route, decoded)
  if type(decoded) ~= "table" or json.is_array(decoded) then
    return nil, "request body must be a JSON object"
  end
  local valid, err = config.validate(route.body_schema, decoded)
  if not valid then
    -- config's message starts with a heading line; keep the field lines.
    local detail = sgsub(tostring(err), "^invalid config:\n", "")
    return nil, sgsub(detail, "\n", "; ")
  end
  return valid
end


-- Handles one request: the entry of every platform API call.
function Api:dispatch(req)
  local route, params, query = self.router:match(req.method, req.target)
  if not route then
    if params == "method_not_allowed" then
      return _M.error(405, "method_not_allowed", req.method
        .. " is not allowed here; allowed: " .. concat(query, ", "))
    end
    if params == "bad_request" then
      return _M.error(400, "bad_request", query)
    end
    return _M.error(404, "not_found", "no route for " .. req.method .. " "
      .. req.path)
  end

  -- Parameters go into queries, and bytes that PostgreSQL rejects as text
  -- would turn a client's mistake into a 500.
  for name, value in pairs(params) do
    if not storable(value) then
      return _M.error(400, "invalid_request", "path parameter " .. name
        .. " must be UTF-8 text without NUL characters")
    end
  end

  local ctx = { req = req, params = params, query = query, route = route }

  local auth = self.auth[route.auth]
  if route.auth ~= "none" then
    if not auth then
      log.alert("route has an unknown auth kind", { path = route.path,
        auth = route.auth })
      return _M.error(500, "internal", "internal server error")
    end
  end

  -- Bodies are read before authentication because machine signatures
  -- cover the body hash.
  if route.body or route.raw_body then
    local raw, status, code, message = read_body(req,
      route.max_body or DEFAULT_MAX_BODY)
    if not raw then
      return _M.error(status, code, message)
    end
    ctx.raw_body = raw
  end

  if auth then
    local ok, status, code, message = auth(ctx, route)
    if ok ~= true then
      return _M.error(status, code, message)
    end
  end

  if route.body then
    local decoded, derr = json.decode(ctx.raw_body ~= "" and ctx.raw_body
      or "{}")
    if decoded == nil then
      return _M.error(400, "invalid_json", derr)
    end
    local bad = unstorable_path(decoded, "$")
    if bad then
      return _M.error(400, "invalid_request", bad
        .. " must be UTF-8 text without NUL characters")
    end
    local body, verr = validate_body(route, decoded)
    if not body then
      return _M.error(400, "invalid_request", verr)
    end
    ctx.body = body
  end

  -- A handler returns status and a value to encode as JSON, or a whole
  -- response (status, headers, body) such as api.error builds.
  local status, value, body = route.handler(ctx)
  if type(status) ~= "number" then
    log.err("handler returned no status", { path = route.path })
    return _M.error(500, "internal", "internal server error")
  end
  if type(body) == "string" then
    return status, value, body
  end
  return reply(status, value)
end


local OPENAPI_TYPES = {
  string = { type = "string" },
  number = { type = "number" },
  integer = { type = "integer" },
  boolean = { type = "boolean" },
  duration = { type = "number", description = "seconds" },
  size = { type = "integer", description = "bytes" },
}


local function field_schema(field)
  if field.type == "record" then
    local props, required = {}, {}
    for _, entry in ipairs(field.fields or {}) do
      for name, sub in pairs(entry) do
        props[name] = field_schema(sub)
        if sub.required then
          required[#required + 1] = name
        end
      end
    end
    local out = { type = "object", properties = props,
      additionalProperties = false }
    if #required > 0 then
      out.required = required
    end
    return out
  end
  if field.type == "array" then
    return { type = "array",
      items = field.elements and field_schema(field.elements) or {} }
  end
  if field.type == "map" then
    return { type = "object",
      additionalProperties = field.values and field_schema(field.values)
        or {} }
  end

  local out = {}
  for k, v in pairs(OPENAPI_TYPES[field.type] or { type = "string" }) do
    out[k] = v
  end
  if field.description then
    out.description = field.description
  end
  if field.one_of then
    out.enum = field.one_of
  end
  if field.between then
    out.minimum, out.maximum = field.between[1], field.between[2]
  end
  if field.match then
    out["x-lua-pattern"] = field.match
  end
  return out
end


local function path_parameters(path)
  local list = {}
  for name in path:gmatch("{([%w_]+)%*?}") do
    list[#list + 1] = { name = name, ["in"] = "path", required = true,
      schema = { type = "string" } }
  end
  return list
end


-- Returns the OpenAPI 3.1 document of every route, as a table.
function Api:openapi()
  local paths = {}
  for _, route in ipairs(self.routes) do
    local entry = paths[route.path] or {}
    paths[route.path] = entry
    local methods = type(route.method) == "table" and route.method
      or { route.method }
    for _, m in ipairs(methods) do
      local op = {
        summary = route.summary,
        operationId = route.name,
        parameters = path_parameters(route.path),
        responses = {
          default = { description = "an error",
            content = { ["application/json"] = { schema = {
              ["$ref"] = "#/components/schemas/Error" } } } },
        },
        ["x-auth"] = route.auth,
        ["x-scope"] = route.scope,
      }
      op.responses[tostring(route.status or 200)] = {
        description = route.response or "success" }
      if route.body then
        op.requestBody = { required = true, content = {
          ["application/json"] = { schema = field_schema({ type = "record",
            fields = route.body.fields }) } } }
      end
      if #op.parameters == 0 then
        op.parameters = nil
      end
      entry[m:lower()] = op
    end
  end

  return {
    openapi = "3.1.0",
    info = { title = self.title, version = self.version },
    paths = paths,
    components = { schemas = { Error = {
      type = "object", required = { "error" },
      properties = { error = { type = "object", required = { "code",
        "message" }, properties = { code = { type = "string" },
        message = { type = "string" } } } } } } },
  }
end


return _M
