-- Accounts, the people in them, dashboard sessions and API keys.
--
-- Conventions for every table: ids that appear in the API are random UUIDs
-- (gen_random_uuid, built in since PostgreSQL 13), so they reveal nothing
-- about row counts. Times are timestamptz. Secrets are never stored: a
-- session token, CSRF secret or API key is kept as the lowercase hex
-- SHA-256 of its value, and a lookup hashes what the client sent.

-- Keeps updated_at current on every UPDATE of a table that has the column.
CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END
$$;

CREATE TABLE accounts (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER accounts_updated_at BEFORE UPDATE ON accounts
FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE users (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  -- Stored as the user typed it. Uniqueness and lookups go through
  -- lower(email), see users_email_lower below.
  email text NOT NULL
    CHECK (length(email) BETWEEN 3 AND 254 AND position('@' IN email) > 1),
  -- NULL for a user who signs in only through GitHub.
  password_hash text,
  github_id bigint UNIQUE,
  email_verified boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- One user per address whatever its case. Log-in runs
-- WHERE lower(email) = lower($1), which this index serves.
CREATE UNIQUE INDEX users_email_lower ON users (lower(email));
-- Lists the members of an account.
CREATE INDEX users_account_id ON users (account_id);

CREATE TRIGGER users_updated_at BEFORE UPDATE ON users
FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE sessions (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  -- SHA-256 of the __justavps_session cookie value; the UNIQUE index is
  -- the lookup on every dashboard request.
  token_hash text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
  user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  csrf_secret_hash text NOT NULL
    CHECK (csrf_secret_hash ~ '^[0-9a-f]{64}$'),
  expires_at timestamptz NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  last_seen_at timestamptz NOT NULL DEFAULT now(),
  CHECK (expires_at > created_at)
);

-- Log-out everywhere and listing a user's sessions.
CREATE INDEX sessions_user_id ON sessions (user_id);
-- The periodic delete of expired sessions.
CREATE INDEX sessions_expires_at ON sessions (expires_at);

CREATE TABLE api_keys (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  -- The user who created the key; the key outlives the user.
  created_by uuid REFERENCES users (id) ON DELETE SET NULL,
  name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  -- The first characters of the key after sk_live_, shown in listings and
  -- used to find the row before the hash is compared.
  prefix text NOT NULL UNIQUE CHECK (prefix ~ '^[A-Za-z0-9_-]{8,32}$'),
  hash text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
  -- At least one scope, each one of read, write, delete, exec and proxy.
  -- The containment test is false for a NULL element, so NULLs are
  -- rejected too.
  scopes text[] NOT NULL CHECK (
    cardinality(scopes) >= 1
    AND array_ndims(scopes) = 1
    AND scopes <@ ARRAY['read', 'write', 'delete', 'exec', 'proxy']
  ),
  created_at timestamptz NOT NULL DEFAULT now(),
  last_used_at timestamptz,
  revoked_at timestamptz
);

-- GET /api-keys lists an account's keys, newest first.
CREATE INDEX api_keys_account_id ON api_keys (account_id, created_at);
