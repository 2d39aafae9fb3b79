-- State the edge keeps across reloads: its validated config, the caches
-- of machines and credentials, and the brokers with their health. This
-- module is stable (never reloaded), so a reload of the app and the access
-- policy keeps the caches and the broker health it has learned.
local core = require("justavps.core")
local edge_config = require("justavps.edge.config")

local ipairs = ipairs
local setmetatable = setmetatable

local _M = {
  conf = nil,
  -- slug -> machine row, or false for an unknown slug
  machines = nil,
  -- SHA-256 of an API key -> { account_id, scopes }, or false
  api_keys = nil,
  -- SHA-256 of a share token -> true when revoked, false when live
  revocations = nil,
  -- { id, url, host, port, secret, down_until, reason } in config order
  brokers = nil,
}


-- A map whose entries expire ttl seconds after they were set, holding at
-- most max_entries. A full map is emptied at the next set, which costs a
-- burst of lookups but never serves an entry past its ttl.
local Cache = {}
Cache.__index = Cache


function Cache:get(key)
  local entry = self.entries[key]
  if entry == nil then
    return nil
  end
  if core.now() >= entry.expires then
    self.entries[key] = nil
    self.count = self.count - 1
    return nil
  end
  return entry.value
end


function Cache:set(key, value)
  if self.ttl <= 0 then
    return
  end
  if self.entries[key] == nil then
    if self.count >= self.max_entries then
      self:clear()
    end
    self.count = self.count + 1
  end
  self.entries[key] = { value = value, expires = core.now() + self.ttl }
end


function Cache:delete(key)
  if self.entries[key] ~= nil then
    self.entries[key] = nil
    self.count = self.count - 1
  end
end


function Cache:clear()
  self.entries = {}
  self.count = 0
end


function Cache:size()
  return self.count
end


-- Returns a new cache with entries living ttl seconds (0 disables it).
function _M.new_cache(ttl, max_entries)
  return setmetatable({ ttl = ttl, max_entries = max_entries, entries = {},
    count = 0 }, Cache)
end


-- Installs a validated config and builds the caches and the broker list.
function _M.set_config(conf)
  local cache = conf.cache
  _M.conf = conf
  _M.machines = _M.new_cache(cache.machine_ttl, cache.max_entries)
  _M.api_keys = _M.new_cache(cache.credential_ttl, cache.max_entries)
  _M.revocations = _M.new_cache(cache.credential_ttl, cache.max_entries)

  local brokers = {}
  for i, b in ipairs(conf.brokers) do
    local host, port, https = edge_config.parse_broker_url(b.url)
    local tls
    if https then
      local err
      tls, err = core.tls.client_context({ ca = b.ca })
      if not tls then
        return nil, "brokers[" .. i .. "]: " .. tostring(err)
      end
    end
    brokers[i] = { id = b.id, url = b.url, host = host, port = port,
      tls = tls, server_name = https and b.server_name or nil,
      secret = b.secret, down_until = nil, reason = nil }
  end
  _M.brokers = brokers
  _M.next_broker = 1
  return true
end


return _M
