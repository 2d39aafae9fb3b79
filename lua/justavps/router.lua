-- Routes declared as data, compiled into a segment trie.
--
--   local r = router.new()
--   r:add{ method = "GET", path = "/api/v1/machines/{slug}", handler = fn }
--   local route, params = r:match("GET", "/api/v1/machines/m-1?x=1")
--
-- Matching order at each segment: a static segment, then a {param}, then a
-- trailing {rest*}. When a branch fails further down, the next is tried.
local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local setmetatable = setmetatable
local tonumber = tonumber
local char = string.char
local sfind = string.find
local ssub = string.sub
local sgsub = string.gsub
local smatch = string.match
local upper = string.upper
local sort = table.sort
local concat = table.concat

local _M = {}

local Router = {}
Router.__index = Router

local PARAM = "^{([%a_][%w_]*)}$"
local REST = "^{([%a_][%w_]*)%*}$"


local function new_node()
  return { static = {}, param = nil, rest = nil, methods = nil }
end


function _M.new()
  return setmetatable({ root = new_node(), list = {}, static = {} },
    Router)
end


-- Splits "/a/b" into { "a", "b" }. The path "/" gives { "" }.
local function split(path)
  local segments = {}
  local pos = 2
  while true do
    local slash = sfind(path, "/", pos, true)
    if not slash then
      segments[#segments + 1] = ssub(path, pos)
      return segments
    end
    segments[#segments + 1] = ssub(path, pos, slash - 1)
    pos = slash + 1
  end
end


local function check_spec(spec)
  if type(spec) ~= "table" then
    error("router:add: expected a route table, got " .. type(spec), 3)
  end

  if type(spec.path) ~= "string" or ssub(spec.path, 1, 1) ~= "/" then
    error("router:add: path must be a string starting with '/', got "
      .. tostring(spec.path), 3)
  end

  if type(spec.handler) ~= "function" then
    error("router:add: " .. spec.path .. ": handler must be a function", 3)
  end

  local methods = spec.method
  if type(methods) == "string" then
    methods = { methods }
  end

  if type(methods) ~= "table" or #methods == 0 then
    error("router:add: " .. spec.path
      .. ": method must be a string or a non-empty list of strings", 3)
  end

  local out = {}
  for i, m in ipairs(methods) do
    if type(m) ~= "string" or not smatch(m, "^%a+$") then
      error("router:add: " .. spec.path .. ": invalid method "
        .. tostring(m), 3)
    end
    out[i] = upper(m)
  end

  return out
end


-- Walks or extends the trie for path and returns the leaf and the
-- parameter names in order.
local function insert(root, path)
  local node = root
  local names = {}
  local segments = split(path)

  for i, seg in ipairs(segments) do
    local name = smatch(seg, PARAM)
    local rest = smatch(seg, REST)

    if rest then
      if i ~= #segments then
        error("router:add: " .. path .. ": {" .. rest
          .. "*} must be the last segment", 3)
      end
      if node.rest and node.rest.name ~= rest then
        error("router:add: " .. path .. ": {" .. rest .. "*} conflicts with {"
          .. node.rest.name .. "*} declared earlier at the same position", 3)
      end
      node.rest = node.rest or { name = rest, node = new_node() }
      names[#names + 1] = rest
      node = node.rest.node

    elseif name then
      if node.param and node.param.name ~= name then
        error("router:add: " .. path .. ": {" .. name .. "} conflicts with {"
          .. node.param.name .. "} declared earlier at the same position", 3)
      end
      node.param = node.param or { name = name, node = new_node() }
      names[#names + 1] = name
      node = node.param.node

    else
      if sfind(seg, "[{}]") then
        error("router:add: " .. path .. ": segment '" .. seg
          .. "' mixes text and a parameter; a parameter must be a whole "
          .. "segment", 3)
      end
      local child = node.static[seg]
      if not child then
        child = new_node()
        node.static[seg] = child
      end
      node = child
    end
  end

  for _, n in ipairs(names) do
    if names[n] then
      error("router:add: " .. path .. ": parameter {" .. n
        .. "} appears twice", 3)
    end
    names[n] = true
  end

  return node, names
end


-- Adds a route. spec fields: method (string or list), path, handler;
-- any other field (name, auth, scope, schema, ...) is kept on the route.
-- Raises on a malformed spec or a duplicate method and path.
function Router:add(spec)
  local methods = check_spec(spec)
  local node, names = insert(self.root, spec.path)

  local route = {}
  for k, v in pairs(spec) do
    route[k] = v
  end
  route.methods = methods
  route.method = methods[1]
  route.param_names = names

  node.methods = node.methods or {}
  for _, m in ipairs(methods) do
    if node.methods[m] then
      error("router:add: " .. m .. " " .. spec.path .. " duplicates "
        .. node.methods[m].path, 2)
    end
  end
  for _, m in ipairs(methods) do
    node.methods[m] = route
  end

  -- A path without parameters is also kept under "METHOD path", so match
  -- finds the common case with one table lookup instead of a trie walk.
  if not sfind(spec.path, "{", 1, true) then
    for _, m in ipairs(methods) do
      self.static[m .. " " .. spec.path] = route
    end
  end

  self.list[#self.list + 1] = route
  return route
end


-- Returns the routes in declaration order (a new list each call).
function Router:routes()
  local out = {}
  for i, route in ipairs(self.list) do
    out[i] = route
  end
  return out
end


local function hex_byte(h)
  return char(tonumber(h, 16))
end


-- Percent-decodes one segment. Returns the text and whether it contained an
-- encoded "/" or NUL, or nil for malformed escapes.
local function decode_segment(seg)
  if not sfind(seg, "%", 1, true) then
    return seg, false
  end

  if sfind(seg, "%%%X") or sfind(seg, "%%%x%X") or sfind(seg, "%%.?$") then
    return nil
  end

  local unsafe = sfind(seg, "%%2[Ff]") or sfind(seg, "%%00")
  return (sgsub(seg, "%%(%x%x)", hex_byte)), unsafe ~= nil
end


local function find_method(methods, method)
  local route = methods[method]
  if not route and method == "HEAD" then
    route = methods.GET
  end
  return route
end


local function collect_allowed(methods, allowed)
  for m in pairs(methods) do
    allowed[m] = true
    if m == "GET" then
      allowed.HEAD = true
    end
  end
end


-- Depth-first search. state carries the decoded segments, the method, the
-- bound values, the allowed methods seen on path matches and whether an
-- unsafe segment was skipped. Returns the route, or nil.
local function search(node, i, state)
  local segments = state.segments
  local n = #segments

  if i > n then
    local methods = node.methods
    if methods then
      local route = find_method(methods, state.method)
      if route then
        return route
      end
      collect_allowed(methods, state.allowed)
      state.path_matched = true
    end
  else
    local seg = segments[i]
    local child = node.static[seg]
    if child and not state.unsafe[i] then
      local route = search(child, i + 1, state)
      if route then
        return route
      end
    end

    local param = node.param
    if param and seg ~= "" then
      if state.unsafe[i] or seg == "." or seg == ".." then
        state.rejected = true
      else
        state.values[i] = seg
        local route = search(param.node, i + 1, state)
        if route then
          return route
        end
        state.values[i] = nil
      end
    end
  end

  -- {rest*} takes the remaining segments, possibly none.
  local rest = node.rest
  if rest and rest.node.methods then
    for j = i, n do
      if state.unsafe[j] or segments[j] == ".." or segments[j] == "." then
        state.rejected = true
        return nil
      end
    end
    local route = find_method(rest.node.methods, state.method)
    if route then
      state.rest_from = i
      return route
    end
    collect_allowed(rest.node.methods, state.allowed)
    state.path_matched = true
  end

  return nil
end


local function sorted_keys(set)
  local out = {}
  for k in pairs(set) do
    out[#out + 1] = k
  end
  sort(out)
  return out
end


-- Matches a request; a query string in path is split off first. Returns
--   route, params, query     query is the raw text after "?", or nil
--   nil, "not_found"
--   nil, "method_not_allowed", allowed_methods   sorted, HEAD with GET
--   nil, "bad_request", message
-- The last is for a malformed path, or a parameter that would contain an
-- encoded "/" or NUL byte, or would be "." or "..".
function Router:match(method, path)
  if type(method) ~= "string" or type(path) ~= "string" then
    error("router:match: expected method and path strings", 2)
  end

  local query
  local q = sfind(path, "?", 1, true)
  if q then
    query = ssub(path, q + 1)
    path = ssub(path, 1, q - 1)
  end

  if ssub(path, 1, 1) ~= "/" then
    return nil, "bad_request", "path must start with '/'"
  end

  -- Exact static match: only for paths with nothing to decode, so the
  -- answer is the one the trie would give.
  local static = self.static[method .. " " .. path]
  if static and not sfind(path, "%", 1, true) then
    return static, {}, query
  end

  local raw = split(path)
  local segments, unsafe = {}, {}
  for i, seg in ipairs(raw) do
    local decoded, bad = decode_segment(seg)
    if not decoded then
      return nil, "bad_request", "malformed percent-encoding in path segment "
        .. i
    end
    segments[i] = decoded
    unsafe[i] = bad
  end

  local state = {
    segments = segments,
    unsafe = unsafe,
    method = upper(method),
    values = {},
    allowed = {},
  }

  local route = search(self.root, 1, state)

  if route then
    local params = {}
    local names = route.param_names
    local k = 0
    for i = 1, #segments do
      local v = state.values[i]
      if v and (not state.rest_from or i < state.rest_from) then
        k = k + 1
        params[names[k]] = v
      end
    end
    if state.rest_from then
      params[names[#names]] = concat(segments, "/", state.rest_from)
    end
    return route, params, query
  end

  if state.path_matched then
    return nil, "method_not_allowed", sorted_keys(state.allowed)
  end

  if state.rejected then
    return nil, "bad_request", "a path parameter contains an encoded '/', "
      .. "a NUL byte, or is '.' or '..'"
  end

  return nil, "not_found"
end


return _M
