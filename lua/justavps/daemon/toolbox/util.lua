-- Helpers shared by the toolbox modules: JSON replies and errors, query
-- strings, bounded JSON request bodies, running a helper program without a
-- shell, and UTF-8 checks for streamed output.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")

local type = type
local pairs = pairs
local getmetatable = getmetatable
local setmetatable = setmetatable
local ipairs = ipairs
local sort = table.sort
local tonumber = tonumber
local tostring = tostring
local char = string.char
local sbyte = string.byte
local sfind = string.find
local ssub = string.sub
local sgsub = string.gsub
local sgmatch = string.gmatch
local concat = table.concat
local proc = core.proc

local _M = {}

-- Largest JSON request body read into memory.
_M.MAX_JSON_BODY = 1024 * 1024

-- Environment of helper programs (realpath, find, mkdir, ...): a fixed
-- PATH and the C locale, so their output is bytes and not translated text.
local HELPER_ENV = {
  PATH = "/usr/local/bin:/usr/bin:/bin",
  LC_ALL = "C",
}


-- Returns an error value for the handlers to pass up: status, stable
-- code and a message for people.
function _M.fail(status, code, message)
  return { status = status, code = code, message = message }
end


local valid_utf8 = core.ws.valid_utf8


-- Returns v, or a copy of it in which each string that is not UTF-8 has
-- its bytes from 0x80 up replaced with "?". A record's field NAME then
-- gains NAME_b64 with the exact bytes. JSON text must be UTF-8, and a
-- file name can be any bytes, so one such name would otherwise make a
-- whole listing invalid.
local function utf8_text(v)
  if type(v) ~= "table" then
    return v
  end
  local copy
  for k, x in pairs(v) do
    local fixed = x
    if type(x) == "string" then
      if not valid_utf8(x) then
        fixed = sgsub(x, "[\128-\255]", "?")
      end
    elseif type(x) == "table" then
      fixed = utf8_text(x)
    end
    if fixed ~= x then
      if not copy then
        copy = setmetatable({}, getmetatable(v))
        for ck, cx in pairs(v) do
          copy[ck] = cx
        end
      end
      copy[k] = fixed
      if type(x) == "string" and type(k) == "string" then
        copy[k .. "_b64"] = core.crypto.base64_encode(x)
      end
    end
  end
  return copy or v
end


function _M.json_reply(status, value, headers)
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(headers or {}) do
    h[k] = v
  end
  return status, h, json.encode(utf8_text(value)) .. "\n"
end


-- Absolute paths of the toolbox root (as configured and resolved), which
-- error messages from the system name and clients must not see.
local root_paths = {}


-- Records root, an absolute path of the toolbox root, for error_reply.
function _M.note_root(root)
  if type(root) == "string" and sfind(root, "^/.") and not root_paths[root]
  then
    root_paths[root] = true
    root_paths[#root_paths + 1] = root
    -- Longer paths first, so that a root inside another is replaced whole.
    sort(root_paths, function(a, b)
      return #a > #b
    end)
  end
end


-- Returns message with each absolute path under the toolbox root made
-- relative to it.
local function relative_paths(message)
  if type(message) ~= "string" then
    return message
  end
  for _, root in ipairs(root_paths) do
    local out, pos = {}, 1
    while true do
      local at, last = sfind(message, root, pos, true)
      if not at then
        break
      end
      out[#out + 1] = ssub(message, pos, at - 1)
      -- "ROOT/x" becomes "x", and ROOT alone becomes ".".
      if ssub(message, last + 1, last + 1) == "/" then
        last = last + 1
      else
        out[#out + 1] = "."
      end
      pos = last + 1
    end
    out[#out + 1] = ssub(message, pos)
    message = concat(out)
  end
  return message
end


-- Returns the JSON error response for e. Server-side failures (5xx)
-- are logged, because the client alone sees their message.
function _M.error_reply(e)
  if e.status >= 500 then
    log.err("toolbox request failed", { code = e.code, error = e.message })
  end
  return _M.json_reply(e.status,
    { error = { code = e.code, message = relative_paths(e.message) } })
end


local function unescape(s)
  s = sgsub(s, "+", " ")
  return (sgsub(s, "%%(%x%x)", function(hex)
    return char(tonumber(hex, 16))
  end))
end

_M.unescape = unescape


-- Parses a query string into a table of decoded names to decoded values.
-- A name given more than once keeps its last value.
function _M.parse_query(query)
  local out = {}
  if not query then
    return out
  end
  for pair in sgmatch(query, "[^&]+") do
    local eq = sfind(pair, "=", 1, true)
    if eq then
      out[unescape(ssub(pair, 1, eq - 1))] = unescape(ssub(pair, eq + 1))
    else
      out[unescape(pair)] = ""
    end
  end
  return out
end


-- Returns true for the flag values "1", "true" and "yes".
function _M.flag(value)
  return value == "1" or value == "true" or value == "yes"
end


-- Reads the request body as a JSON object. Returns the table or nil, err.
function _M.read_json(req)
  local parts, size = {}, 0
  while true do
    local chunk, err = req:read()
    if not chunk then
      if err then
        return nil, _M.fail(400, "bad_request",
          "reading the request body failed: " .. tostring(err))
      end
      break
    end
    size = size + #chunk
    if size > _M.MAX_JSON_BODY then
      return nil, _M.fail(413, "too_large", "JSON body is larger than "
        .. _M.MAX_JSON_BODY .. " bytes")
    end
    parts[#parts + 1] = chunk
  end

  local body = concat(parts)
  if body == "" then
    return nil, _M.fail(400, "invalid_json",
      "expected a JSON object in the request body")
  end
  local value, err = json.decode(body)
  if value == nil then
    return nil, _M.fail(400, "invalid_json", "invalid JSON body: " .. err)
  end
  if type(value) ~= "table" or json.is_array(value) then
    return nil, _M.fail(400, "invalid_json",
      "expected a JSON object in the request body")
  end
  return value
end


local function read_all(sock, max, into)
  local size = 0
  while true do
    local chunk = sock:read()
    if not chunk then
      return
    end
    if size < max then
      into[#into + 1] = ssub(chunk, 1, max - size)
    end
    size = size + #chunk
  end
end


-- Runs a helper program with an argument array (never through a shell)
-- in its own process group. Returns { status, stdout, stderr } with each
-- stream cut to max_output bytes, or nil, message, code when it cannot
-- start. After timeout seconds the whole group is killed with SIGKILL and
-- status is nil.
function _M.run(file, args, opts)
  opts = opts or {}
  local timeout = opts.timeout or 30
  local max_output = opts.max_output or 1024 * 1024

  local p, err, code = proc.spawn({
    file = file, args = args, env = HELPER_ENV, cwd = opts.cwd,
    stdin = "null", stdout = "pipe", stderr = "pipe", detached = true,
  })
  if not p then
    return nil, err, code
  end

  p.stdout:settimeout(timeout)
  p.stderr:settimeout(timeout)
  local errs, outs = {}, {}
  local stderr_done = core.waiter()
  local finished = false
  core.spawn(function()
    read_all(p.stderr, max_output, errs)
    finished = true
    stderr_done:wake()
  end)
  read_all(p.stdout, max_output, outs)
  if not finished then
    stderr_done:wait(timeout)
  end

  local status = p:wait(timeout)
  if not status then
    p:kill("SIGKILL", true)
    p:wait(5)
  end
  p.stdout:close()
  p.stderr:close()
  return { status = status, stdout = concat(outs), stderr = concat(errs) }
end


-- Returns the length of the longest prefix of s that is valid UTF-8, and
-- whether the rest is only an incomplete sequence that more bytes could
-- complete. Overlong forms and surrogates count as invalid.
function _M.utf8_prefix(s)
  if not sfind(s, "[\128-\255]") then
    return #s, false
  end

  local i, n = 1, #s
  while i <= n do
    local c = sbyte(s, i)
    local need
    local lo, hi = 0x80, 0xBF
    if c < 0x80 then
      need = 0
    elseif c >= 0xC2 and c <= 0xDF then
      need = 1
    elseif c >= 0xE0 and c <= 0xEF then
      need = 2
      if c == 0xE0 then
        lo = 0xA0
      elseif c == 0xED then
        hi = 0x9F
      end
    elseif c >= 0xF0 and c <= 0xF4 then
      need = 3
      if c == 0xF0 then
        lo = 0x90
      elseif c == 0xF4 then
        hi = 0x8F
      end
    else
      return i - 1, false
    end

    for k = 1, need do
      local b = sbyte(s, i + k)
      if not b then
        return i - 1, true
      end
      local min, max = 0x80, 0xBF
      if k == 1 then
        min, max = lo, hi
      end
      if b < min or b > max then
        return i - 1, false
      end
    end
    i = i + need + 1
  end
  return n, false
end


return _M
