-- Lets PostgreSQL update an entry's row in place (a heap-only tuple, HOT) when a write
-- changes only its data, as nearly every write does: a HOT update adds no index entries, and
-- the old row version is reclaimed from its page by the next write that needs the room,
-- without waiting for VACUUM. PostgreSQL allows it only when the write changes no column any
-- index refers to, in its key, an expression or its predicate; every write changes value
-- and updated_ms, which the ordered-store index and the tombstone index referred to. Both
-- now index a stored generated column that stays NULL, and so unchanged, for every live
-- entry of a standard store. Measured with pgbench running Blox's upsert from 8 clients on
-- 1,000 keys (BENCHMARKS.md, session 14): a third less WAL per write, and after 15 s without
-- VACUUM the table held 462 dead rows in 656 kB instead of 196,571 in 4,576 kB.
-- Upgrading a database of an earlier Blox rewrites blox_entries once, under a lock that
-- holds its other servers' DataStore calls until it is done.
ALTER TABLE blox_entries
    ADD COLUMN IF NOT EXISTS sort_value BIGINT
        GENERATED ALWAYS AS (CASE WHEN store_kind = 1 THEN value::bigint END) STORED,
    ADD COLUMN IF NOT EXISTS tombstone_ms BIGINT
        GENERATED ALWAYS AS (CASE WHEN deleted THEN updated_ms END) STORED;

DROP INDEX IF EXISTS blox_entries_ordered;
DROP INDEX IF EXISTS blox_entries_tombstones;

-- GetSortedAsync: a leaderboard page is one index-only range scan, wherever it starts.
CREATE INDEX IF NOT EXISTS blox_entries_sorted
ON blox_entries (universe_id, store_name, scope, sort_value, entry_key)
WHERE store_kind = 1;

-- The purge task finds old tombstones by the time they were removed.
CREATE INDEX IF NOT EXISTS blox_entries_tombstone_age
ON blox_entries (tombstone_ms)
WHERE tombstone_ms IS NOT NULL;
