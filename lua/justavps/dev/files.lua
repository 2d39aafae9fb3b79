-- File and process helpers of `justavps dev`: running a program and
-- collecting its output, private files (mode 0600), directories and
-- symlinks. System calls go through the LuaJIT FFI because the core has
-- no bindings for them.
local core = require("justavps.core")
local ffi = require("ffi")
local bit = require("bit")

local ipairs = ipairs
local pcall = pcall
local concat = table.concat
local io_open = io.open
local tonumber = tonumber
local tostring = tostring

-- Each declaration alone, because ffi.cdef rejects one that another
-- module made already.
for _, decl in ipairs({
  "unsigned int getuid(void);",
  "int chmod(const char *path, unsigned int mode);",
  "int mkdir(const char *path, unsigned int mode);",
  "int symlink(const char *target, const char *linkpath);",
  "long readlink(const char *path, char *buf, unsigned long size);",
  "char *strerror(int errnum);",
  "int open(const char *path, int flags, unsigned int mode);",
  "int flock(int fd, int operation);",
  "int close(int fd);",
}) do
  pcall(ffi.cdef, decl)
end

local C = ffi.C

local _M = {}


local function errno_message(what, path)
  return what .. " " .. path .. ": " .. ffi.string(C.strerror(ffi.errno()))
end


local function read_stream(stream, into)
  while true do
    local chunk = stream:read()
    if not chunk then
      return
    end
    into[#into + 1] = chunk
  end
end


-- Runs file with args (no shell) and waits for it. opts: stdin (a string
-- written to the program's input), timeout (seconds, default 30), env,
-- cwd. Returns { status, stdout, stderr }, or nil, message when the
-- program cannot start. After the timeout the program is killed and
-- status is nil.
function _M.run(file, args, opts)
  opts = opts or {}
  local timeout = opts.timeout or 30
  local p, err = core.proc.spawn({ file = file, args = args, env = opts.env,
    cwd = opts.cwd, stdin = opts.stdin and "pipe" or "null",
    stdout = "pipe", stderr = "pipe" })
  if not p then
    return nil, file .. ": " .. tostring(err)
  end
  if opts.stdin then
    p.stdin:write(opts.stdin)
    p.stdin:flush()
    p.stdin:close()
  end
  p.stdout:settimeout(timeout)
  p.stderr:settimeout(timeout)
  local outs, errs = {}, {}
  local done = core.waiter()
  local finished = false
  core.spawn(function()
    read_stream(p.stderr, errs)
    finished = true
    done:wake()
  end)
  read_stream(p.stdout, outs)
  if not finished then
    done:wait(timeout)
  end
  local status = p:wait(timeout)
  if status == nil then
    p:kill("SIGKILL")
    p:wait(5)
  end
  p.stdout:close()
  p.stderr:close()
  return { status = status, stdout = concat(outs), stderr = concat(errs) }
end


-- Linux values of open(2) and flock(2) flags.
local O_WRONLY, O_CREAT, O_CLOEXEC = 1, 64, 524288
local LOCK_EX, LOCK_NB = 2, 4
local EWOULDBLOCK = 11


-- Takes an exclusive lock on path, created if missing, for as long as this
-- process runs. The kernel drops the lock when the process exits, however
-- it exits. Returns true, or nil, message, code, where code "locked"
-- means another process has the lock.
function _M.lock(path)
  local fd = C.open(path, bit.bor(O_WRONLY, O_CREAT, O_CLOEXEC),
    tonumber("600", 8))
  if fd < 0 then
    return nil, errno_message("open", path)
  end
  if C.flock(fd, bit.bor(LOCK_EX, LOCK_NB)) ~= 0 then
    local errno = ffi.errno()
    C.close(fd)
    if errno == EWOULDBLOCK then
      return nil, "locked", "locked"
    end
    return nil, "flock " .. path .. ": " .. ffi.string(C.strerror(errno))
  end
  -- The descriptor stays open on purpose: closing it would drop the lock.
  return true
end


function _M.getuid()
  return tonumber(C.getuid())
end


-- Sets the permission bits of path from an octal string such as "600".
function _M.chmod(path, octal)
  if C.chmod(path, tonumber(octal, 8)) ~= 0 then
    return nil, errno_message("chmod", path)
  end
  return true
end


-- Creates path and its missing parents with mode 0755.
function _M.mkdir(path)
  local prefix = ""
  for part in path:gmatch("[^/]+") do
    prefix = (prefix == "" and path:sub(1, 1) ~= "/") and part
      or prefix .. "/" .. part
    if not _M.is_dir(prefix) and C.mkdir(prefix, tonumber("755", 8)) ~= 0
        and not _M.is_dir(prefix) then
      return nil, errno_message("mkdir", prefix)
    end
  end
  return true
end


function _M.symlink(target, path)
  if C.symlink(target, path) ~= 0 then
    return nil, errno_message("symlink", path)
  end
  return true
end


-- Returns the target of the symlink path, or nil when path is not one.
function _M.readlink(path)
  local buf = ffi.new("char[4096]")
  local n = tonumber(C.readlink(path, buf, 4096))
  if n < 0 then
    return nil
  end
  return ffi.string(buf, n)
end


function _M.exists(path)
  return core.fs.stat(path) ~= nil
end


function _M.is_dir(path)
  local st = core.fs.stat(path)
  return st ~= nil and st.type == "directory"
end


-- Returns the whole content of path, or nil when it cannot be read.
function _M.read(path)
  local f = io_open(path, "rb")
  if not f then
    return nil
  end
  local text = f:read("*a")
  f:close()
  return text
end


-- Writes text to path with mode 0600 through a temporary file and a
-- rename, so a reader sees the old content or the new, never a part.
function _M.write_private(path, text)
  local tmp = path .. ".tmp"
  local f, err = io_open(tmp, "wb")
  if not f then
    return nil, err
  end
  local ok, cerr = _M.chmod(tmp, "600")
  if not ok then
    f:close()
    return nil, cerr
  end
  f:write(text)
  f:close()
  return core.fs.rename(tmp, path)
end


return _M
