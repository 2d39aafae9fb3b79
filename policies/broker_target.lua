-- Target policy of the broker: decides whether a signed request may be
-- dialed at its target address and port. It runs after the signature, the
-- timestamp and the nonce have passed, and before any connection is
-- opened. It opens no socket and runs no query, so it can be edited,
-- reloaded and tested on its own.
--
-- allowed(ip, port, conf) returns true, or false and a reason. In order:
--   1. an address that is not an IP literal is denied;
--   2. an address in conf.deny_networks is denied;
--   3. an address in conf.allow_networks is allowed (subject to the port);
--   4. an address in a special-purpose range (RESERVED below: loopback,
--      private, link-local with the cloud metadata address, CGNAT,
--      multicast, documentation, ...) is denied;
--   5. any other (public) address is allowed;
-- and a port outside conf.allow_ports, when that list is not empty, is
-- denied. An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as its
-- IPv4 address.
local cidr = require("justavps.cidr")

local ipairs = ipairs
local tostring = tostring
local setmetatable = setmetatable

local _M = {}

_M.name = "broker_target"

-- Settings an operator may set in the broker config's "target" section.
_M.schema = {
  { allow_networks = { type = "array", default = {},
    elements = { type = "string" },
    description = "CIDR blocks dialed even though they are special-purpose "
      .. "ranges, such as 127.0.0.0/8 in development" } },
  { deny_networks = { type = "array", default = {},
    elements = { type = "string" },
    description = "CIDR blocks never dialed; they win over allow_networks" } },
  { allow_ports = { type = "array", default = {},
    elements = { type = "integer", between = { 1, 65535 } },
    description = "target ports that may be dialed; empty allows every "
      .. "port" } },
}

-- Special-purpose ranges that are never machine addresses.
-- NOTE: written from the special-purpose RFCs (RFC 6890 and later ones)
-- without a check against the current IANA registries.
-- IPv4-mapped IPv6 addresses need no entry: cidr.parse turns them into
-- IPv4 addresses first.
_M.RESERVED = {
  { "0.0.0.0/8", "this network" },
  { "10.0.0.0/8", "private network" },
  { "100.64.0.0/10", "shared address space (CGNAT)" },
  { "127.0.0.0/8", "loopback" },
  { "169.254.0.0/16", "link-local, with the cloud metadata address" },
  { "172.16.0.0/12", "private network" },
  { "192.0.0.0/24", "IETF protocol assignments" },
  { "192.0.2.0/24", "documentation" },
  { "192.88.99.0/24", "6to4 relay anycast" },
  { "192.168.0.0/16", "private network" },
  { "198.18.0.0/15", "benchmarking" },
  { "198.51.100.0/24", "documentation" },
  { "203.0.113.0/24", "documentation" },
  { "224.0.0.0/4", "multicast" },
  { "240.0.0.0/4", "reserved, with the broadcast address" },
  { "::/96", "unspecified, loopback and IPv4-compatible" },
  { "64:ff9b::/96", "NAT64, which embeds an IPv4 address" },
  { "64:ff9b:1::/48", "local-use NAT64" },
  { "100::/64", "discard-only" },
  { "2001::/23", "IETF protocol assignments, with Teredo" },
  { "2001:db8::/32", "documentation" },
  { "2002::/16", "6to4, which embeds an IPv4 address" },
  { "3fff::/20", "documentation" },
  { "fc00::/7", "unique local" },
  { "fe80::/10", "link-local" },
  { "fec0::/10", "site-local" },
  { "ff00::/8", "multicast" },
}

local reserved_blocks = {}
for i, entry in ipairs(_M.RESERVED) do
  local block = cidr.block(entry[1])
  block.reason = entry[2]
  reserved_blocks[i] = block
end

-- Compiled network lists, keyed by the config's list table. The config
-- is read-only, so a list compiles once per config.
local compiled = setmetatable({}, { __mode = "k" })


local function blocks_of(list)
  local blocks = compiled[list]
  if blocks then
    return blocks
  end
  local err
  blocks, err = cidr.compile(list)
  if not blocks then
    return nil, err
  end
  compiled[list] = blocks
  return blocks
end


-- Checks conf (the "target" section). Returns true or nil, message.
function _M.validate(conf)
  for _, key in ipairs({ "allow_networks", "deny_networks" }) do
    local blocks, err = blocks_of(conf[key] or {})
    if not blocks then
      return nil, key .. ": " .. err
    end
  end
  return true
end


local function first_containing(blocks, bytes)
  for _, b in ipairs(blocks) do
    if cidr.contains(b, bytes) then
      return b
    end
  end
  return nil
end


local function port_allowed(port, conf)
  local ports = conf.allow_ports
  if not ports or #ports == 0 then
    return true
  end
  for _, p in ipairs(ports) do
    if p == port then
      return true
    end
  end
  return false
end


-- Decides whether ip (a string) and port (a number) may be dialed under
-- conf. Returns true, or false and a reason for the log.
function _M.allowed(ip, port, conf)
  local bytes = cidr.parse(ip)
  if not bytes then
    return false, "not an IP literal"
  end

  local denied = first_containing(blocks_of(conf.deny_networks or {}),
    bytes)
  if denied then
    return false, "in deny_networks " .. denied.text
  end

  if not port_allowed(port, conf) then
    return false, "port " .. tostring(port) .. " is not in allow_ports"
  end

  if first_containing(blocks_of(conf.allow_networks or {}), bytes) then
    return true
  end

  local reserved = first_containing(reserved_blocks, bytes)
  if reserved then
    return false, reserved.text .. " is " .. reserved.reason
  end
  return true
end


return _M
