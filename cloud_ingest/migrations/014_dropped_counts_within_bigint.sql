-- v_completeness holds its dropped counts within bigint (views.sql).
--
-- dropped_overflow and dropped_ttl sum the counts of the edges' drop markers, which are
-- the edges' own claims: one edge's markers with counts near 2^62 made the sum pass
-- bigint, and every read of the view failed ("bigint out of range"), for every edge's
-- rows. The decoder now refuses a marker counting more records than its run of seqs;
-- the view also caps the sum, for markers stored before that. This migration changes no
-- table: views are created again only when a migration is applied, so applying it is what
-- gives a database at 013 the new form (whose @since stays 008: it reads 008's tables).
SELECT 1;
