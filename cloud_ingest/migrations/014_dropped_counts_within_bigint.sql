-- v_completeness holds its dropped counts within bigint (views.sql, @since 014).
--
-- dropped_overflow and dropped_ttl sum the counts of the edges' drop markers, which are
-- the edges' own claims: one edge's markers with counts near 2^62 made the sum pass
-- bigint, and every read of the view failed ("bigint out of range"), for every edge's
-- rows. The decoder now refuses a marker counting more records than its run of seqs;
-- the view also caps the sum, for markers stored before that. This migration changes no
-- table: it is the version at which the view is created again.
SELECT 1;
