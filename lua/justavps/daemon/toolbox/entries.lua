-- Directory entries for the toolbox: list, stat, mkdir, move and delete.
-- Metadata comes from find(1) -printf, run with an argument array, because
-- the core has no readdir or lstat.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local paths = require("justavps.daemon.toolbox.paths")
local util = require("justavps.daemon.toolbox.util")

local ipairs = ipairs
local tonumber = tonumber
local tostring = tostring
local sfind = string.find
local ssub = string.sub
local sort = table.sort
local fs = core.fs

local _M = {}

-- Default and maximum entries per listing page.
_M.LIST_LIMIT = 1000
_M.LIST_MAX_LIMIT = 10000
-- Bytes of find output read for one listing; a directory whose listing
-- is larger is reported with "incomplete": true.
local LIST_MAX_OUTPUT = 32 * 1024 * 1024

local FIND = "/usr/bin/find"
local MKDIR = "/bin/mkdir"
local RM = "/bin/rm"

-- Name, type letter, size, permission bits in octal, mtime and link
-- target, each ended by NUL.
local FORMAT = "%f\\0%y\\0%s\\0%m\\0%T@\\0%l\\0"
local FIELDS = 6

local TYPES = {
  f = "file", d = "directory", l = "link", p = "fifo", s = "socket",
  c = "char", b = "block",
}

local fail = util.fail


local function parse_entries(output)
  local fields = {}
  for field in output:gmatch("([^%z]*)%z") do
    fields[#fields + 1] = field
  end
  local entries = {}
  for i = 1, #fields - FIELDS + 1, FIELDS do
    local entry = {
      name = fields[i],
      type = TYPES[fields[i + 1]] or "unknown",
      size = tonumber(fields[i + 2]),
      mode = "0" .. fields[i + 3],
      mtime = tonumber(fields[i + 4]),
    }
    if fields[i + 5] ~= "" then
      entry.target = fields[i + 5]
    end
    entries[#entries + 1] = entry
  end
  return entries
end


local function not_found(rel)
  return fail(404, "not_found", "nothing at " .. (rel == "" and "/" or rel))
end


-- GET /list/PATH?cursor=NAME&limit=N: entries sorted by name (bytewise),
-- those after cursor, at most limit of them, and next_cursor when more
-- follow.
function _M.list(rel, query)
  local target, err = paths.resolve(rel, true)
  if not target then
    return util.error_reply(err)
  end
  local st = fs.stat(target.abs)
  if not st then
    return util.error_reply(not_found(rel))
  end
  if st.type ~= "directory" then
    return util.error_reply(fail(409, "not_a_directory",
      rel .. " is not a directory"))
  end

  local limit = tonumber(query.limit or "") or _M.LIST_LIMIT
  if limit < 1 or limit > _M.LIST_MAX_LIMIT then
    return util.error_reply(fail(400, "invalid_request",
      "limit must be from 1 to " .. _M.LIST_MAX_LIMIT))
  end
  local cursor = query.cursor

  local result, rerr = util.run(FIND, { target.abs, "-mindepth", "1",
    "-maxdepth", "1", "-printf", FORMAT }, { max_output = LIST_MAX_OUTPUT })
  if not result or result.status ~= 0 then
    return util.error_reply(fail(500, "list_failed", "cannot list " .. rel
      .. ": " .. (result and result.stderr or tostring(rerr))))
  end

  local all = parse_entries(result.stdout)
  sort(all, function(a, b) return a.name < b.name end)
  local page = json.array()
  local next_cursor
  for _, entry in ipairs(all) do
    if not cursor or entry.name > cursor then
      if #page == limit then
        next_cursor = page[#page].name
        break
      end
      page[#page + 1] = entry
    end
  end

  return util.json_reply(200, {
    path = rel,
    entries = page,
    next_cursor = next_cursor,
    incomplete = #result.stdout >= LIST_MAX_OUTPUT or nil,
  })
end


-- Returns the entry for an absolute path without following a final link,
-- or nil, err.
local function lstat(abs, rel)
  local result, rerr = util.run(FIND, { abs, "-maxdepth", "0",
    "-printf", FORMAT })
  if not result then
    return nil, fail(500, "stat_failed", tostring(rerr))
  end
  if result.status ~= 0 then
    if sfind(result.stderr, "No such file", 1, true) then
      return nil, not_found(rel)
    end
    return nil, fail(500, "stat_failed", "cannot stat " .. rel .. ": "
      .. result.stderr)
  end
  local entry = parse_entries(result.stdout)[1]
  if not entry then
    return nil, not_found(rel)
  end
  return entry
end


-- GET /stat/PATH: the entry itself; a link is described, not followed.
function _M.stat(rel)
  local target, err = paths.resolve(rel, false)
  if not target then
    return util.error_reply(err)
  end
  local entry, serr = lstat(target.abs, rel)
  if not entry then
    return util.error_reply(serr)
  end
  entry.path = rel
  return util.json_reply(200, entry)
end


-- POST /mkdir/PATH?parents=1: 201 when created; with parents, an existing
-- directory is 200, as mkdir -p treats it.
function _M.mkdir(rel, query)
  local target, err = paths.resolve(rel, false)
  if not target then
    return util.error_reply(err)
  end
  local parents = util.flag(query.parents)
  local st = fs.stat(target.abs)
  if st then
    if parents and st.type == "directory" then
      return util.json_reply(200, { path = rel, created = false })
    end
    return util.error_reply(fail(409, "already_exists",
      rel .. " already exists"))
  end

  local args = { "--", target.abs }
  if parents then
    args = { "-p", "--", target.abs }
  else
    local parent = ssub(target.abs, 1, #target.abs - #target.name - 1)
    if not fs.stat(parent == "" and "/" or parent) then
      return util.error_reply(fail(404, "not_found", "the parent of " .. rel
        .. " does not exist; pass parents=1 to create it"))
    end
  end
  local result, rerr = util.run(MKDIR, args)
  if not result or result.status ~= 0 then
    return util.error_reply(fail(500, "mkdir_failed", "cannot create "
      .. rel .. ": " .. (result and result.stderr or tostring(rerr))))
  end
  return util.json_reply(201, { path = rel, created = true })
end


-- POST /move {"from","to","overwrite"}: rename(2) within one file system.
-- A link is moved itself, not its target.
function _M.move(req)
  local body, err = util.read_json(req)
  if not body then
    return util.error_reply(err)
  end
  local from, ferr = paths.get(body.from, false)
  if not from then
    return util.error_reply(ferr)
  end
  local to, terr = paths.get(body.to, false)
  if not to then
    return util.error_reply(terr)
  end
  if from.is_root or to.is_root then
    return util.error_reply(fail(403, "root_protected",
      "the toolbox root cannot be moved or replaced"))
  end

  local _, lerr = lstat(from.abs, from.rel)
  if lerr then
    return util.error_reply(lerr)
  end
  if body.overwrite ~= true and lstat(to.abs, to.rel) then
    return util.error_reply(fail(409, "already_exists", to.rel
      .. " already exists; pass \"overwrite\": true to replace it"))
  end

  local ok, rerr, code = fs.rename(from.abs, to.abs)
  if not ok then
    local status = 500
    if code == "ENOENT" then
      status = 404
    elseif code == "EXDEV" or code == "ENOTEMPTY" or code == "EISDIR"
        or code == "ENOTDIR" or code == "EINVAL" or code == "EEXIST" then
      status = 409
    end
    -- The system error names absolute paths, which reveal where the
    -- root is, so the reply keeps only its reason.
    log.info("move failed", { from = from.rel, to = to.rel,
      error = tostring(rerr) })
    local reason = tostring(rerr):match("failed: (.*)$") or tostring(code)
    return util.error_reply(fail(status, "move_failed", "cannot move "
      .. from.rel .. " to " .. to.rel .. ": " .. reason))
  end
  return util.json_reply(200, { from = from.rel, to = to.rel })
end


-- DELETE /files/PATH?recursive=1: removes a file, a link (not its target)
-- or an empty directory; a directory with entries needs recursive.
function _M.delete(rel, query)
  local target, err = paths.resolve(rel, false)
  if not target then
    return util.error_reply(err)
  end
  if target.is_root then
    return util.error_reply(fail(403, "root_protected",
      "the toolbox root cannot be deleted"))
  end
  local entry, serr = lstat(target.abs, rel)
  if not entry then
    return util.error_reply(serr)
  end

  local args = { "-f", "--", target.abs }
  if entry.type == "directory" then
    if util.flag(query.recursive) then
      args = { "-r", "-f", "--", target.abs }
    else
      args = { "-d", "--", target.abs }
    end
  end
  local result, rerr = util.run(RM, args, { timeout = 600 })
  if not result then
    return util.error_reply(fail(500, "delete_failed", tostring(rerr)))
  end
  if result.status ~= 0 then
    if sfind(result.stderr, "not empty", 1, true) then
      return util.error_reply(fail(409, "directory_not_empty", rel
        .. " is a directory with entries; pass recursive=1 to delete it"))
    end
    return util.error_reply(fail(500, "delete_failed", "cannot delete "
      .. rel .. ": " .. result.stderr))
  end
  return util.json_reply(200, { path = rel, deleted = true })
end


return _M
