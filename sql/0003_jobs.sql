-- The provisioning job queue. Workers in any number of platform processes
-- claim jobs with FOR UPDATE SKIP LOCKED, so each job runs in one place and
-- a restart loses nothing:
--
--   UPDATE jobs SET state = 'running', attempts = attempts + 1,
--     locked_by = $1, locked_until = now() + $2::interval
--   WHERE id = (SELECT id FROM jobs
--               WHERE state = 'queued' AND run_at <= now()
--               ORDER BY run_at LIMIT 1 FOR UPDATE SKIP LOCKED)
--   RETURNING *
CREATE TABLE jobs (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  kind text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_]{0,62}$'),
  -- NULL for jobs that concern no machine.
  machine_id uuid REFERENCES machines (id) ON DELETE CASCADE,
  payload jsonb NOT NULL DEFAULT '{}',
  state text NOT NULL DEFAULT 'queued'
    CHECK (state IN ('queued', 'running', 'done', 'dead')),
  attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  run_at timestamptz NOT NULL DEFAULT now(),
  -- The worker that claimed the job, and until when the claim holds. A
  -- running job whose claim ran out belongs to a worker that died.
  locked_by text,
  locked_until timestamptz,
  last_error text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  -- At most one job of each kind per machine, so enqueueing twice (a
  -- retried request, two platform processes) is harmless with
  -- INSERT ... ON CONFLICT (machine_id, kind) DO NOTHING. A retry of a
  -- failed job moves the same row back to queued. Jobs without a machine
  -- are not limited, because NULLs are distinct in a UNIQUE constraint.
  UNIQUE (machine_id, kind),
  CHECK (state <> 'running' OR locked_until IS NOT NULL)
);

-- The claim query above: due queued jobs in run_at order.
CREATE INDEX jobs_queued_run_at ON jobs (run_at) WHERE state = 'queued';
-- Finding running jobs whose worker's claim has run out.
CREATE INDEX jobs_running_locked_until ON jobs (locked_until)
  WHERE state = 'running';

CREATE TRIGGER jobs_updated_at BEFORE UPDATE ON jobs
FOR EACH ROW EXECUTE FUNCTION set_updated_at();
