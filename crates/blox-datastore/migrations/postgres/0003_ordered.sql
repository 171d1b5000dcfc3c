-- OrderedDataStore entries live in blox_entries (store_kind = 1) with an integer value. This
-- index serves GetSortedAsync: a leaderboard page is one index range scan, wherever it starts.
-- The CASE keeps the cast away from other stores' JSON values whatever plan is chosen.
CREATE INDEX IF NOT EXISTS blox_entries_ordered
ON blox_entries (universe_id, store_name, scope,
    (CASE WHEN store_kind = 1 THEN value::bigint END), entry_key)
WHERE store_kind = 1;
