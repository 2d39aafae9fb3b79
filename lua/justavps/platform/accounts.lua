-- The SQL of accounts, users, dashboard sessions and API keys. Handlers
-- and the "user" auth kind call these functions and never write SQL of
-- their own.
--
-- Every function returns its result or nil, message, code, where code
-- is what justavps.db.db returns (an SQLSTATE, database_unavailable,
-- timeout, not_found, ...). Secrets arrive here already hashed: no
-- function takes a session token, CSRF secret, API key or password.
-- Times leave the database as RFC 3339 text in UTC with microseconds,
-- such as 2024-05-01T12:00:00.123456Z.
local db = require("justavps.db.db")
local json = require("justavps.json")

local ipairs = ipairs
local format = string.format

local _M = {}


-- Returns the SQL expression that renders the timestamptz column as
-- RFC 3339 text in UTC. Only constant column names are passed in.
local function rfc3339_utc(column, alias)
  return format("to_char(%s AT TIME ZONE 'UTC', "
    .. "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS %s", column, alias)
end


local USER_COLUMNS = "u.id, u.account_id, u.email, u.email_verified, "
  .. "u.github_id IS NOT NULL AS github_linked, "
  .. rfc3339_utc("u.created_at", "created_at")

local ACCOUNT_COLUMNS = "a.id, a.name, "
  .. rfc3339_utc("a.created_at", "created_at")

local KEY_COLUMNS = "id, name, prefix, array_to_json(scopes)::text AS scopes, "
  .. rfc3339_utc("created_at", "created_at") .. ", "
  .. rfc3339_utc("last_used_at", "last_used_at")


-- Converts a key row's scopes from JSON text to a list.
local function decode_scopes(row)
  row.scopes = json.array(json.decode(row.scopes) or {})
  return row
end


-- Inserts a session for user_id inside transaction q (or on the pool).
-- ttl is in seconds. Returns { id, expires_at }.
local function insert_session(q, user_id, token_hash, csrf_secret_hash, ttl)
  return q:one("INSERT INTO sessions (token_hash, user_id, "
    .. "csrf_secret_hash, expires_at) VALUES ($1, $2, $3, now() + "
    .. "make_interval(secs => $4::double precision)) RETURNING id, "
    .. rfc3339_utc("expires_at", "expires_at"),
    { token_hash, user_id, csrf_secret_hash, ttl })
end


local function pool()
  return {
    one = function(_, ...)
      return db.one(...)
    end,
  }
end


-- Creates an account, its first user and a session in one transaction.
-- new: { email, password_hash, account_name, session = { token_hash,
-- csrf_secret_hash, ttl } }. Returns { user, account, session }; a taken
-- email returns code 23505 (unique_violation) and writes nothing.
function _M.sign_up(new)
  return db.tx(function(tx)
    local account, aerr, acode = tx:one("INSERT INTO accounts AS a (name) "
      .. "VALUES ($1) RETURNING " .. ACCOUNT_COLUMNS, { new.account_name })
    if not account then
      return nil, aerr, acode
    end

    local user, uerr, ucode = tx:one("INSERT INTO users AS u (account_id, "
      .. "email, password_hash) VALUES ($1, $2, $3) RETURNING "
      .. USER_COLUMNS, { account.id, new.email, new.password_hash })
    if not user then
      return nil, uerr, ucode
    end

    local s = new.session
    local session, serr, scode = insert_session(tx, user.id, s.token_hash,
      s.csrf_secret_hash, s.ttl)
    if not session then
      return nil, serr, scode
    end
    return { user = user, account = account, session = session }
  end)
end


-- Returns the user whose email matches email in any case, with
-- password_hash (pg.null for a GitHub-only user), or code not_found.
function _M.find_user_by_email(email)
  return db.one("SELECT " .. USER_COLUMNS .. ", u.password_hash FROM "
    .. "users u WHERE lower(u.email) = lower($1)", { email })
end


-- Replaces a user's password hash, as after a login that found an
-- outdated hash.
function _M.set_password_hash(user_id, password_hash)
  return db.query("UPDATE users SET password_hash = $2 WHERE id = $1",
    { user_id, password_hash })
end


-- Creates a session. Returns { id, expires_at }.
function _M.create_session(user_id, token_hash, csrf_secret_hash, ttl)
  return insert_session(pool(), user_id, token_hash, csrf_secret_hash, ttl)
end


-- Returns the unexpired session with this token hash and its user:
-- { id, csrf_secret_hash, stale, user_id, account_id, email }, where
-- stale is true when last_seen_at is more than a minute old. Code
-- not_found for none.
function _M.find_session(token_hash)
  return db.one("SELECT s.id, s.csrf_secret_hash, "
    .. "s.last_seen_at < now() - interval '1 minute' AS stale, "
    .. "u.id AS user_id, u.account_id, u.email FROM sessions s "
    .. "JOIN users u ON u.id = s.user_id "
    .. "WHERE s.token_hash = $1 AND s.expires_at > now()", { token_hash })
end


-- Sets a session's last_seen_at to now.
function _M.touch_session(session_id)
  return db.query("UPDATE sessions SET last_seen_at = now() WHERE id = $1",
    { session_id })
end


-- Deletes a session. Returns true, or false when it was gone already.
function _M.delete_session(session_id)
  local res, err, code = db.query("DELETE FROM sessions WHERE id = $1",
    { session_id })
  if not res then
    return nil, err, code
  end
  return res.affected > 0
end


-- Returns a user and their account for GET /me: { user, account }.
function _M.profile(user_id)
  local row, err, code = db.one("SELECT " .. USER_COLUMNS .. ", "
    .. "a.name AS account_name, "
    .. rfc3339_utc("a.created_at", "account_created_at")
    .. " FROM users u JOIN accounts a ON a.id = u.account_id "
    .. "WHERE u.id = $1", { user_id })
  if not row then
    return nil, err, code
  end
  local account = { id = row.account_id, name = row.account_name,
    created_at = row.account_created_at }
  row.account_name, row.account_created_at = nil, nil
  return { user = row, account = account }
end


-- Returns the API key row with this prefix: { id, account_id, hash,
-- scopes (a list), revoked, stale, user_id, email }, where stale is true
-- when last_used_at is unset or more than a minute old, and user_id and
-- email are the creator's (pg.null once that user is deleted). Code
-- not_found for none.
function _M.find_api_key(prefix)
  local row, err, code = db.one("SELECT k.id, k.account_id, k.hash, "
    .. "array_to_json(k.scopes)::text AS scopes, "
    .. "k.revoked_at IS NOT NULL AS revoked, "
    .. "(k.last_used_at IS NULL OR "
    .. "k.last_used_at < now() - interval '1 minute') AS stale, "
    .. "u.id AS user_id, u.email FROM api_keys k "
    .. "LEFT JOIN users u ON u.id = k.created_by WHERE k.prefix = $1",
    { prefix })
  if not row then
    return nil, err, code
  end
  return decode_scopes(row)
end


-- Sets a key's last_used_at to now.
function _M.touch_api_key(key_id)
  return db.query("UPDATE api_keys SET last_used_at = now() WHERE id = $1",
    { key_id })
end


-- Stores a new key. key: { account_id, created_by, name, prefix, hash,
-- scopes (a validated list) }. Returns the row as GET /api-keys lists it;
-- a prefix that exists already returns code 23505.
function _M.create_api_key(key)
  local row, err, code = db.one("INSERT INTO api_keys (account_id, "
    .. "created_by, name, prefix, hash, scopes) VALUES ($1, $2, $3, $4, "
    .. "$5, ARRAY(SELECT json_array_elements_text($6::json))) "
    .. "RETURNING " .. KEY_COLUMNS,
    { key.account_id, key.created_by or db.null, key.name, key.prefix, key.hash,
      json.encode(json.array(key.scopes)) })
  if not row then
    return nil, err, code
  end
  return decode_scopes(row)
end


-- Returns up to limit unrevoked keys of an account, newest first, after
-- the cursor position (created_at text and id of the last key of the
-- previous page, or nil for the first page).
function _M.list_api_keys(account_id, limit, after_created_at, after_id)
  local rows, err, code
  if after_created_at then
    rows, err, code = db.rows("SELECT " .. KEY_COLUMNS .. " FROM api_keys "
      .. "WHERE account_id = $1 AND revoked_at IS NULL "
      .. "AND (created_at, id) < ($2::timestamptz, $3::uuid) "
      .. "ORDER BY created_at DESC, id DESC LIMIT $4",
      { account_id, after_created_at, after_id, limit })
  else
    rows, err, code = db.rows("SELECT " .. KEY_COLUMNS .. " FROM api_keys "
      .. "WHERE account_id = $1 AND revoked_at IS NULL "
      .. "ORDER BY created_at DESC, id DESC LIMIT $2", { account_id, limit })
  end
  if not rows then
    return nil, err, code
  end
  for _, row in ipairs(rows) do
    decode_scopes(row)
  end
  return rows
end


-- Revokes the key id of account_id. Returns true, or false when the
-- account has no such unrevoked key.
function _M.revoke_api_key(account_id, key_id)
  local res, err, code = db.query("UPDATE api_keys SET revoked_at = now() "
    .. "WHERE id = $1 AND account_id = $2 AND revoked_at IS NULL",
    { key_id, account_id })
  if not res then
    return nil, err, code
  end
  return res.affected > 0
end


-- Returns the user linked to a GitHub account id, or code not_found.
function _M.find_user_by_github_id(github_id)
  return db.one("SELECT " .. USER_COLUMNS .. " FROM users u "
    .. "WHERE u.github_id = $1", { github_id })
end


-- Signs in through GitHub in one transaction, with the GitHub user id
-- and the verified addresses GitHub returned (primary first):
--   1. a user whose email matches one of emails in any case and who has
--      no GitHub link yet gets github_id. When that user's own address
--      was never verified, anyone could have signed up with it, so their
--      password and sessions are removed;
--   2. otherwise a new account and user are created with emails[1];
-- and a session is created. Returns { user, created, linked, session };
-- a user already linked to another GitHub account returns code
-- github_conflict.
function _M.github_sign_in(github_id, emails, account_name, session)
  return db.tx(function(tx)
    local created, linked = false, false
    local user, err, code
    for _, email in ipairs(emails) do
      user, err, code = tx:one("SELECT " .. USER_COLUMNS .. ", "
        .. "u.github_id FROM users u WHERE lower(u.email) = lower($1) "
        .. "FOR UPDATE", { email })
      if user then
        break
      end
      if code ~= "not_found" then
        return nil, err, code
      end
    end

    if user then
      if user.github_id ~= db.null then
        return nil, "the user with this email is linked to another "
          .. "GitHub account", "github_conflict"
      end
      if not user.email_verified then
        local _, derr, dcode = tx:query("DELETE FROM sessions "
          .. "WHERE user_id = $1", { user.id })
        if dcode then
          return nil, derr, dcode
        end
      end
      user, err, code = tx:one("UPDATE users u SET github_id = $2, "
        .. "password_hash = CASE WHEN u.email_verified THEN "
        .. "u.password_hash END, email_verified = true "
        .. "WHERE u.id = $1 RETURNING " .. USER_COLUMNS,
        { user.id, github_id })
      if not user then
        return nil, err, code
      end
      linked = true
    else
      local account, aerr, acode = tx:one("INSERT INTO accounts AS a "
        .. "(name) VALUES ($1) RETURNING a.id", { account_name })
      if not account then
        return nil, aerr, acode
      end
      user, err, code = tx:one("INSERT INTO users AS u (account_id, "
        .. "email, github_id, email_verified) VALUES ($1, $2, $3, true) "
        .. "RETURNING " .. USER_COLUMNS, { account.id, emails[1], github_id })
      if not user then
        return nil, err, code
      end
      created = true
    end

    local s, serr, scode = insert_session(tx, user.id, session.token_hash,
      session.csrf_secret_hash, session.ttl)
    if not s then
      return nil, serr, scode
    end
    return { user = user, created = created, linked = linked, session = s }
  end)
end


return _M
