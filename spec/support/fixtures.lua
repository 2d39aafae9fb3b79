-- Test data in spec/fixtures: published test vectors and real API payloads
-- (Stripe webhook events), kept in the repository so a clean clone runs
-- every spec without files from outside it.
local _M = {}

local function spec_dir()
  local source = debug.getinfo(1, "S").source:gsub("^@", "")
  return (source:match("^(.*)/support/[^/]*$") or "spec")
end


-- Returns the content of spec/fixtures/NAME (NAME may contain a
-- directory, such as "stripe/invoice_paid.json"). Raises when it is
-- missing.
function _M.read(name)
  local path = spec_dir() .. "/fixtures/" .. name
  local file = io.open(path, "rb")
  if not file then
    error("fixture " .. path .. " not found", 2)
  end
  local text = file:read("*a")
  file:close()
  return text
end


return _M
