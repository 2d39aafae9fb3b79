-- File download (with byte ranges) and upload (streamed to a temporary
-- file, synced, then renamed over the target) for the toolbox.
local core = require("justavps.core")
local log = require("justavps.log")
local paths = require("justavps.daemon.toolbox.paths")
local util = require("justavps.daemon.toolbox.util")

local tonumber = tonumber
local tostring = tostring
local floor = math.floor
local min = math.min
local odate = os.date
local oremove = os.remove
local ioopen = io.open
local sfind = string.find
local smatch = string.match
local sformat = string.format
local ssub = string.sub
local fs = core.fs
local crypto = core.crypto

local _M = {}

-- Largest upload accepted, in bytes.
-- NOTE: the daemon's public listener keeps the HTTP server's default
-- max_body (1 MiB) unless its role passes a larger limit, and that limit
-- rejects larger bodies before this one applies.
_M.MAX_UPLOAD = 1024 * 1024 * 1024

local CHUNK = 64 * 1024
local SYNC = "/bin/sync"
local CHMOD = "/bin/chmod"
local MKDIR = "/bin/mkdir"

local fail = util.fail


local function dirname(abs)
  local dir = smatch(abs, "^(.*)/[^/]*$")
  if dir == "" then
    return "/"
  end
  return dir
end


-- Parses a Range header for a file of size bytes. Returns first, last
-- (inclusive), or false when the range cannot be satisfied, or nil when
-- the header is to be ignored (malformed, or several ranges, which this
-- server does not serve) and the whole file is sent.
function _M.parse_range(header, size)
  local spec = smatch(header, "^%s*[Bb][Yy][Tt][Ee][Ss]%s*=%s*(.-)%s*$")
  if not spec or sfind(spec, ",", 1, true) then
    return nil
  end
  local a, b = smatch(spec, "^(%d*)%s*%-%s*(%d*)$")
  if not a or (a == "" and b == "") then
    return nil
  end

  if a == "" then
    local n = tonumber(b)
    if n == 0 or size == 0 then
      return false
    end
    return size - min(n, size), size - 1
  end

  local first = tonumber(a)
  local last = size - 1
  if b ~= "" then
    last = tonumber(b)
    if last < first then
      return nil
    end
  end
  if first >= size then
    return false
  end
  return first, min(last, size - 1)
end


local function validators(st)
  local etag = sformat('"%x-%x"', st.size, floor(st.mtime * 1000))
  local modified = odate("!%a, %d %b %Y %H:%M:%S GMT", floor(st.mtime))
  return etag, modified
end


-- GET /files/PATH: sends the file, or the byte range of a Range header
-- (206), honouring If-Range.
function _M.download(req, rel)
  local target, err = paths.resolve(rel, true)
  if not target then
    return util.error_reply(err)
  end
  local st = fs.stat(target.abs)
  if not st then
    return util.error_reply(fail(404, "not_found",
      "no file at " .. rel))
  end
  if st.type == "directory" then
    return util.error_reply(fail(409, "is_directory", rel
      .. " is a directory; list it with GET /_toolbox/list/" .. rel))
  end
  if st.type ~= "file" then
    return util.error_reply(fail(409, "not_a_file",
      rel .. " is a " .. st.type .. ", not a regular file"))
  end

  local size = st.size
  local etag, modified = validators(st)
  local headers = {
    ["Content-Type"] = "application/octet-stream",
    ["Accept-Ranges"] = "bytes",
    ["ETag"] = etag,
    ["Last-Modified"] = modified,
  }

  local first, last = 0, size - 1
  local status = 200
  local range = req:header("range")
  local if_range = req:header("if-range")
  if range and if_range and if_range ~= etag and if_range ~= modified then
    range = nil
  end
  if range then
    local a, b = _M.parse_range(range, size)
    if a == false then
      headers["Content-Range"] = "bytes */" .. size
      return util.json_reply(416, { error = {
        code = "range_not_satisfiable",
        message = "range " .. range .. " is outside the file's "
          .. size .. " bytes" } }, headers)
    end
    if a then
      first, last = a, b
      status = 206
      headers["Content-Range"] = sformat("bytes %d-%d/%d", a, b, size)
    end
  end

  local f, oerr = ioopen(target.abs, "rb")
  if not f then
    return util.error_reply(fail(403, "permission_denied",
      "cannot open " .. rel .. ": " .. tostring(oerr)))
  end

  headers["Content-Length"] = tostring(last - first + 1)
  req:send_head(status, headers)
  if req.method == "HEAD" then
    f:close()
    return req:finish()
  end

  -- NOTE: io reads block the event loop for the time of one 64 KiB read.
  f:seek("set", first)
  local remaining = last - first + 1
  while remaining > 0 do
    local data = f:read(min(CHUNK, remaining))
    if not data then
      -- The file shrank after the head promised Content-Length bytes, so
      -- the response can only be ended by closing the connection.
      log.warn("file shrank while it was sent", { path = rel })
      req:keepalive(false)
      break
    end
    remaining = remaining - #data
    if not req:write(data) then
      break
    end
  end
  f:close()
  return req:finish()
end


local function sync_path(path)
  local result, err = util.run(SYNC, { "--", path }, { timeout = 60 })
  if not result or result.status ~= 0 then
    log.warn("sync failed", { path = path,
      error = result and result.stderr or err })
  end
end


-- Makes sure the directory for an upload exists. Returns true or nil, err.
local function prepare_parent(dir, rel, parents)
  local st = fs.stat(dir)
  if st then
    if st.type ~= "directory" then
      return nil, fail(409, "not_a_directory",
        "the parent of " .. rel .. " is not a directory")
    end
    return true
  end
  if not parents then
    return nil, fail(404, "not_found", "the parent directory of " .. rel
      .. " does not exist; pass parents=1 to create it")
  end
  local result, err = util.run(MKDIR, { "-p", "--", dir })
  if not result or result.status ~= 0 then
    return nil, fail(500, "mkdir_failed", "cannot create the parent of "
      .. rel .. ": " .. (result and result.stderr or tostring(err)))
  end
  return true
end


-- Streams the request body into tmp. Returns size, digest or nil, err.
-- The caller removes tmp on failure.
local function receive(req, f)
  local hash = crypto.sha256_new()
  local size = 0
  while true do
    local chunk, rerr = req:read()
    if not chunk then
      if rerr then
        -- A body over the server's max_body also ends here, after the
        -- server itself has sent a 413.
        return nil, fail(400, "upload_interrupted",
          "the request body ended early: " .. tostring(rerr))
      end
      break
    end
    size = size + #chunk
    if size > _M.MAX_UPLOAD then
      return nil, fail(413, "too_large", "upload is larger than "
        .. _M.MAX_UPLOAD .. " bytes")
    end
    local ok, werr = f:write(chunk)
    if not ok then
      return nil, fail(507, "write_failed",
        "writing the upload failed: " .. tostring(werr))
    end
    hash:update(chunk)
  end
  return size, crypto.hex_encode(hash:final())
end


-- PUT /files/PATH: stores the body at PATH. The bytes go to a temporary
-- file in the same directory, which is synced and renamed over the
-- target. A reader sees the old file or the whole new one. A failed
-- upload leaves the old file untouched and no temporary file behind.
function _M.upload(req, rel, query)
  local target, err = paths.resolve(rel, true)
  if not target then
    return util.error_reply(err)
  end
  if target.is_root then
    return util.error_reply(fail(409, "is_directory",
      "cannot upload over the toolbox root"))
  end

  local length = tonumber(req:header("content-length") or "")
  if length and length > _M.MAX_UPLOAD then
    req:keepalive(false)
    return util.error_reply(fail(413, "too_large", "upload of " .. length
      .. " bytes is larger than " .. _M.MAX_UPLOAD .. " bytes"))
  end

  local dir = dirname(target.abs)
  local ok, perr = prepare_parent(dir, rel, util.flag(query.parents))
  if not ok then
    return util.error_reply(perr)
  end
  local existing = fs.stat(target.abs)
  if existing and existing.type == "directory" then
    return util.error_reply(fail(409, "is_directory",
      rel .. " is a directory"))
  end

  -- The name is cut so the temporary name stays within NAME_MAX.
  local tmp = dir .. "/." .. ssub(target.name, 1, 200) .. ".upload-"
    .. crypto.hex_encode(crypto.random_bytes(6))
  local f, oerr = ioopen(tmp, "wb")
  if not f then
    return util.error_reply(fail(403, "permission_denied",
      "cannot create a file next to " .. rel .. ": " .. tostring(oerr)))
  end

  local size, digest = receive(req, f)
  local closed, cerr = f:close()
  if size and not closed then
    size, digest = nil, fail(507, "write_failed",
      "writing the upload failed: " .. tostring(cerr))
  end
  if not size then
    oremove(tmp)
    log.warn("upload failed", { path = rel, error = digest.message })
    req:keepalive(false)
    return util.error_reply(digest)
  end

  sync_path(tmp)
  if existing then
    util.run(CHMOD, { "--reference=" .. target.abs, "--", tmp })
  end
  local renamed, rerr = fs.rename(tmp, target.abs)
  if not renamed then
    oremove(tmp)
    return util.error_reply(fail(500, "rename_failed",
      "cannot replace " .. rel .. ": " .. tostring(rerr)))
  end
  sync_path(dir)

  return util.json_reply(existing and 200 or 201, {
    path = rel, size = size, sha256 = digest,
  })
end


return _M
