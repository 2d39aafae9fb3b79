-- GET /search: finds entries by name (a shell glob, as find -name takes
-- it) and files by content (a fixed string, as grep -F takes it), under
-- a directory of the toolbox root.
--
-- find and grep run with argument arrays in their own process group.
-- find does not follow links, so the walk stays inside the root. Content
-- search skips files of SEARCH_MAX_FILE bytes or more and files grep
-- takes for binary (-I). The walk stops, and the group is killed, once
-- limit results were read or the time limit passed, and the reply then
-- sets truncated or timed_out.
local core = require("justavps.core")
local json = require("justavps.json")
local paths = require("justavps.daemon.toolbox.paths")
local util = require("justavps.daemon.toolbox.util")

local ipairs = ipairs
local tonumber = tonumber
local floor = math.floor
local tostring = tostring
local sfind = string.find
local ssub = string.sub
local smatch = string.match
local proc = core.proc

local _M = {}

_M.LIMIT = 100
_M.MAX_LIMIT = 1000
_M.TIMEOUT = 10
_M.MAX_TIMEOUT = 60
-- Files this large or larger are not searched by content.
_M.MAX_FILE = 1024 * 1024
-- Bytes of a matching line returned; longer lines are cut.
_M.MAX_LINE = 256
-- Bytes of one output line kept while looking for its end.
local MAX_BUFFER = 64 * 1024

local FIND = "/usr/bin/find"
local GREP = "/usr/bin/grep"
local MATCHES_PER_FILE = 10

local fail = util.fail


local function find_args(start, query)
  local args = { start, "-mindepth", "1" }
  if query.content then
    args[#args + 1] = "-type"
    args[#args + 1] = "f"
    args[#args + 1] = "-size"
    args[#args + 1] = "-" .. floor(_M.MAX_FILE / 1024) .. "k"
  end
  if query.name then
    args[#args + 1] = "-name"
    args[#args + 1] = query.name
  end
  if query.content then
    local grep = { "-exec", GREP, "-I", "-n", "-H", "-Z", "-s", "-F",
      "-m", tostring(MATCHES_PER_FILE), "-e", query.content, "--", "{}",
      "+" }
    for _, a in ipairs(grep) do
      args[#args + 1] = a
    end
  else
    args[#args + 1] = "-printf"
    args[#args + 1] = "%P\\0%y\\0%s\\n"
  end
  return args
end


local TYPES = { f = "file", d = "directory", l = "link" }


local function parse_name_line(line, prefix)
  local rel, kind, size = smatch(line, "^([^%z]*)%z(%a)%z(%d+)$")
  if not rel then
    return nil
  end
  return { path = prefix .. rel, type = TYPES[kind] or "other",
    size = tonumber(size) }
end


local function parse_content_line(line, root_prefix)
  local nul = sfind(line, "\0", 1, true)
  if not nul then
    return nil
  end
  local abs = ssub(line, 1, nul - 1)
  local number, text = smatch(ssub(line, nul + 1), "^(%d+):(.*)$")
  if not number then
    return nil
  end
  return { path = ssub(abs, #root_prefix + 1), line = tonumber(number),
    text = ssub(text, 1, _M.MAX_LINE) }
end


-- Reads lines from p.stdout until the stream ends, max results were
-- collected or deadline passes. Returns results, truncated, timed_out.
local function collect(p, max, deadline, parse)
  local results = json.array()
  local buffer = ""
  local skipping = false
  while true do
    core.update_time()
    local left = deadline - core.now()
    if left <= 0 then
      return results, false, true
    end
    p.stdout:settimeout(left)
    local chunk, _, code = p.stdout:read()
    if not chunk then
      return results, false, code == "timeout"
    end
    buffer = buffer .. chunk
    while true do
      local nl = sfind(buffer, "\n", 1, true)
      if not nl then
        if #buffer > MAX_BUFFER then
          -- A very long line: keep its start, drop the rest up to "\n".
          if not skipping then
            local r = parse(ssub(buffer, 1, MAX_BUFFER))
            if r then
              results[#results + 1] = r
            end
          end
          skipping = true
          buffer = ""
        end
        break
      end
      local line = ssub(buffer, 1, nl - 1)
      buffer = ssub(buffer, nl + 1)
      if not skipping then
        local r = parse(line)
        if r then
          results[#results + 1] = r
          if #results >= max then
            return results, true, false
          end
        end
      end
      skipping = false
    end
  end
end


function _M.handle(query)
  if not query.name and not query.content then
    return util.error_reply(fail(400, "invalid_request",
      "give name=GLOB, content=TEXT or both"))
  end
  if query.content == "" or query.name == "" then
    return util.error_reply(fail(400, "invalid_request",
      "name and content must not be empty"))
  end
  -- grep -F takes each line of a pattern as a pattern of its own, and
  -- an argument ends at a NUL byte.
  if query.content and (query.content:find("\n", 1, true)
      or query.content:find("\0", 1, true)) then
    return util.error_reply(fail(400, "invalid_request",
      "content must be one line of text without NUL bytes"))
  end
  local limit = tonumber(query.limit or "") or _M.LIMIT
  if limit < 1 or limit > _M.MAX_LIMIT then
    return util.error_reply(fail(400, "invalid_request",
      "limit must be from 1 to " .. _M.MAX_LIMIT))
  end
  local timeout = tonumber(query.timeout or "") or _M.TIMEOUT
  if timeout <= 0 or timeout > _M.MAX_TIMEOUT then
    return util.error_reply(fail(400, "invalid_request",
      "timeout must be more than 0 and at most " .. _M.MAX_TIMEOUT
      .. " seconds"))
  end

  local target, err = paths.get(query.path or "", true)
  if not target then
    return util.error_reply(err)
  end
  local st = core.fs.stat(target.abs)
  if not st or st.type ~= "directory" then
    return util.error_reply(fail(404, "not_found",
      "no directory at " .. target.rel))
  end

  local p, serr = proc.spawn({
    file = FIND, args = find_args(target.abs, query),
    env = { PATH = "/usr/bin:/bin", LC_ALL = "C" },
    stdin = "null", stdout = "pipe", stderr = "null", detached = true,
  })
  if not p then
    return util.error_reply(fail(500, "search_failed",
      "cannot run find: " .. tostring(serr)))
  end

  local parse
  if query.content then
    local root_prefix = (target.root == "/" and "" or target.root) .. "/"
    parse = function(line)
      return parse_content_line(line, root_prefix)
    end
  else
    local prefix = target.rel == "" and "" or target.rel .. "/"
    parse = function(line)
      return parse_name_line(line, prefix)
    end
  end

  core.update_time()
  local results, truncated, timed_out =
    collect(p, limit, core.now() + timeout, parse)
  p:kill("SIGKILL", true)
  p:wait(5)
  p.stdout:close()

  return util.json_reply(200, {
    results = results,
    truncated = truncated,
    timed_out = timed_out,
  })
end


return _M
