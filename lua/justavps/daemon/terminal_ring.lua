-- A bounded buffer of terminal output addressed by byte sequence numbers.
--
-- Byte n of a session's output (counting from 0) has sequence number n.
-- The ring keeps the bytes from ring.start up to ring.finish (exclusive)
-- and drops the oldest ones once it contains more than its capacity, so a
-- client that knows how many bytes it has seen can ask for exactly the
-- rest. Bytes are stored as received: nothing is decoded.
local setmetatable = setmetatable
local ssub = string.sub
local sfind = string.find
local min = math.min
local concat = table.concat

local _M = {}

-- Reads shorter than this are appended to the last chunk instead of
-- becoming chunks of their own, which bounds the number of chunks to
-- about 2 * capacity / MERGE_SIZE however small the reads are.
local MERGE_SIZE = 16 * 1024

-- When the ring drops part of a chunk it cuts after the next newline
-- within this many bytes, so a full replay rarely starts inside a UTF-8
-- character or an escape sequence.
local NEWLINE_SEARCH = 4096

local Ring = {}
Ring.__index = Ring


-- Creates an empty ring that keeps at most capacity bytes (an integer
-- >= 1), starting at sequence number 0.
function _M.new(capacity)
  return setmetatable({
    capacity = capacity,
    chunks = {},
    first = 1,
    last = 0,
    start = 0,
    finish = 0,
    size = 0,
  }, Ring)
end


-- Drops the oldest bytes while the ring contains more than its capacity,
-- but never a byte at or after keep_from.
function Ring:trim(keep_from)
  local limit = keep_from or self.finish
  local chunks = self.chunks

  while self.size > self.capacity and self.first <= self.last do
    local chunk = chunks[self.first]
    local excess = self.size - self.capacity

    if #chunk <= excess and self.start + #chunk <= limit then
      chunks[self.first] = nil
      self.first = self.first + 1
      self.start = self.start + #chunk
      self.size = self.size - #chunk
    else
      local cut = min(excess, limit - self.start)
      if cut <= 0 then
        return
      end
      local newline = sfind(chunk, "\n", cut, true)
      if newline and newline - cut < NEWLINE_SEARCH
        and newline < #chunk and self.start + newline <= limit then
        cut = newline
      end
      chunks[self.first] = ssub(chunk, cut + 1)
      self.start = self.start + cut
      self.size = self.size - cut
      return
    end
  end
end


-- Appends data (a non-empty string) at ring.finish. keep_from, when
-- given, is the position of a reader that has not caught up: the ring
-- may then exceed its capacity rather than drop bytes that reader still
-- needs.
function Ring:append(data, keep_from)
  local n = #data
  local chunks = self.chunks
  local last = chunks[self.last]

  if last and #last + n <= MERGE_SIZE then
    chunks[self.last] = last .. data
  else
    self.last = self.last + 1
    chunks[self.last] = data
  end

  self.finish = self.finish + n
  self.size = self.size + n
  self:trim(keep_from)
end


-- Returns up to max bytes starting at sequence number pos, or "" when
-- pos is ring.finish. pos must be from ring.start to ring.finish.
function Ring:slice(pos, max)
  local want = min(max, self.finish - pos)
  if want <= 0 then
    return ""
  end

  local chunks = self.chunks
  local offset = self.start
  local i = self.first
  while offset + #chunks[i] <= pos do
    offset = offset + #chunks[i]
    i = i + 1
  end

  local from = pos - offset + 1
  local chunk = chunks[i]
  if from == 1 and #chunk == want then
    return chunk
  end
  if from + want - 1 <= #chunk then
    return ssub(chunk, from, from + want - 1)
  end

  local parts = { ssub(chunk, from) }
  local got = #parts[1]
  while got < want do
    i = i + 1
    chunk = chunks[i]
    if got + #chunk > want then
      chunk = ssub(chunk, 1, want - got)
    end
    parts[#parts + 1] = chunk
    got = got + #chunk
  end
  return concat(parts)
end


return _M
