-- Machines, their provisioning history, metrics and the short-lived
-- credentials that open their ports.

-- The provisioning stages, in one place for machines and machine_events.
-- server_creating and server_created are set by the platform,
-- cloud_init_running, cloud_init_done and services_ready are reported by
-- the daemon, and failed, deleting and deleted can follow any stage.
CREATE DOMAIN machine_stage AS text CHECK (VALUE IN (
  'server_creating', 'server_created', 'cloud_init_running',
  'cloud_init_done', 'services_ready', 'failed', 'deleting', 'deleted'
));

CREATE TABLE machines (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  -- The host name label {slug}.{domain}. Unique across deleted machines
  -- too, so a slug never points at a new owner's machine.
  slug text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9-]{3,40}$'),
  -- RESTRICT: a machine row contains the provider's server id, which is
  -- needed to delete the real server, so an account cannot be deleted
  -- while it has machines.
  account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE RESTRICT,
  name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  provider text NOT NULL CHECK (provider ~ '^[a-z0-9_-]{1,40}$'),
  region text NOT NULL,
  server_type text NOT NULL,
  stage machine_stage NOT NULL DEFAULT 'server_creating',
  ip inet,
  -- The platform signs calls to the daemon and verifies its heartbeats
  -- with HMAC-SHA256 keyed by this token, so it needs the token itself,
  -- not a hash.
  -- TODO: encrypt the token at rest with a key kept outside the database.
  token text NOT NULL CHECK (length(token) >= 32),
  provider_server_id text,
  provider_ssh_key_id text,
  -- Daemon version from the last heartbeat.
  version text,
  last_seen_at timestamptz,
  -- The live port catalogue from the last heartbeat, a JSON array.
  ports jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(ports) = 'array'),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  deleted_at timestamptz
);

-- GET /machines pages through an account's machines by (created_at, id),
-- the cursor being the last pair seen:
--   WHERE account_id = $1 AND (created_at, id) < ($2, $3)
--   ORDER BY created_at DESC, id DESC LIMIT $4
CREATE INDEX machines_account_created
  ON machines (account_id, created_at, id);

CREATE TRIGGER machines_updated_at BEFORE UPDATE ON machines
FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- The id is the SSE event id (Last-Event-ID). It comes from this sequence
-- in the insert trigger below instead of a column default, see there.
CREATE SEQUENCE machine_events_id_seq AS bigint;

CREATE TABLE machine_events (
  id bigint PRIMARY KEY,
  machine_id uuid NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
  stage machine_stage NOT NULL,
  detail jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
  created_at timestamptz NOT NULL DEFAULT now()
);

ALTER SEQUENCE machine_events_id_seq OWNED BY machine_events.id;

-- The history and the SSE replay: WHERE machine_id = $1 AND id > $2
-- ORDER BY id.
CREATE INDEX machine_events_machine_id ON machine_events (machine_id, id);

-- Assigns the event id and sends NOTIFY machine_events with the payload
-- {"id": <event id>, "slug": "<machine slug>", "stage": "<stage>"}.
--
-- The machine row is locked (FOR NO KEY UPDATE, until the transaction
-- ends) before the id is drawn. Two transactions adding events to one
-- machine therefore draw ids in the order they commit, and an SSE reader
-- that has seen id N never later finds a smaller id committed for that
-- machine. A column default would draw the id before any lock is taken.
--
-- NOTIFY is delivered when the inserting transaction commits and dropped
-- when it rolls back, so every writer notifies exactly for the events that
-- exist.
CREATE FUNCTION machine_events_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  machine_slug text;
BEGIN
  SELECT slug INTO machine_slug FROM machines
  WHERE id = NEW.machine_id
  FOR NO KEY UPDATE;

  NEW.id := nextval('machine_events_id_seq');

  -- An unknown machine_id fails the foreign key check after this trigger.
  IF machine_slug IS NOT NULL THEN
    PERFORM pg_notify('machine_events', jsonb_build_object(
      'id', NEW.id, 'slug', machine_slug, 'stage', NEW.stage)::text);
  END IF;

  RETURN NEW;
END
$$;

CREATE TRIGGER machine_events_before_insert BEFORE INSERT ON machine_events
FOR EACH ROW EXECUTE FUNCTION machine_events_before_insert();

CREATE TABLE machine_metrics (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  machine_id uuid NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
  at timestamptz NOT NULL DEFAULT now(),
  cpu_percent real CHECK (cpu_percent BETWEEN 0 AND 100),
  load_1 real CHECK (load_1 >= 0),
  load_5 real CHECK (load_5 >= 0),
  load_15 real CHECK (load_15 >= 0),
  mem_used_bytes bigint CHECK (mem_used_bytes >= 0),
  mem_total_bytes bigint CHECK (mem_total_bytes >= 0),
  disk_used_bytes bigint CHECK (disk_used_bytes >= 0),
  disk_total_bytes bigint CHECK (disk_total_bytes >= 0),
  -- Per-interface counters as the daemon reports them.
  net jsonb NOT NULL DEFAULT '{}'
);

-- GET /machines/{slug}/metrics reads a time range of one machine, and the
-- retention delete removes old rows per machine.
CREATE INDEX machine_metrics_machine_at ON machine_metrics (machine_id, at);

CREATE TABLE proxy_tokens (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  machine_id uuid NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
  -- A share link opens exactly one port.
  port integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
  -- SHA-256 of the token; the UNIQUE index is the edge's lookup.
  token_hash text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
  expires_at timestamptz NOT NULL,
  revoked_at timestamptz,
  created_by uuid REFERENCES users (id) ON DELETE SET NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  CHECK (expires_at > created_at)
);

-- GET /machines/{slug}/proxy-tokens lists a machine's links.
CREATE INDEX proxy_tokens_machine_id ON proxy_tokens (machine_id, created_at);

-- Single-use tickets for /_pty and /_toolbox. A ticket is spent with one
-- statement, so two requests with the same ticket cannot both succeed:
--   UPDATE machine_tickets SET used_at = now()
--   WHERE ticket_hash = $1 AND used_at IS NULL AND expires_at > now()
--   RETURNING machine_id, user_id
CREATE TABLE machine_tickets (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  machine_id uuid NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
  user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  ticket_hash text NOT NULL UNIQUE CHECK (ticket_hash ~ '^[0-9a-f]{64}$'),
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL DEFAULT now() + interval '60 seconds',
  used_at timestamptz,
  CHECK (expires_at > created_at
    AND expires_at <= created_at + interval '60 seconds')
);

-- The periodic delete of spent and expired tickets.
CREATE INDEX machine_tickets_expires_at ON machine_tickets (expires_at);
