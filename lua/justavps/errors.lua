-- Stable error codes, their HTTP status, and the JSON error body every role
-- sends: {"error":{"code":"...","message":"..."}}.
local json = require("justavps.json")

local type = type
local error = error
local tostring = tostring

local _M = {}

-- code -> HTTP status. Extend with errors.register.
local status_by_code = {
  bad_request = 400,
  invalid_json = 400,
  invalid_request = 400,
  unauthorized = 401,
  bad_signature = 401,
  stale_timestamp = 401,
  replayed_nonce = 401,
  forbidden = 403,
  target_denied = 403,
  not_found = 404,
  method_not_allowed = 405,
  conflict = 409,
  too_large = 413,
  unsupported_media_type = 415,
  too_many_requests = 429,
  internal = 500,
  upstream_unreachable = 502,
  unavailable = 503,
  upstream_timeout = 504,
}

-- Messages used when a caller gives none.
local default_messages = {
  bad_request = "the request is malformed",
  unauthorized = "authentication is required",
  forbidden = "access to this resource is denied",
  not_found = "no such resource",
  method_not_allowed = "this method is not allowed on this resource",
  too_large = "the request body is too large",
  internal = "internal error",
  unavailable = "the service is temporarily unavailable",
}


-- Adds or replaces a code. Raises on a malformed code or status.
function _M.register(code, status, default_message)
  if type(code) ~= "string" or not code:match("^[a-z][a-z0-9_]*$") then
    error("errors.register: code must match [a-z][a-z0-9_]*, got "
      .. tostring(code), 2)
  end

  if type(status) ~= "number" or status < 400 or status > 599
    or status % 1 ~= 0 then
    error("errors.register: status must be an integer from 400 to 599, got "
      .. tostring(status), 2)
  end

  status_by_code[code] = status
  default_messages[code] = default_message
end


-- Returns the HTTP status for code; unknown codes map to 500 so a typo
-- never turns into a success.
function _M.status(code)
  return status_by_code[code] or 500
end


function _M.known(code)
  return status_by_code[code] ~= nil
end


-- Returns the error body as a Lua table.
function _M.body(code, message)
  if type(code) ~= "string" then
    error("errors.body: code must be a string, got " .. type(code), 2)
  end

  if message ~= nil and type(message) ~= "string" then
    error("errors.body: message must be a string, got " .. type(message), 2)
  end

  return {
    error = {
      code = code,
      message = message or default_messages[code] or code,
    },
  }
end


-- Returns status, JSON text for code and message.
function _M.response(code, message)
  local body = _M.body(code, message)
  -- Two strings always encode, so the result is never nil.
  return _M.status(code), json.encode(body)
end


return _M
