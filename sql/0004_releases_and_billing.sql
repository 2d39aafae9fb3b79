-- Daemon releases offered to machines, and the Stripe side of accounts.

CREATE TABLE releases (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  -- The version the binary prints as "justavps <version>".
  version text NOT NULL UNIQUE
    CHECK (version ~ '^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.+-]+)?$'),
  url text NOT NULL CHECK (url ~ '^https?://'),
  -- Lowercase hex, the form the daemon compares against.
  sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
  -- Which machines get the release, decided by the heartbeat handler,
  -- for example {"percent": 10}.
  rollout jsonb NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(rollout) = 'object'),
  created_by uuid REFERENCES users (id) ON DELETE SET NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- The heartbeat handler reads the newest release.
CREATE INDEX releases_created_at ON releases (created_at);

CREATE TABLE billing_customers (
  account_id uuid PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
  stripe_customer_id text NOT NULL UNIQUE,
  stripe_subscription_id text UNIQUE,
  -- Stripe's subscription status as last received, such as active or
  -- past_due.
  subscription_status text,
  current_period_end timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER billing_customers_updated_at BEFORE UPDATE ON billing_customers
FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Every webhook event received. Stripe delivers an event at least once,
-- so the handler inserts with ON CONFLICT (stripe_event_id) DO NOTHING
-- and acts only when a row was inserted, in the same transaction as the
-- action.
CREATE TABLE billing_events (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  stripe_event_id text NOT NULL UNIQUE,
  type text NOT NULL,
  -- Kept when the account goes: the events are the billing audit trail.
  account_id uuid REFERENCES accounts (id) ON DELETE SET NULL,
  payload jsonb NOT NULL,
  received_at timestamptz NOT NULL DEFAULT now(),
  processed_at timestamptz,
  error text
);

-- An account's billing history.
CREATE INDEX billing_events_account_id ON billing_events (account_id, id);
