-- The latest state of every key: one row per (universe, store kind, store, scope, key).
-- A removed key keeps its row as a tombstone (deleted = 1) so its version sequence goes on.
CREATE TABLE IF NOT EXISTS blox_entries (
    universe_id INTEGER NOT NULL,
    store_kind  INTEGER NOT NULL,
    store_name  TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    entry_key   TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    user_ids    TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,
    version_seq INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    deleted     INTEGER NOT NULL,
    PRIMARY KEY (universe_id, store_kind, store_name, scope, entry_key)
) WITHOUT ROWID;
