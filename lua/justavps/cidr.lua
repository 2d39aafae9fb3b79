-- IPv4 and IPv6 addresses and CIDR blocks: parsing and membership, for
-- policies that allow or deny networks.
local tonumber = tonumber
local type = type
local ipairs = ipairs
local sfind = string.find
local smatch = string.match
local sgmatch = string.gmatch
local floor = math.floor

local _M = {}


-- Parses an IPv4 literal into an array of 4 bytes, or nil.
local function parse4(s)
  local a, b, c, d = smatch(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then
    return nil
  end
  local bytes = { tonumber(a), tonumber(b), tonumber(c), tonumber(d) }
  for i = 1, 4 do
    if bytes[i] > 255 then
      return nil
    end
  end
  return bytes
end


-- Parses an IPv6 literal (with "::" and an embedded IPv4 tail) into an
-- array of 16 bytes, or nil.
local function parse6(s)
  if s == "" or sfind(s, "[^%x:%.]") then
    return nil
  end

  local head, tail = s, nil
  local dc = sfind(s, "::", 1, true)
  if dc then
    head, tail = s:sub(1, dc - 1), s:sub(dc + 2)
    if sfind(tail, "::", 1, true) then
      return nil
    end
  end

  local function groups(part)
    local out = {}
    if part == "" then
      return out
    end
    for g in sgmatch(part .. ":", "([^:]*):") do
      if sfind(g, ".", 1, true) then
        local v4 = parse4(g)
        if not v4 then
          return nil
        end
        out[#out + 1] = v4[1] * 256 + v4[2]
        out[#out + 1] = v4[3] * 256 + v4[4]
      else
        if #g == 0 or #g > 4 then
          return nil
        end
        out[#out + 1] = tonumber(g, 16)
      end
    end
    return out
  end

  local h, t = groups(head), groups(tail or "")
  if not h or not t then
    return nil
  end

  local words
  if dc then
    if #h + #t > 7 then
      return nil
    end
    words = {}
    for _, w in ipairs(h) do
      words[#words + 1] = w
    end
    for _ = 1, 8 - #h - #t do
      words[#words + 1] = 0
    end
    for _, w in ipairs(t) do
      words[#words + 1] = w
    end
  else
    if #h ~= 8 then
      return nil
    end
    words = h
  end

  local bytes = {}
  for i = 1, 8 do
    bytes[2 * i - 1] = floor(words[i] / 256)
    bytes[2 * i] = words[i] % 256
  end
  return bytes
end


-- Parses an address literal. Returns bytes (4 or 16) or nil. An
-- IPv4-mapped IPv6 address (::ffff:a.b.c.d) parses to its 4 IPv4 bytes, so
-- policies written for IPv4 apply to it too.
function _M.parse(s)
  if type(s) ~= "string" then
    return nil
  end
  local v4 = parse4(s)
  if v4 then
    return v4
  end
  local v6 = parse6(s:lower())
  if not v6 then
    return nil
  end
  local mapped = true
  for i = 1, 10 do
    if v6[i] ~= 0 then
      mapped = false
    end
  end
  if mapped and v6[11] == 255 and v6[12] == 255 then
    return { v6[13], v6[14], v6[15], v6[16] }
  end
  return v6
end


-- Parses "addr/len" (or a bare address, a block of one). Returns a block
-- {bytes=, bits=} or nil, message.
function _M.block(s)
  local addr, len = smatch(s, "^([^/]+)/(%d+)$")
  addr = addr or s
  local bytes = _M.parse(addr)
  if not bytes then
    return nil, "invalid address in CIDR block: " .. tostring(s)
  end
  local max = #bytes * 8
  local bits = len and tonumber(len) or max
  if bits > max then
    return nil, "prefix length out of range in CIDR block: " .. tostring(s)
  end
  return { bytes = bytes, bits = bits, text = s }
end


-- Returns true when address bytes fall inside block.
function _M.contains(block, bytes)
  if not bytes or #bytes ~= #block.bytes then
    return false
  end

  local bits = block.bits
  for i = 1, #bytes do
    if bits >= 8 then
      if bytes[i] ~= block.bytes[i] then
        return false
      end
      bits = bits - 8
    elseif bits > 0 then
      -- Compare only the high bits of this byte.
      local unit = 2 ^ (8 - bits)
      return floor(bytes[i] / unit) == floor(block.bytes[i] / unit)
    else
      return true
    end
  end
  return true
end


-- Compiles a list of CIDR strings. Returns the list of blocks or nil and
-- the first error.
function _M.compile(list)
  local blocks = {}
  for _, s in ipairs(list or {}) do
    local b, err = _M.block(s)
    if not b then
      return nil, err
    end
    blocks[#blocks + 1] = b
  end
  return blocks
end


-- Returns the first block of blocks that contains address (a string), or
-- nil.
function _M.match(blocks, address)
  local bytes = _M.parse(address)
  if not bytes then
    return nil
  end
  for _, b in ipairs(blocks) do
    if _M.contains(b, bytes) then
      return b
    end
  end
  return nil
end


return _M
