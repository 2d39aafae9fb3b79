-- The platform's data-layer base: a thin layer over core.pg, and the one
-- place the SQL helpers live. Handlers and jobs call
--
--   local db = require("justavps.db.db")
--   db.setup(config.database)            -- once, at role start
--   local row, err, code = db.one("SELECT ... WHERE slug = $1", { slug })
--   db.tx(function(tx) ... tx:query(...) ... end)
--
-- Keep SQL text constant and pass every value in params. core.pg sends
-- params apart from the text, so a value is never parsed as SQL.
--
-- Errors follow core.pg: nil, message, code where code is an SQLSTATE
-- (see db.sqlstate), database_unavailable, timeout or closed, plus
-- not_found and too_many_rows from db.one.
local core = require("justavps.core")
local json = require("justavps.json")

local pg = core.pg

local type = type
local error = error
local setmetatable = setmetatable
local format = string.format

local _M = {}

-- SQLSTATEs that callers turn into API errors or retries.
_M.sqlstate = {
  unique_violation = "23505",        -- 409 conflict
  foreign_key_violation = "23503",
  check_violation = "23514",
  not_null_violation = "23502",
  invalid_text_representation = "22P02",
  serialization_failure = "40001",   -- retry the transaction
  deadlock_detected = "40P01",       -- retry the transaction
}

-- Field declarations for a `database` record in a role's configuration,
-- in the form justavps.config takes. With the default JUSTAVPS prefix the
-- URL can be set as JUSTAVPS_DATABASE_URL.
_M.config_fields = {
  { url = { type = "string", len_min = 1,
    description = "libpq connection string or postgresql:// URI; "
      .. "default: the PG* environment variables" } },
  { pool_size = { type = "integer", default = 10, between = { 1, 1000 },
    description = "maximum connections open at once" } },
  { connect_timeout = { type = "duration", default = 10,
    between = { 0.1, 600 }, description = "time allowed for a connect" } },
  { query_timeout = { type = "duration", default = 30, between = { 0, 3600 },
    description = "default time allowed for a query; 0 for none" } },
  { pool_timeout = { type = "duration", default = 10,
    between = { 0.1, 600 },
    description = "time to wait for a free connection" } },
}


-- Queries that run on a pool or on the one connection of a transaction.
local Querier = {}
Querier.__index = Querier


-- Runs one statement. Returns core.pg's result (rows plus columns,
-- affected and command) or nil, message, code.
function Querier:query(sql, params, opts)
  if type(sql) ~= "string" then
    error("db.query: sql must be a string", 2)
  end
  return self.target:query(sql, params, opts)
end


-- Runs a query and returns its rows as a new array marked for
-- justavps.json, so an empty result encodes as [] and the array carries
-- none of the result's extra fields. nil, message, code on failure.
function Querier:rows(sql, params, opts)
  local res, err, code = self:query(sql, params, opts)
  if not res then
    return nil, err, code
  end
  local out = json.array()
  for i = 1, #res do
    out[i] = res[i]
  end
  return out
end


-- Runs a query that must return at most one row. Returns the row; or
-- nil, message, "not_found" for none; or nil, message, "too_many_rows"
-- for more than one, which is a bug in the query.
function Querier:one(sql, params, opts)
  local res, err, code = self:query(sql, params, opts)
  if not res then
    return nil, err, code
  end
  if #res == 0 then
    return nil, "no row found", "not_found"
  end
  if #res > 1 then
    return nil, format("query returned %d rows, expected one", #res),
      "too_many_rows"
  end
  return res[1]
end


function Querier.tx()
  error("db.tx: already inside a transaction", 2)
end


-- A handle on a pool: the methods of Querier plus tx, stats and close.
local Handle = setmetatable({}, { __index = Querier })
Handle.__index = Handle


-- Runs fn(tx, ...) in a transaction on one connection of the pool, where
-- tx has query, rows and one. The transaction commits when fn returns
-- normally and rolls back when fn raises (the error is raised again) or
-- returns nil, message, code (which tx returns). Otherwise returns what
-- fn returned, or nil, message, code when COMMIT fails.
function Handle:tx(fn, ...)
  if type(fn) ~= "function" then
    error("db.tx: fn must be a function", 2)
  end
  return self.target:transaction(function(conn, ...)
    local tx = setmetatable({ target = conn }, Querier)
    return fn(tx, ...)
  end, ...)
end


-- Returns { total =, idle =, waiting = } of the pool.
function Handle:stats()
  return self.target:stats()
end


function Handle:close()
  self.target:close()
end


-- Opens a pool. opts (all optional) are the fields of config_fields: url
-- (nil uses libpq's PG* environment variables), pool_size,
-- connect_timeout, query_timeout, pool_timeout. Connections open on
-- first use, so this never waits.
function _M.open(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("db.open: opts must be a table", 2)
  end
  local pool = pg.pool({
    conninfo = opts.url,
    size = opts.pool_size or 10,
    connect_timeout = opts.connect_timeout or 10,
    query_timeout = opts.query_timeout or 30,
    timeout = opts.pool_timeout or 10,
  })
  return setmetatable({ target = pool }, Handle)
end


-- The handle behind db.query, db.rows, db.one and db.tx.
local default


-- Opens the pool that the module functions use, closing an earlier one.
-- Returns the handle.
function _M.setup(opts)
  if default then
    default:close()
  end
  default = _M.open(opts)
  return default
end


-- Closes the pool of db.setup; later module calls raise until the next
-- setup.
function _M.close()
  if default then
    default:close()
    default = nil
  end
end


local function current(name)
  if not default then
    error("db." .. name .. ": call db.setup first", 3)
  end
  return default
end


function _M.query(sql, params, opts)
  return current("query"):query(sql, params, opts)
end


function _M.rows(sql, params, opts)
  return current("rows"):rows(sql, params, opts)
end


function _M.one(sql, params, opts)
  return current("one"):one(sql, params, opts)
end


function _M.tx(fn, ...)
  return current("tx"):tx(fn, ...)
end


-- Returns true when code is one of the SQLSTATEs after which running the
-- whole transaction again can succeed.
function _M.is_retryable(code)
  return code == _M.sqlstate.serialization_failure
    or code == _M.sqlstate.deadlock_detected
end


_M.null = pg.null
_M.bytea = pg.bytea

return _M
