-- Rollout policy of daemon releases: decides whether a release is offered
-- to a machine. It opens no socket and runs no query, so it can be edited,
-- reloaded and tested on its own.
--
-- includes(rollout, machine, version) returns true or false, where rollout
-- is the release's rollout object, machine has at least slug and version
-- is the release's version, which seeds the hash of the percent form.
-- Rollout forms:
--   { all = true }          every machine
--   { percent = N }         N percent of machines, 0 <= N <= 100, chosen by
--                           a hash of slug and release version
--   { slugs = { ... } }     the machines with these slugs
-- An object with several forms includes a machine when any form does. An
-- empty object, or one with no known form, includes no machine.
local core = require("justavps.core")

local type = type
local ipairs = ipairs
local tostring = tostring
local byte = string.byte
local sha256 = core.crypto.sha256

local _M = {}

_M.name = "rollout"

-- Buckets of the percent form: 10000 allows steps of 0.01 percent.
local BUCKETS = 10000


-- Returns the bucket, 0 to BUCKETS - 1, of a machine for a release
-- version. It depends only on slug and version, so the answer for one
-- machine never changes between heartbeats, and machines in an N percent
-- rollout stay in it when N grows for the same version.
function _M.bucket(slug, version)
  local digest = sha256(tostring(slug) .. "\n" .. tostring(version))
  local b1, b2, b3, b4 = byte(digest, 1, 4)
  local n = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
  return n % BUCKETS
end


local function in_slugs(slugs, slug)
  if type(slugs) ~= "table" then
    return false
  end
  for _, s in ipairs(slugs) do
    if s == slug then
      return true
    end
  end
  return false
end


-- Returns true when the release rollout includes the machine.
function _M.includes(rollout, machine, version)
  if type(rollout) ~= "table" or type(machine) ~= "table"
      or type(machine.slug) ~= "string" then
    return false
  end
  if rollout.all == true then
    return true
  end
  if in_slugs(rollout.slugs, machine.slug) then
    return true
  end
  local percent = rollout.percent
  if type(percent) == "number" and percent > 0 then
    return _M.bucket(machine.slug, version or "") < percent * BUCKETS / 100
  end
  return false
end


-- Returns nil when rollout is one valid form, else a message naming the
-- problem. Release creation calls it before storing a rollout.
function _M.check(rollout)
  if type(rollout) ~= "table" then
    return "rollout must be an object"
  end
  local forms = 0
  if rollout.all ~= nil then
    if rollout.all ~= true then
      return "rollout.all must be true"
    end
    forms = forms + 1
  end
  if rollout.percent ~= nil then
    local p = rollout.percent
    if type(p) ~= "number" or p ~= p or p < 0 or p > 100 then
      return "rollout.percent must be a number from 0 to 100"
    end
    forms = forms + 1
  end
  if rollout.slugs ~= nil then
    if type(rollout.slugs) ~= "table" then
      return "rollout.slugs must be an array of machine slugs"
    end
    for _, s in ipairs(rollout.slugs) do
      if type(s) ~= "string" or not s:match("^[a-z0-9-]+$") then
        return "rollout.slugs must contain machine slugs ([a-z0-9-]), got "
          .. tostring(s)
      end
    end
    forms = forms + 1
  end
  if forms ~= 1 then
    return "rollout must have exactly one of all, percent or slugs"
  end
  return nil
end


return _M
