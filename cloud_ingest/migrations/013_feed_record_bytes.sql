-- Read pages bounded by bytes, not only by records (broker/feed/reading.py).
--
-- A record may carry up to 1 MiB of payload (4 MiB if configured), so a page of
-- 10,000 records could hold gigabytes. A reader cuts a page once its records' bytes
-- (payload, headers and key as stored) reach a budget: PostgreSQL sums the sizes of
-- the rows as it reads them (a window over every row of the page). That window cost
-- about a quarter of a page of small records' read (1,000 records: 6.3 -> 7.9 ms,
-- measured); a page whose records cannot reach the budget does not need it.
--
-- This column says so without reading a row: an upper bound of the bytes of any one
-- of the commit's rows (the writer knows it as it encodes them). A page planned from
-- commits whose bound times its rows stays under the budget reads its rows as before;
-- NULL (commits written before this migration, or by a writer that does not say)
-- means unknown: the reader sums.
ALTER TABLE feed_commits ADD COLUMN max_record_bytes integer
    CHECK (max_record_bytes >= 0);
