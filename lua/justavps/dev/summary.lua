-- The text `justavps dev` prints once the stack is ready: where things
-- are and three commands to try first.
local format = string.format
local concat = table.concat

local _M = {}


-- Returns path relative to the working directory when it lies under it.
local function shorten(path, cwd)
  if cwd and path:sub(1, #cwd + 1) == cwd .. "/" then
    return path:sub(#cwd + 2)
  end
  return path
end


-- Returns the summary for the stack.json table out of the stack in dir.
function _M.format(out, dir)
  local cwd = os.getenv("PWD")
  local rel = shorten(dir, cwd)
  local ca = shorten(out.ca_file, cwd)
  local lines = {
    "",
    format("justavps dev is ready. Everything below is in %s/stack.json "
      .. "(mode 0600).", rel),
    "",
    format("  platform API  %s/api/v1", out.platform_url),
    format("  edge          %s  (CA certificate: %s)", out.edge_url, ca),
  }
  if out.machine then
    lines[#lines + 1] = format("  demo machine  %s  %s", out.machine.slug,
      out.machine.url)
  end
  lines[#lines + 1] = format("  API key       the api_key field of "
    .. "%s/stack.json", rel)
  lines[#lines + 1] = format("  logs          %s/", shorten(out.logs, cwd))
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Try, in another shell:"
  lines[#lines + 1] = format("  KEY=$(jq -r .api_key %s/stack.json)", rel)
  lines[#lines + 1] = format('  curl -H "Authorization: Bearer $KEY" '
    .. "%s/api/v1/machines", out.platform_url)
  if out.machine then
    lines[#lines + 1] = format('  curl --cacert %s -H "Authorization: '
      .. 'Bearer $KEY" -d \'{"cmd":"uname","args":["-a"]}\' '
      .. "%s/_toolbox/exec", ca, out.machine.url)
    lines[#lines + 1] = format('  curl -H "Authorization: Bearer $KEY" '
      .. "%s/api/v1/machines/%s/ports", out.platform_url, out.machine.slug)
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Ctrl-C stops the stack; the next start reuses it."
  lines[#lines + 1] = ""
  return concat(lines, "\n")
end


return _M
