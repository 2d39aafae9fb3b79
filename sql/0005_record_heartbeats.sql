-- The write of a batch of steady-state heartbeats (no stage change, no
-- update outcome), called by lua/justavps/platform/heartbeat_batch.lua
-- with one statement per batch:
--
--   SELECT id::text AS id FROM record_heartbeats($1, ..., $12) AS id
--
-- Each parameter is an array with one element per heartbeat, in arrival
-- order. For each machine that is not deleted, the machines row takes
-- the version and ports of its last heartbeat in the batch and
-- last_seen_at = now(), and every heartbeat becomes a machine_metrics
-- row. Returns the ids of the machines updated, so the caller can tell
-- which heartbeats came from a deleted machine.
--
-- A function instead of the same statement sent as text, because
-- PL/pgSQL keeps the plan of its query for the life of the connection,
-- and force_generic_plan keeps it from planning again for each batch.
-- On PostgreSQL 15 the generic plan finds the machines by primary key,
-- where plans made for each batch's arrays scanned the whole machines
-- table of the 250-machine bench database.
CREATE FUNCTION record_heartbeats(
  batch_machine_ids uuid[], batch_versions text[], batch_ports jsonb[],
  batch_cpu_percent real[], batch_load_1 real[], batch_load_5 real[],
  batch_load_15 real[], batch_mem_used_bytes bigint[],
  batch_mem_total_bytes bigint[], batch_disk_used_bytes bigint[],
  batch_disk_total_bytes bigint[], batch_nets jsonb[])
RETURNS SETOF uuid
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
  RETURN QUERY
  WITH input AS (
    SELECT * FROM unnest(batch_machine_ids, batch_versions, batch_ports,
      batch_cpu_percent, batch_load_1, batch_load_5, batch_load_15,
      batch_mem_used_bytes, batch_mem_total_bytes, batch_disk_used_bytes,
      batch_disk_total_bytes, batch_nets) WITH ORDINALITY
      AS t(machine_id, version, ports, cpu_percent, load_1, load_5,
        load_15, mem_used_bytes, mem_total_bytes, disk_used_bytes,
        disk_total_bytes, net, n)
  ), latest AS (
    SELECT DISTINCT ON (i.machine_id) i.machine_id, i.version, i.ports
    FROM input i ORDER BY i.machine_id, i.n DESC
  ), updated AS (
    UPDATE machines m SET version = l.version, ports = l.ports,
      last_seen_at = now()
    FROM latest l WHERE m.id = l.machine_id AND m.deleted_at IS NULL
    RETURNING m.id
  ), inserted AS (
    INSERT INTO machine_metrics (machine_id, cpu_percent, load_1, load_5,
      load_15, mem_used_bytes, mem_total_bytes, disk_used_bytes,
      disk_total_bytes, net)
    SELECT i.machine_id, i.cpu_percent, i.load_1, i.load_5, i.load_15,
      i.mem_used_bytes, i.mem_total_bytes, i.disk_used_bytes,
      i.disk_total_bytes, i.net
    FROM input i JOIN updated u ON u.id = i.machine_id ORDER BY i.n
  )
  SELECT u.id FROM updated u;
END
$$;
