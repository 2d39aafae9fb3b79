-- Confinement of toolbox paths to the toolbox root.
--
-- A request names a path relative to the root. clean() rejects absolute
-- paths, ".." segments and NUL bytes. resolve() then runs
-- /usr/bin/realpath (with an argument array, no shell) to get the real
-- path of the parent directory and, when following links, of the path
-- itself. It rejects any result outside the root's own real path. So a
-- symbolic link inside the root is followed only when its target stays
-- inside, and a dangling link that points outside is rejected too.
--
-- NOTE: the check and the later file operation are separate steps, so a
-- link swapped in between them is not caught. The toolbox also runs any
-- command through /exec, so confinement protects against mistaken paths,
-- not against a caller who wants to leave the root.
local state = require("justavps.daemon.state")
local util = require("justavps.daemon.toolbox.util")

local type = type
local sfind = string.find
local ssub = string.sub
local smatch = string.match
local sgmatch = string.gmatch
local concat = table.concat

local _M = {}

local REALPATH = "/usr/bin/realpath"

local fail = util.fail


-- Maximum lengths of a file name and a path on Linux (NAME_MAX, and
-- PATH_MAX less the terminating NUL).
local NAME_MAX = 255
local PATH_MAX = 4095


local function outside(message)
  return nil, fail(403, "path_outside_root", message)
end


-- Checks a relative path from a request and returns it normalized: no
-- leading or trailing slash, no empty or "." segments, "" for the root.
-- Returns nil, err for a path that is not a string, contains NUL, is
-- absolute, has a ".." segment or is longer than Linux allows.
function _M.clean(rel)
  if type(rel) ~= "string" then
    return nil, fail(400, "invalid_path", "path must be a string")
  end
  if sfind(rel, "\0", 1, true) then
    return nil, fail(400, "invalid_path", "path contains a NUL byte")
  end
  if ssub(rel, 1, 1) == "/" then
    return outside("absolute path " .. rel .. " is not allowed; give a "
      .. "path relative to the toolbox root")
  end
  if #rel > PATH_MAX then
    return nil, fail(400, "invalid_path", "path is " .. #rel .. " bytes "
      .. "long; the limit is " .. PATH_MAX)
  end

  local segs = {}
  for seg in sgmatch(rel, "[^/]+") do
    if seg == ".." then
      return outside("path " .. rel .. " contains a .. segment")
    end
    if #seg > NAME_MAX then
      return nil, fail(400, "invalid_path", "a name in the path is " .. #seg
        .. " bytes long; the limit is " .. NAME_MAX)
    end
    if seg ~= "." then
      segs[#segs + 1] = seg
    end
  end
  return concat(segs, "/")
end


local function inside(root, path)
  if root == "/" then
    return ssub(path, 1, 1) == "/"
  end
  return path == root or ssub(path, 1, #root + 1) == root .. "/"
end


local function realpaths(args)
  local result, err = util.run(REALPATH, args, { timeout = 10 })
  if not result then
    return nil, fail(500, "internal", "cannot run " .. REALPATH .. ": "
      .. err)
  end
  if result.status ~= 0 then
    return nil, result.stderr
  end
  local out = {}
  for p in sgmatch(result.stdout, "([^%z]+)%z") do
    out[#out + 1] = p
  end
  return out
end


-- Returns the real path of the toolbox root, or nil, err.
function _M.root()
  local root = state.conf.toolbox_root
  local out, err = realpaths({ "-e", "-z", "--", root })
  if not out or not out[1] then
    if type(err) == "table" then
      return nil, err
    end
    return nil, fail(500, "root_missing", "toolbox root " .. root
      .. " does not exist or is not accessible: " .. (err or ""))
  end
  util.note_root(root)
  util.note_root(out[1])
  return out[1]
end


-- Resolves rel (a cleaned relative path) against the root. With follow,
-- the result is the real path of rel itself, so a final link is followed.
-- Without it, only the parent is resolved and the last segment is kept,
-- so that delete and move act on a link, not its target.
-- Returns { abs, rel, name, root, is_root } or nil, err.
function _M.resolve(rel, follow)
  local root, err = _M.root()
  if not root then
    return nil, err
  end
  if rel == "" then
    return { abs = root, rel = "", name = "", root = root, is_root = true }
  end

  local parent_rel, name = smatch(rel, "^(.*)/([^/]+)$")
  if not parent_rel then
    parent_rel, name = "", rel
  end
  local base = root == "/" and "" or root
  local args = { "-m", "-z", "--", base .. "/" .. parent_rel }
  if follow then
    args[#args + 1] = base .. "/" .. rel
  end

  local out, rerr = realpaths(args)
  if not out then
    if type(rerr) == "table" then
      return nil, rerr
    end
    return nil, fail(400, "invalid_path", "cannot resolve " .. rel .. ": "
      .. (rerr or ""))
  end

  local parent = out[1]
  if not parent or not inside(root, parent) then
    return outside("path " .. rel .. " leaves the toolbox root")
  end

  local abs
  if follow then
    abs = out[2]
    if not abs or not inside(root, abs) then
      return outside("path " .. rel .. " is a link whose target leaves "
        .. "the toolbox root")
    end
  else
    abs = (parent == "/" and "" or parent) .. "/" .. name
  end
  return { abs = abs, rel = rel, name = name, root = root,
    is_root = abs == root }
end


-- Cleans and resolves rel in one step.
function _M.get(rel, follow)
  local cleaned, err = _M.clean(rel)
  if not cleaned then
    return nil, err
  end
  return _M.resolve(cleaned, follow)
end


return _M
