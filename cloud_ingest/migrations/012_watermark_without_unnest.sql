-- es_watermark without unnesting the multirange (issue 12).
--
-- The ingest asks for the watermark of every key it writes, in the RETURNING of its
-- committed_ranges upsert: a fleet's group of 10,000 records asks a thousand times.
-- The old body (002) unnested the multirange in a subquery; a SQL function with a
-- subquery is never inlined, so each call ran the SQL-function executor and the
-- unnest: about a quarter of the upsert's PostgreSQL CPU (profiled), 3.5-4 µs per
-- call in a loop over 100,000 rows. The body below is one expression (inlined by the
-- planner, no executor per call), about a tenth of that:
--
--   the first seq >= 1 not accounted = lower([1, ∞) - ranges); the watermark is one below.
--
-- It is the same number for every multirange of seqs >= 1 (the only ones the edgesync
-- tables hold: seqs start at 1, the wire format refuses anything lower), and it reads
-- as docs/schema.md defines the watermark: every seq from 1 up to it is accounted.
-- (The old body said 0 for a multirange with a run from below 1 across 1; no seq
-- below 1 is ever stored.) The empty multirange and NULL give 0, as before.
CREATE OR REPLACE FUNCTION es_watermark(ranges int8multirange) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(lower('{[1,)}'::int8multirange - ranges) - 1, 0)
$$;
