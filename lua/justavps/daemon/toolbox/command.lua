-- Validation of a command to run, shared by /exec and /processes: the
-- program, its arguments, its environment and its working directory.
local core = require("justavps.core")
local bit = require("bit")
local json = require("justavps.json")
local paths = require("justavps.daemon.toolbox.paths")
local util = require("justavps.daemon.toolbox.util")

local type = type
local pairs = pairs
local next = next
local ipairs = ipairs
local tostring = tostring
local sfind = string.find
local ssub = string.sub
local sgmatch = string.gmatch
local band = bit.band
local fs = core.fs

local _M = {}

-- PATH of a command whose request sets none.
_M.DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
  .. "/sbin:/bin"

local fail = util.fail
local EXECUTE_BITS = 73 -- 0111


local function invalid(message)
  return nil, fail(400, "invalid_request", message)
end


local function check_args(args)
  if args == nil then
    return {}
  end
  if type(args) ~= "table" or (next(args) ~= nil and #args == 0) then
    return invalid("args must be an array of strings")
  end
  local out = {}
  for i, a in ipairs(args) do
    if type(a) ~= "string" and type(a) ~= "number" then
      return invalid("args[" .. i .. "] must be a string")
    end
    a = tostring(a)
    if sfind(a, "\0", 1, true) then
      return invalid("args[" .. i .. "] contains a NUL byte")
    end
    out[i] = a
  end
  return out
end


-- The child's whole environment: PATH, HOME (the toolbox root) and LANG,
-- then the request's variables over them. Nothing else is inherited from
-- the daemon, whose environment may carry its own settings and token.
local function build_env(env, root)
  local out = { PATH = _M.DEFAULT_PATH, HOME = root, LANG = "C.UTF-8" }
  if env == nil then
    return out
  end
  if type(env) ~= "table" or json.is_array(env) and next(env) ~= nil then
    return invalid("env must be an object of names to strings")
  end
  for name, value in pairs(env) do
    if type(name) ~= "string" or name == "" or sfind(name, "[=%z]") then
      return invalid("env name " .. tostring(name) .. " is invalid: it "
        .. "must be non-empty without = or NUL")
    end
    if type(value) ~= "string" and type(value) ~= "number" then
      return invalid("env." .. name .. " must be a string")
    end
    value = tostring(value)
    if sfind(value, "\0", 1, true) then
      return invalid("env." .. name .. " contains a NUL byte")
    end
    out[name] = value
  end
  return out
end


local function executable(path)
  local st = fs.stat(path)
  return st and st.type == "file" and band(st.perm, EXECUTE_BITS) ~= 0
end


-- Returns the path of cmd: as given when it has a slash, else the first
-- executable file of that name in path_list. Returns nil when none is
-- found. A path that names no program is left for spawn to report.
local function find_program(cmd, path_list)
  if sfind(cmd, "/", 1, true) then
    return cmd
  end
  for dir in sgmatch(path_list, "[^:]+") do
    local candidate = dir .. "/" .. cmd
    if executable(candidate) then
      return candidate
    end
  end
  return nil
end


-- Validates body.cmd, args, env and cwd. Returns
-- { file, args, env, cwd, cwd_rel } with file an absolute or relative
-- path containing a slash, or nil, err.
function _M.prepare(body)
  local cmd = body.cmd
  if type(cmd) ~= "string" or cmd == "" or sfind(cmd, "\0", 1, true) then
    return invalid("cmd must be a non-empty string: the program to run")
  end
  local args, aerr = check_args(body.args)
  if not args then
    return nil, aerr
  end

  local dir, derr = paths.get(body.cwd or "", true)
  if not dir then
    return nil, derr
  end
  local st = fs.stat(dir.abs)
  if not st or st.type ~= "directory" then
    return nil, fail(400, "invalid_cwd", "cwd " .. dir.rel
      .. " is not a directory under the toolbox root")
  end

  local env, eerr = build_env(body.env, dir.root)
  if not env then
    return nil, eerr
  end

  local file = find_program(cmd, env.PATH)
  if not file then
    return nil, fail(400, "command_not_found", "no program " .. cmd
      .. " in PATH " .. env.PATH)
  end
  if ssub(file, 1, 1) ~= "/" then
    file = dir.abs .. "/" .. file
  end
  return { file = file, args = args, env = env, cwd = dir.abs,
    cwd_rel = dir.rel }
end


-- Maps a failed spawn to an error value.
function _M.spawn_error(cmd, message, code)
  if code == "ENOENT" then
    return fail(400, "command_not_found", "cannot run " .. cmd
      .. ": no such file")
  end
  if code == "EACCES" then
    return fail(403, "permission_denied", "cannot run " .. cmd
      .. ": permission denied")
  end
  return fail(500, "spawn_failed", "cannot run " .. cmd .. ": "
    .. tostring(message))
end


return _M
