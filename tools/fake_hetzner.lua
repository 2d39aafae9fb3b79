-- A fake Hetzner Cloud API (v1) on loopback, for specs and development.
--
--   luajit tools/fake_hetzner.lua --port 0 [--token T] [--ready-polls N]
--     [--ready-seconds S]
--
-- prints "fake_hetzner listening port=N" on stdout once it listens on
-- 127.0.0.1. Point a client at http://127.0.0.1:N/v1 with the bearer
-- token (default "fake-token"). Specs may instead require
-- "tools.fake_hetzner" and call start(opts) on their own loop.
--
-- It keeps state in memory. A server goes from initializing to running
-- after ready_polls reads (of the server, a list containing it, or its
-- create action) or after ready_seconds, whichever comes first. Actions
-- and snapshot images follow the same rule. Every response carries the
-- RateLimit-* headers. Bodies follow the shapes of the public API
-- reference and of the hcloud-go schema (servers carry `location`, not
-- the removed `datacenter`).
--
-- Control endpoints, without a token:
--   POST /__fault {"mode": M, "count": N, "match": "POST /v1/servers",
--                  "delay": S, "reset_in": S}
--     queues a fault for the next N requests (default 1) whose
--     "METHOD path" starts with match (default: every request). Modes:
--     "429" (RateLimit-Reset reset_in seconds ahead, default 1), "500",
--     "slow" (responds after delay seconds, default 2), "malformed" (a
--     200 with a truncated JSON body), "drop" (closes the connection
--     without a response), "drop_after" (handles the request, then closes
--     the connection without the response). "none" clears queued faults.
--   GET /__state  counts of servers, ssh_keys, images and requests, and
--     the list of requests seen as "METHOD path".
--   POST /__reset  forgets every resource, fault and request.
local _M = {}

local function script_setup()
  -- Lets `luajit tools/fake_hetzner.lua` find the Lua tree and the core
  -- module from any working directory.
  local dir = (arg and arg[0] or ""):match("^(.*)/tools/[^/]*$") or "."
  local build = os.getenv("JV_BUILD_DIR") or (dir .. "/build")
  package.path = dir .. "/lua/?.lua;" .. dir .. "/lua/?/init.lua;"
    .. dir .. "/?.lua;" .. package.path
  package.cpath = build .. "/lua/?.so;" .. package.cpath
end

local is_script = select("#", ...) == 0 or (...) ~= "tools.fake_hetzner"
if is_script then
  script_setup()
end

local core = require("justavps.core")
local json = require("justavps.json")

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local format = string.format
local byte = string.byte
local char = string.char
local concat = table.concat
local floor = math.floor
local min = math.min
local max = math.max
local null = json.null
local array = json.array

local RATE_LIMIT = 3600


-- Fixed catalogue ----------------------------------------------------------


local LOCATIONS = {
  { 1, "fsn1", "Falkenstein DC Park 1", "DE", "Falkenstein", 50.47612,
    12.370071, "eu-central" },
  { 2, "nbg1", "Nuremberg DC Park 1", "DE", "Nuremberg", 49.452102,
    11.076665, "eu-central" },
  { 3, "hel1", "Helsinki DC Park 1", "FI", "Helsinki", 60.169855,
    24.938379, "eu-central" },
  { 4, "ash", "Ashburn, VA", "US", "Ashburn, VA", 39.045821, -77.487073,
    "us-east" },
  { 5, "hil", "Hillsboro, OR", "US", "Hillsboro, OR", 45.54222,
    -122.951924, "us-west" },
  { 6, "sin", "Singapore", "SG", "Singapore", 1.283333, 103.833333,
    "ap-southeast" },
}

-- id, name, category, cores, memory, disk, architecture, deprecated,
-- hourly and monthly net price, then per location: name, available,
-- recommended. Prices are illustrative, like those of the API reference.
local SERVER_TYPES = {
  { 104, "cx22", "cost_optimized", 2, 4, 40, "x86", true,
    "0.0052000000", "3.2900000000",
    { { "fsn1", false, false }, { "nbg1", false, false },
      { "hel1", false, false } } },
  { 114, "cx23", "cost_optimized", 2, 4, 40, "x86", false,
    "0.0048000000", "2.9900000000",
    { { "fsn1", true, true }, { "nbg1", true, false },
      { "hel1", true, false } } },
  { 116, "cpx22", "regular_purpose", 2, 4, 80, "x86", false,
    "0.0104000000", "6.4900000000",
    { { "fsn1", true, false }, { "nbg1", true, true },
      { "hel1", true, false }, { "ash", true, true },
      { "hil", true, true }, { "sin", false, false } } },
  { 45, "cax11", "cost_optimized", 2, 4, 40, "arm", false,
    "0.0062000000", "3.7900000000",
    { { "fsn1", true, true }, { "nbg1", true, false },
      { "hel1", true, false } } },
}

-- id, name, description, os_flavor, os_version, architecture
local SYSTEM_IMAGES = {
  { 310554929, "debian-13", "Debian 13", "debian", "13", "x86" },
  { 310554930, "debian-13", "Debian 13", "debian", "13", "arm" },
  { 114690387, "debian-12", "Debian 12", "debian", "12", "x86" },
  { 161547269, "ubuntu-24.04", "Ubuntu 24.04", "ubuntu", "24.04", "x86" },
}


local function timestamp(t)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", floor(t or core.time()))
end


local function location_object(l)
  return {
    id = l[1], name = l[2], description = l[3], country = l[4],
    city = l[5], latitude = l[6], longitude = l[7], network_zone = l[8],
  }
end


local function money(net)
  return { net = net, gross = net .. "000000" }
end


local function deprecation(deprecated)
  if not deprecated then
    return null
  end
  return { announced = "2025-10-16T06:00:00Z",
    unavailable_after = "2025-12-31T23:59:59Z" }
end


local function server_type_object(t)
  local prices, locations = array(), array()
  for _, entry in ipairs(t[11]) do
    local loc
    for _, l in ipairs(LOCATIONS) do
      if l[2] == entry[1] then
        loc = l
      end
    end
    prices[#prices + 1] = {
      location = entry[1],
      price_hourly = money(t[9]),
      price_monthly = money(t[10]),
      included_traffic = 21990232555520,
      price_per_tb_traffic = money("1.0000000000"),
    }
    locations[#locations + 1] = {
      id = loc[1], name = entry[1], deprecation = deprecation(t[8]),
      available = entry[2], recommended = entry[3],
    }
  end
  return {
    id = t[1], name = t[2], description = t[2]:upper(), category = t[3],
    cores = t[4], memory = t[5], disk = t[6], storage_type = "local",
    cpu_type = "shared", architecture = t[7], deprecated = t[8],
    deprecation = deprecation(t[8]), prices = prices,
    locations = locations,
  }
end


local function system_image_object(i)
  return {
    id = i[1], type = "system", status = "available", name = i[2],
    description = i[3], image_size = null, disk_size = 5,
    created = "2025-08-18T06:15:25Z", created_from = null, bound_to = null,
    os_flavor = i[4], os_version = i[5], rapid_deploy = true,
    protection = { delete = false }, deprecated = null, deleted = null,
    labels = {}, architecture = i[6],
  }
end


local function find_by(list, key, value)
  for _, item in ipairs(list) do
    if tostring(item[key]) == tostring(value) then
      return item
    end
  end
  return nil
end


-- Requests ---------------------------------------------------------------


local function unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(h)
    return char(tonumber(h, 16))
  end))
end


-- Returns the query as name -> list of values.
local function parse_query(query)
  local params = {}
  for part in (query or ""):gmatch("[^&]+") do
    local name, value = part:match("^([^=]*)=?(.*)$")
    name = unescape(name)
    params[name] = params[name] or {}
    local list = params[name]
    list[#list + 1] = unescape(value)
  end
  return params
end


local function first(params, name)
  return params[name] and params[name][1]
end


-- Splits a label selector at commas outside parentheses.
local function split_selector(selector)
  local parts, depth, start = {}, 0, 1
  for i = 1, #selector do
    local c = byte(selector, i)
    if c == 40 then
      depth = depth + 1
    elseif c == 41 then
      depth = depth - 1
    elseif c == 44 and depth == 0 then
      parts[#parts + 1] = selector:sub(start, i - 1)
      start = i + 1
    end
  end
  parts[#parts + 1] = selector:sub(start)
  return parts
end


local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end


-- Returns true when labels satisfy every term of selector: k=v, k==v,
-- k!=v, k, !k, k in (a,b), k notin (a,b).
local function selector_matches(selector, labels)
  for _, term in ipairs(split_selector(selector)) do
    term = trim(term)
    local key, op, rest = term:match("^([^%s!=]+)%s+(n?o?t?in)%s*%((.*)%)$")
    if key and (op == "in" or op == "notin") then
      local found = false
      for value in rest:gmatch("[^,]+") do
        if labels[key] == trim(value) then
          found = true
        end
      end
      if (op == "in") ~= found then
        return false
      end
    else
      local k, v = term:match("^([^!=]+)!=(.*)$")
      if k then
        if labels[trim(k)] == trim(v) then
          return false
        end
      else
        k, v = term:match("^([^!=]+)==?(.*)$")
        if k then
          if labels[trim(k)] ~= trim(v) then
            return false
          end
        elseif term:sub(1, 1) == "!" then
          if labels[trim(term:sub(2))] ~= nil then
            return false
          end
        elseif term ~= "" and labels[term] == nil then
          return false
        end
      end
    end
  end
  return true
end


local function error_body(code, message, details)
  return { error = { code = code, message = message,
    details = details or {} } }
end


-- The fake server ----------------------------------------------------------


local Fake = {}
Fake.__index = Fake


function Fake:reset()
  self.servers = {}
  self.ssh_keys = {}
  self.images = {}
  self.actions = {}
  self.faults = {}
  self.requests = {}
  self.next_id = 5000000
  self.budget = RATE_LIMIT
  self.budget_at = core.time()
end


function Fake:new_id()
  self.next_id = self.next_id + 1
  return self.next_id
end


function Fake:ready(thing)
  thing.polls = (thing.polls or 0) + 1
  return thing.polls > self.ready_polls
    or core.time() - thing.started >= self.ready_seconds
end


-- Returns an action object, advancing it one poll.
function Fake:action_object(action, poll)
  if action.status == "running" and poll then
    local done
    if action.server then
      self:refresh_server(action.server, true)
      done = action.server.status ~= "initializing"
    else
      done = self:ready(action)
    end
    if done then
      action.status = "success"
      action.finished = timestamp()
      action.progress = 100
      if action.on_success then
        action.on_success()
      end
    else
      action.progress = min(90, action.progress + 30)
    end
  end
  return {
    id = action.id, command = action.command, status = action.status,
    progress = action.progress, started = timestamp(action.started),
    finished = action.finished or null,
    resources = array({ { id = action.resource_id,
      type = action.resource_type } }),
    error = null,
  }
end


function Fake:new_action(command, resource_id, resource_type)
  local action = {
    id = self:new_id(), command = command, status = "running",
    progress = 0, started = core.time(), resource_id = resource_id,
    resource_type = resource_type or "server",
  }
  self.actions[action.id] = action
  return action
end


function Fake:refresh_server(server, poll)
  if server.status == "initializing" and poll and self:ready(server) then
    server.status = "running"
  end
end


local function server_object(server)
  local n = server.id % 250 + 1
  return {
    id = server.id, name = server.name, status = server.status,
    created = timestamp(server.started),
    public_net = {
      ipv4 = { id = server.id + 1, ip = "203.0.113." .. n, blocked = false,
        dns_ptr = format("static.%d.113.0.203.clients.example", n) },
      ipv6 = { id = server.id + 2, ip = format("2001:db8:%x::/64", n),
        blocked = false, dns_ptr = array() },
      floating_ips = array(), firewalls = array(),
    },
    private_net = array(),
    server_type = server_type_object(server.server_type),
    location = location_object(server.location),
    image = server.image,
    iso = null, rescue_enabled = false, locked = false,
    backup_window = null, outgoing_traffic = null, ingoing_traffic = null,
    included_traffic = 21990232555520,
    protection = { delete = false, rebuild = false },
    labels = server.labels, volumes = array(), load_balancers = array(),
    primary_disk_size = server.server_type[6], placement_group = null,
  }
end


local function sorted(map)
  local list = {}
  for _, item in pairs(map) do
    list[#list + 1] = item
  end
  table.sort(list, function(a, b)
    return a.id < b.id
  end)
  return list
end


-- Returns one page of items as body[key] with meta.pagination, and the
-- Link header.
function Fake:page(key, items, params, path)
  local per_page = tonumber(first(params, "per_page")) or 25
  per_page = max(1, min(50, floor(per_page)))
  local page = max(1, floor(tonumber(first(params, "page")) or 1))
  local last = max(1, math.ceil(#items / per_page))
  local out = array()
  for i = (page - 1) * per_page + 1, min(#items, page * per_page) do
    out[#out + 1] = items[i]
  end
  local links = {}
  local base = format("http://127.0.0.1:%d/v1%s?per_page=%d&page=",
    self.port_number, path, per_page)
  if page > 1 then
    links[#links + 1] = format('<%s%d>; rel="prev"', base, page - 1)
  end
  if page < last then
    links[#links + 1] = format('<%s%d>; rel="next"', base, page + 1)
  end
  links[#links + 1] = format('<%s%d>; rel="last"', base, last)
  return {
    [key] = out,
    meta = { pagination = {
      page = page, per_page = per_page,
      previous_page = page > 1 and page - 1 or null,
      next_page = page < last and page + 1 or null,
      last_page = last, total_entries = #items,
    } },
  }, concat(links, ", ")
end


-- Routes -------------------------------------------------------------------


local routes = {}


routes["GET /locations"] = function(self, req)
  local items = {}
  for _, l in ipairs(LOCATIONS) do
    local name = first(req.params, "name")
    if not name or name == l[2] then
      items[#items + 1] = location_object(l)
    end
  end
  return 200, self:page("locations", items, req.params, "/locations")
end


routes["GET /locations/{id}"] = function(_, req)
  local l = find_by(LOCATIONS, 1, req.id) or find_by(LOCATIONS, 2, req.id)
  if not l then
    return 404, error_body("not_found", "location not found")
  end
  return 200, { location = location_object(l) }
end


routes["GET /server_types"] = function(self, req)
  local items = {}
  local name = first(req.params, "name")
  for _, t in ipairs(SERVER_TYPES) do
    if not name or name == t[2] then
      items[#items + 1] = server_type_object(t)
    end
  end
  return 200, self:page("server_types", items, req.params, "/server_types")
end


routes["GET /server_types/{id}"] = function(_, req)
  local t = find_by(SERVER_TYPES, 1, req.id)
  if not t then
    return 404, error_body("not_found", "server type not found")
  end
  return 200, { server_type = server_type_object(t) }
end


function Fake:all_images()
  local items = {}
  for _, i in ipairs(SYSTEM_IMAGES) do
    items[#items + 1] = system_image_object(i)
  end
  for _, image in ipairs(sorted(self.images)) do
    local copy = {}
    for k, v in pairs(image) do
      if k ~= "action_id" then
        copy[k] = v
      end
    end
    items[#items + 1] = copy
  end
  return items
end


routes["GET /images"] = function(self, req)
  local items = {}
  local p = req.params
  for _, image in ipairs(self:all_images()) do
    if (not first(p, "name") or image.name == first(p, "name"))
        and (not first(p, "architecture")
          or image.architecture == first(p, "architecture"))
        and (not first(p, "type") or image.type == first(p, "type")) then
      items[#items + 1] = image
    end
  end
  return 200, self:page("images", items, p, "/images")
end


routes["GET /images/{id}"] = function(self, req)
  local image = find_by(self:all_images(), "id", req.id)
  if not image then
    return 404, error_body("not_found", "image not found")
  end
  return 200, { image = image }
end


function Fake:filter_servers(params)
  local items = {}
  for _, server in ipairs(sorted(self.servers)) do
    local selector = first(params, "label_selector")
    if (not selector or selector_matches(selector, server.labels))
        and (not first(params, "name")
          or first(params, "name") == server.name) then
      self:refresh_server(server, true)
      items[#items + 1] = server_object(server)
    end
  end
  return items
end


routes["GET /servers"] = function(self, req)
  return 200, self:page("servers", self:filter_servers(req.params),
    req.params, "/servers")
end


routes["GET /servers/{id}"] = function(self, req)
  local server = self.servers[tonumber(req.id)]
  if not server then
    return 404, error_body("not_found",
      format("server with ID '%s' not found", req.id))
  end
  self:refresh_server(server, true)
  return 200, { server = server_object(server) }
end


local function check_labels(labels)
  if labels == nil then
    return {}
  end
  if type(labels) ~= "table" then
    return nil, "labels"
  end
  for k, v in pairs(labels) do
    if type(k) ~= "string" or type(v) ~= "string" or #v > 63
        or not k:match("^[%w][%w%-_./]*$") then
      return nil, "labels"
    end
  end
  return labels
end


local function invalid_input(field, message)
  return 400, error_body("invalid_input",
    format("invalid input in field '%s': %s", field, message),
    { fields = array({ { name = field, messages = array({ message }) } }) })
end


local function lookup_type(value)
  return find_by(SERVER_TYPES, 2, value) or find_by(SERVER_TYPES, 1, value)
end


function Fake:lookup_image(value, architecture)
  for _, image in ipairs(self:all_images()) do
    if (tostring(image.id) == tostring(value) or image.name == value)
        and image.architecture == architecture then
      return image
    end
  end
  return nil
end


-- Returns the list of key ids for the create request's ssh_keys, or nil
-- and an error response.
function Fake:resolve_keys(names)
  local ids = {}
  for _, ref in ipairs(type(names) == "table" and names or {}) do
    local key = self.ssh_keys[tonumber(ref)]
      or find_by(sorted(self.ssh_keys), "name", ref)
    if not key then
      return nil, 404, error_body("not_found",
        format("SSH key '%s' not found", tostring(ref)))
    end
    ids[#ids + 1] = key.id
  end
  return ids
end


routes["POST /servers"] = function(self, req)
  local b = req.body
  if type(b.name) ~= "string" or not b.name:match("^[%w][%w%-.]*$") then
    return invalid_input("name", "is invalid or missing")
  end
  local stype = lookup_type(b.server_type)
  if not stype then
    return invalid_input("server_type", "is missing or unknown")
  end
  local loc = find_by(LOCATIONS, 2, b.location or "fsn1")
    or find_by(LOCATIONS, 1, b.location)
  if not loc then
    return invalid_input("location", "is unknown")
  end
  local image = self:lookup_image(b.image, stype[7])
  if not image then
    return invalid_input("image", "is missing or unknown")
  end
  local labels = check_labels(b.labels)
  if not labels then
    return invalid_input("labels", "has an invalid key or value")
  end
  if b.user_data ~= nil and (type(b.user_data) ~= "string"
      or #b.user_data > 32768) then
    return invalid_input("user_data", "is longer than 32 KiB")
  end
  local offered = false
  for _, entry in ipairs(stype[11]) do
    if entry[1] == loc[2] and entry[2] then
      offered = true
    end
  end
  if not offered then
    -- NOTE: the status of resource_unavailable is a guess; the API
    -- reference gives none, and clients branch on the code.
    return 412, error_body("resource_unavailable", format(
      "server type %s is unavailable in location %s", stype[2], loc[2]))
  end
  if find_by(sorted(self.servers), "name", b.name) then
    return 409, error_body("uniqueness_error", "server name is already used",
      { fields = array({ { name = "name" } }) })
  end
  local key_ids, status, err = self:resolve_keys(b.ssh_keys)
  if not key_ids then
    return status, err
  end

  local server = {
    id = self:new_id(), name = b.name, status = "initializing",
    started = core.time(), server_type = stype, location = loc,
    image = image, labels = labels, ssh_keys = key_ids,
    user_data = b.user_data,
  }
  self.servers[server.id] = server
  local action = self:new_action("create_server", server.id)
  action.server = server
  local start = self:new_action("start_server", server.id)
  start.server = server
  return 201, {
    server = server_object(server),
    action = self:action_object(action),
    next_actions = array({ self:action_object(start) }),
    root_password = #key_ids == 0 and core.crypto.random_token(20) or null,
  }
end


routes["DELETE /servers/{id}"] = function(self, req)
  local id = tonumber(req.id)
  local server = self.servers[id]
  if not server then
    return 404, error_body("not_found",
      format("server with ID '%s' not found", req.id))
  end
  server.status = "deleting"
  self.servers[id] = nil
  local action = self:new_action("delete_server", id)
  action.started = core.time()
  return 200, { action = self:action_object(action) }
end


routes["POST /servers/{id}/actions/create_image"] = function(self, req)
  local server = self.servers[tonumber(req.id)]
  if not server then
    return 404, error_body("not_found",
      format("server with ID '%s' not found", req.id))
  end
  local b = req.body
  local labels = check_labels(b.labels)
  if not labels then
    return invalid_input("labels", "has an invalid key or value")
  end
  local kind = b.type or "snapshot"
  if kind ~= "snapshot" and kind ~= "backup" then
    return invalid_input("type", "must be snapshot or backup")
  end
  local image = {
    id = self:new_id(), type = kind, status = "creating", name = null,
    description = b.description or null, image_size = null,
    disk_size = server.server_type[6], created = timestamp(),
    created_from = { id = server.id, name = server.name }, bound_to = null,
    os_flavor = server.image.os_flavor, os_version = server.image.os_version,
    rapid_deploy = false, protection = { delete = false },
    deprecated = null, deleted = null, labels = labels,
    architecture = server.server_type[7],
  }
  local action = self:new_action("create_image", server.id)
  action.on_success = function()
    image.status = "available"
    image.image_size = 1.5
  end
  image.action_id = action.id
  self.images[image.id] = image
  return 201, { image = find_by(self:all_images(), "id", image.id),
    action = self:action_object(action) }
end


routes["GET /actions"] = function(self, req)
  local items = {}
  for _, id in ipairs(req.params.id or {}) do
    local action = self.actions[tonumber(id)]
    if action then
      items[#items + 1] = self:action_object(action, true)
    end
  end
  return 200, self:page("actions", items, req.params, "/actions")
end


routes["GET /actions/{id}"] = function(self, req)
  local action = self.actions[tonumber(req.id)]
  if not action then
    return 404, error_body("not_found",
      format("action with ID '%s' not found", req.id))
  end
  return 200, { action = self:action_object(action, true) }
end


local function key_object(key)
  return {
    id = key.id, name = key.name, fingerprint = key.fingerprint,
    public_key = key.public_key, labels = key.labels,
    created = timestamp(key.started),
  }
end


routes["GET /ssh_keys"] = function(self, req)
  local items = {}
  local p = req.params
  for _, key in ipairs(sorted(self.ssh_keys)) do
    local selector = first(p, "label_selector")
    if (not first(p, "name") or first(p, "name") == key.name)
        and (not first(p, "fingerprint")
          or first(p, "fingerprint") == key.fingerprint)
        and (not selector or selector_matches(selector, key.labels)) then
      items[#items + 1] = key_object(key)
    end
  end
  return 200, self:page("ssh_keys", items, p, "/ssh_keys")
end


routes["GET /ssh_keys/{id}"] = function(self, req)
  local key = self.ssh_keys[tonumber(req.id)]
  if not key then
    return 404, error_body("not_found", "SSH key not found")
  end
  return 200, { ssh_key = key_object(key) }
end


routes["POST /ssh_keys"] = function(self, req)
  local b = req.body
  if type(b.name) ~= "string" or b.name == "" then
    return invalid_input("name", "is missing")
  end
  local fingerprint = type(b.public_key) == "string"
    and self.fingerprint(b.public_key)
  if not fingerprint then
    return invalid_input("public_key", "is not a valid SSH public key")
  end
  local labels = check_labels(b.labels)
  if not labels then
    return invalid_input("labels", "has an invalid key or value")
  end
  for _, key in pairs(self.ssh_keys) do
    if key.fingerprint == fingerprint then
      return 409, error_body("uniqueness_error",
        "SSH key with the same fingerprint already exists",
        { fields = array({ { name = "public_key" } }) })
    elseif key.name == b.name then
      return 409, error_body("uniqueness_error",
        "SSH key with the same name already exists",
        { fields = array({ { name = "name" } }) })
    end
  end
  local key = {
    id = self:new_id(), name = b.name, fingerprint = fingerprint,
    public_key = b.public_key, labels = labels, started = core.time(),
  }
  self.ssh_keys[key.id] = key
  return 201, { ssh_key = key_object(key) }
end


routes["DELETE /ssh_keys/{id}"] = function(self, req)
  local id = tonumber(req.id)
  if not self.ssh_keys[id] then
    return 404, error_body("not_found", "SSH key not found")
  end
  self.ssh_keys[id] = nil
  return 204
end


-- Dispatch -----------------------------------------------------------------


-- Returns the RateLimit-* headers, spending one request of the budget,
-- which refills by limit/3600 per second as the real API's does.
function Fake:rate_headers(spend)
  local now = core.time()
  self.budget = min(RATE_LIMIT,
    self.budget + (now - self.budget_at) * RATE_LIMIT / 3600)
  self.budget_at = now
  if spend then
    self.budget = max(0, self.budget - 1)
  end
  local remaining = floor(self.budget)
  return {
    ["RateLimit-Limit"] = tostring(RATE_LIMIT),
    ["RateLimit-Remaining"] = tostring(remaining),
    ["RateLimit-Reset"] = tostring(floor(now + (RATE_LIMIT - remaining))),
    ["X-Correlation-Id"] = format("fake-%x", self.next_id),
    ["Content-Type"] = "application/json",
  }
end


-- Returns the next queued fault that matches line and spends it.
function Fake:take_fault(line)
  for i, fault in ipairs(self.faults) do
    if not fault.match or line:sub(1, #fault.match) == fault.match then
      fault.count = fault.count - 1
      if fault.count <= 0 then
        table.remove(self.faults, i)
      end
      return fault
    end
  end
  return nil
end


local function read_body(req)
  local parts = {}
  while true do
    local data = req:read()
    if not data then
      break
    end
    parts[#parts + 1] = data
  end
  return concat(parts)
end


local function drop(req)
  local sock = req:hijack()
  sock:close()
end


function Fake:control(req, path, text)
  if req.method == "POST" and path == "/__fault" then
    local b = json.decode(text ~= "" and text or "{}")
    local modes = { ["429"] = true, ["500"] = true, slow = true,
      malformed = true, drop = true, drop_after = true, none = true }
    if type(b) ~= "table" or not modes[tostring(b.mode)] then
      return 400, error_body("invalid_input", "unknown fault mode")
    end
    if b.mode == "none" then
      self.faults = {}
    else
      self.faults[#self.faults + 1] = {
        mode = tostring(b.mode), count = tonumber(b.count) or 1,
        match = b.match, delay = tonumber(b.delay) or 2,
        reset_in = tonumber(b.reset_in) or 1,
      }
    end
    return 200, { faults = #self.faults }
  elseif req.method == "GET" and path == "/__state" then
    local count = function(map)
      local n = 0
      for _ in pairs(map) do
        n = n + 1
      end
      return n
    end
    return 200, {
      servers = count(self.servers), ssh_keys = count(self.ssh_keys),
      images = count(self.images), faults = #self.faults,
      requests = array(self.requests),
    }
  elseif req.method == "POST" and path == "/__reset" then
    self:reset()
    return 200, {}
  end
  return 404, error_body("not_found", "unknown control endpoint")
end


-- Finds the route for method and path (without /v1). Returns the handler
-- and the id segment.
local function route(method, path)
  local handler = routes[method .. " " .. path]
  if handler then
    return handler
  end
  local head, id, tail = path:match("^(/[%w_]+)/([^/]+)(.*)$")
  if head then
    handler = routes[method .. " " .. head .. "/{id}" .. tail]
    return handler, id
  end
  return nil
end


function Fake:handle(req)
  local method, path = req.method, req.path
  local auth = req:header("authorization")
  local text = read_body(req)

  if path:sub(1, 3) == "/__" then
    local status, body = self:control(req, path, text)
    return status, { ["Content-Type"] = "application/json" },
      json.encode(body)
  end

  local line = method .. " " .. path
  self.requests[#self.requests + 1] = line
  local fault = self:take_fault(line)
  if fault then
    if fault.mode == "drop" then
      return drop(req)
    elseif fault.mode == "slow" then
      core.sleep(fault.delay)
    elseif fault.mode == "500" then
      return 500, self:rate_headers(true), json.encode(error_body(
        "server_error", "fake internal server error"))
    elseif fault.mode == "malformed" then
      return 200, self:rate_headers(true), '{"servers": [{"id": 1,'
    elseif fault.mode == "429" then
      local headers = self:rate_headers(true)
      headers["RateLimit-Remaining"] = "0"
      headers["RateLimit-Reset"] = tostring(floor(core.time())
        + fault.reset_in)
      return 429, headers, json.encode(error_body("rate_limit_exceeded",
        "limit of 3600 requests per hour reached"))
    end
  end

  local headers = self:rate_headers(true)
  local status, body, link
  if auth ~= "Bearer " .. self.token then
    status, body = 401, error_body("unauthorized", "unable to authenticate")
  elseif path:sub(1, 4) ~= "/v1/" then
    status, body = 404, error_body("not_found", "no such API path")
  else
    local handler, id = route(method, path:sub(4))
    if not handler then
      status, body = 404, error_body("not_found", "no such API path")
    else
      local params = parse_query(req.query)
      local decoded = {}
      if text ~= "" then
        decoded = json.decode(text)
      end
      if type(decoded) ~= "table" then
        status, body = 400, error_body("json_error", "invalid JSON body")
      else
        status, body, link = handler(self,
          { id = id, params = params, body = decoded })
      end
    end
  end
  headers.Link = link

  if fault and fault.mode == "drop_after" then
    return drop(req)
  end
  if status == 204 then
    return 204, headers
  end
  return status, headers, json.encode(body)
end


-- Starts a fake on 127.0.0.1. opts: port (default 0), token (default
-- "fake-token"), ready_polls (default 2), ready_seconds (default 30),
-- fingerprint (function(public_key) -> MD5 fingerprint; defaults to the
-- Hetzner driver's). Returns the fake, or nil, message, code.
function _M.start(opts)
  opts = opts or {}
  local self = setmetatable({
    token = opts.token or "fake-token",
    ready_polls = opts.ready_polls or 2,
    ready_seconds = opts.ready_seconds or 30,
    fingerprint = opts.fingerprint
      or require("providers.hetzner").fingerprint,
  }, Fake)
  self:reset()
  local listener, err, code = core.http.listen({
    host = "127.0.0.1",
    port = opts.port or 0,
    access_log = false,
    max_body = 256 * 1024,
    handler = function(req)
      return self:handle(req)
    end,
  })
  if not listener then
    return nil, err, code
  end
  self.listener = listener
  self.port_number = listener:port()
  return self
end


function Fake:port()
  return self.port_number
end


function Fake:url()
  return format("http://127.0.0.1:%d/v1", self:port())
end


function Fake:close()
  self.listener:close()
end


_M.selector_matches = selector_matches


local function main(argv)
  local opts = {}
  local names = { ["--port"] = "port", ["--token"] = "token",
    ["--ready-polls"] = "ready_polls", ["--ready-seconds"] = "ready_seconds" }
  local i = 1
  while i <= #argv do
    local name = names[argv[i]]
    if not name or argv[i + 1] == nil then
      io.stderr:write("usage: luajit tools/fake_hetzner.lua --port N ",
        "[--token T] [--ready-polls N] [--ready-seconds S]\n")
      return 2
    end
    opts[name] = name == "token" and argv[i + 1] or tonumber(argv[i + 1])
    i = i + 2
  end
  local fake, err = _M.start(opts)
  if not fake then
    io.stderr:write("fake_hetzner: listen failed: ", err, "\n")
    return 1
  end
  io.stdout:write(format("fake_hetzner listening port=%d\n", fake:port()))
  io.stdout:flush()
  core.run()
  return 0
end


if is_script then
  os.exit(main({ ... }))
end

return _M
