-- The command line: `justavps ROLE [options]`.
--
-- Options are the role's declared fields (see justavps.config) written as
-- --name value or --name=value, with "_" in a field name written "-".
-- Booleans are --flag and --no-flag (or --flag=true|false). Usage errors
-- print one line starting with "justavps: " on stderr and exit with 2.
local core = require("justavps.core")
local config = require("justavps.config")
local roles = require("justavps.roles")
local units = require("justavps.units")
local log = require("justavps.log")

local type = type
local next = next
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local xpcall = xpcall
local traceback = debug.traceback
local concat = table.concat
local rep = string.rep
local sgsub = string.gsub
local smatch = string.match
local ssub = string.sub
local format = string.format
local floor = math.floor

local _M = {}

_M.EXIT_USAGE = 2
_M.EXIT_FAILURE = 1

-- Options every role accepts.
local common_options = {
  { log_level = { type = "string", default = "info",
    one_of = { "debug", "info", "warn", "error", "alert" },
    description = "lowest level of log line written" } },
}

local type_labels = {
  string = "STRING",
  integer = "INTEGER",
  number = "NUMBER",
  duration = "DURATION",
  size = "SIZE",
  array = "LIST",
}

local unit_notes = {
  duration = "seconds, or with a unit: 500ms, 30s, 5m, 1h",
  size = "bytes, or with a unit: 64k, 16M, 1G (1k = 1024)",
}


local function option_name(field_name)
  return (sgsub(field_name, "_", "-"))
end


-- Returns the role's options followed by the common ones it does not
-- declare itself, as { name = field } entries.
local function all_options(role)
  local out, seen = {}, {}
  for _, entry in ipairs(role.options) do
    local name = next(entry)
    seen[name] = true
    out[#out + 1] = entry
  end
  for _, entry in ipairs(common_options) do
    if not seen[next(entry)] then
      out[#out + 1] = entry
    end
  end
  return out
end


local function format_default(field)
  local d = field.default
  if d == nil then
    return nil
  end
  if field.type == "duration" then
    return units.format_duration(units.parse_duration(d))
  elseif field.type == "size" then
    return units.format_size(units.parse_size(d))
  elseif field.type == "array" then
    local parts = {}
    for i, v in ipairs(d) do
      parts[i] = tostring(v)
    end
    return concat(parts, ",")
  end
  return tostring(d)
end


local function limits_note(field)
  local lo = field.between and field.between[1] or field.min
  local hi = field.between and field.between[2] or field.max
  if lo and hi then
    return lo .. " to " .. hi
  elseif lo then
    return "at least " .. lo
  elseif hi then
    return "at most " .. hi
  end
  if field.one_of then
    local shown = {}
    for i, v in ipairs(field.one_of) do
      shown[i] = tostring(v)
    end
    return "one of " .. concat(shown, ", ")
  end
  return nil
end


-- Returns the help text for one role.
function _M.role_help(role)
  local lines = {
    "usage: justavps " .. role.name .. " [options]",
    "",
    role.summary or "",
    "",
    "options:",
  }

  local rows = {}
  for _, entry in ipairs(all_options(role)) do
    local name, field = next(entry)
    local flag = "--" .. option_name(name)
    if field.type == "boolean" then
      flag = "--[no-]" .. option_name(name)
    else
      flag = flag .. " " .. (type_labels[field.type] or "VALUE")
    end

    local notes = {}
    if field.unit or unit_notes[field.type] then
      notes[#notes + 1] = field.unit or unit_notes[field.type]
    end
    notes[#notes + 1] = limits_note(field)
    local default = format_default(field)
    if default ~= nil then
      notes[#notes + 1] = "default " .. default
    elseif field.required then
      notes[#notes + 1] = "required"
    end

    local text = field.description or ""
    if #notes > 0 then
      text = text .. " (" .. concat(notes, "; ") .. ")"
    end
    rows[#rows + 1] = { flag, text }
  end
  rows[#rows + 1] = { "-h, --help", "show this help and exit" }

  local width = 0
  for _, row in ipairs(rows) do
    if #row[1] > width then
      width = #row[1]
    end
  end
  for _, row in ipairs(rows) do
    lines[#lines + 1] = "  " .. row[1] .. rep(" ", width - #row[1] + 2)
      .. row[2]
  end

  return concat(lines, "\n") .. "\n"
end


-- Returns the top-level help text listing the available roles.
function _M.help()
  local lines = {
    "usage: justavps ROLE [options]",
    "       justavps ROLE --help",
    "       justavps --version",
    "",
    "roles:",
  }

  local list = roles.list()
  local width = 0
  for _, r in ipairs(list) do
    if #r.name > width then
      width = #r.name
    end
  end
  for _, r in ipairs(list) do
    lines[#lines + 1] = "  " .. r.name .. rep(" ", width - #r.name + 2)
      .. r.summary
  end

  lines[#lines + 1] = ""
  lines[#lines + 1] = "Run 'justavps ROLE --help' for the options of a role."
  return concat(lines, "\n") .. "\n"
end


local boolean_words = {
  ["true"] = true, yes = true, on = true, ["1"] = true,
  ["false"] = false, no = false, off = false, ["0"] = false,
}


-- Converts the text of one option to its field's type. Text that does not
-- convert is returned unchanged so validation reports it as given.
local function convert(field, text)
  local t = field.type
  if t == "integer" or t == "number" then
    return tonumber(text) or text
  elseif t == "boolean" then
    local b = boolean_words[text]
    if b == nil then
      return text
    end
    return b
  end
  return text
end


-- Parses args[first..] as options of role. Returns the validated options
-- table; or nil, "help"; or nil, "usage", message.
function _M.parse(role, args, first)
  local fields = {}
  local options = all_options(role)
  for _, entry in ipairs(options) do
    local name, field = next(entry)
    fields[name] = field
  end

  local raw = {}
  local i = first or 1

  while i <= #args do
    local arg = args[i]

    if arg == "--help" or arg == "-h" then
      return nil, "help"
    end

    if ssub(arg, 1, 2) ~= "--" or #arg == 2 then
      return nil, "usage", "unexpected argument '" .. arg .. "'"
    end

    local flag, value = smatch(arg, "^%-%-([^=]+)=(.*)$")
    if not flag then
      flag = ssub(arg, 3)
    end

    local key = sgsub(flag, "-", "_")
    local field = fields[key]

    if not field and value == nil and ssub(key, 1, 3) == "no_" then
      local positive = fields[ssub(key, 4)]
      if positive and positive.type == "boolean" then
        key = ssub(key, 4)
        field = positive
        value = "false"
      end
    end

    if not field then
      return nil, "usage", "unknown option --" .. flag
    end

    if field.type == "boolean" then
      value = value or "true"
    elseif value == nil then
      value = args[i + 1]
      if value == nil or ssub(value, 1, 2) == "--" then
        return nil, "usage", "option --" .. flag .. " requires a value"
      end
      i = i + 1
    end

    if field.type == "array" then
      local list = raw[key] or {}
      list[#list + 1] = convert(field.elements, value)
      raw[key] = list
    else
      raw[key] = convert(field, value)
    end

    i = i + 1
  end

  local schema = config.schema({ fields = options })
  local opts, _, _, errors = config.validate(schema, raw)
  if not opts then
    local parts = {}
    for n, e in ipairs(errors) do
      local name = smatch(e.path, "^[^.%[]+") or e.path
      parts[n] = "--" .. option_name(name) .. ": " .. e.message
    end
    return nil, "usage", concat(parts, "; ")
  end

  return opts
end


local function exit_status(v)
  if v == nil or v == true then
    return 0
  end
  if v == false then
    return _M.EXIT_FAILURE
  end
  if type(v) == "number" and v == floor(v) and v >= 0 and v <= 255 then
    return v
  end
  return _M.EXIT_FAILURE
end


local function usage_error(io, message, hint)
  io.stderr:write("justavps: " .. message .. "; " .. hint .. "\n")
  return _M.EXIT_USAGE
end


-- Runs the command line args (a list of strings). streams.stdout and
-- streams.stderr default to io.stdout and io.stderr. Returns the exit
-- status.
function _M.main(args, streams)
  local io = streams or { stdout = io.stdout, stderr = io.stderr }
  local first = args[1]

  if first == nil then
    io.stderr:write(_M.help())
    return _M.EXIT_USAGE
  end

  if first == "--help" or first == "-h" or first == "help" then
    io.stdout:write(_M.help())
    return 0
  end

  if first == "--version" then
    io.stdout:write(format("justavps %s\n", core.version))
    return 0
  end

  if ssub(first, 1, 1) == "-" then
    return usage_error(io, "unknown option " .. first,
      "run 'justavps --help' for usage")
  end

  local role = roles.get(first)
  if not role then
    return usage_error(io, "unknown role '" .. first .. "'",
      "run 'justavps --help' for the list of roles")
  end

  local opts, kind, message = _M.parse(role, args, 2)
  if kind == "help" then
    io.stdout:write(_M.role_help(role))
    return 0
  end
  if not opts then
    return usage_error(io, message, "run 'justavps " .. role.name
      .. " --help' for options")
  end

  return _M.run(role, opts)
end


-- The file name of a JUSTAVPS_JIT_* setting, with "%r" and "%p" filled in.
local function jit_file(name, role_name)
  return (name:gsub("%%([rp])", function(c)
    return c == "r" and role_name or tostring(core.proc.getpid())
  end))
end


-- Runs role with validated opts on the main thread: sets the log role and
-- level, calls role.run and maps its result to an exit status (nil or true
-- 0, false 1, an integer 0-255 itself). An error raised by run is logged
-- with its traceback and gives 1.
function _M.run(role, opts)
  core.log.set_role(role.name)
  core.log.set_level(opts.log_level or "info")

  -- JUSTAVPS_JIT_PROFILE="MODE:FILE" samples the role with LuaJIT's
  -- profiler (jit.p, MODE as in `luajit -jp=MODE`) and writes the report
  -- to FILE when the role returns. For benchmarks, not for production.
  -- In both this FILE and JUSTAVPS_JIT_VERBOSE's, "%r" is the role name
  -- and "%p" the process id.
  local profile = os.getenv("JUSTAVPS_JIT_PROFILE")
  local jit_p
  if profile and profile ~= "" then
    local mode, file = profile:match("^([^:]*):(.+)$")
    file = jit_file(file or profile, role.name)
    local found
    found, jit_p = pcall(require, "jit.p")
    if found then
      jit_p.start(mode or "", file)
    else
      jit_p = nil
      log.warn("JUSTAVPS_JIT_PROFILE set but jit.p is not installed")
    end
  end

  -- JUSTAVPS_JIT_VERBOSE=FILE logs LuaJIT's trace events (jit.v) to
  -- FILE, to find the code the JIT gives up on.
  local verbose = os.getenv("JUSTAVPS_JIT_VERBOSE")
  if verbose and verbose ~= "" then
    local found, jit_v = pcall(require, "jit.v")
    if found then
      jit_v.start(jit_file(verbose, role.name))
    else
      log.warn("JUSTAVPS_JIT_VERBOSE set but jit.v is not installed")
    end
  end

  local ok, result = xpcall(role.run, traceback, opts)
  if jit_p then
    jit_p.stop()
  end
  if not ok then
    log.alert("role failed", { role = role.name, error = result })
    log.flush()
    return _M.EXIT_FAILURE
  end

  log.flush()
  return exit_status(result)
end


return _M
