-- OrderedDataStore entries live in blox_entries (store_kind = 1) with an integer value. This
-- index serves GetSortedAsync: a leaderboard page is one index range scan, wherever it starts.
CREATE INDEX IF NOT EXISTS blox_entries_ordered
ON blox_entries (universe_id, store_name, scope, CAST(value AS INTEGER), entry_key)
WHERE store_kind = 1;
