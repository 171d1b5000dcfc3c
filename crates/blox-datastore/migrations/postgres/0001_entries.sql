-- The latest state of every key: one row per (universe, store kind, store, scope, key).
-- A removed key keeps its row as a tombstone (deleted = TRUE) so its version sequence goes on.
-- Keys use the "C" collation so that listing orders them by bytes, as SQLite does.
CREATE TABLE IF NOT EXISTS blox_entries (
    universe_id BIGINT   NOT NULL,
    store_kind  SMALLINT NOT NULL,
    store_name  TEXT COLLATE "C" NOT NULL,
    scope       TEXT COLLATE "C" NOT NULL,
    entry_key   TEXT COLLATE "C" NOT NULL,
    value       TEXT     NOT NULL,
    user_ids    TEXT     NOT NULL,
    metadata    TEXT     NOT NULL,
    version_seq BIGINT   NOT NULL,
    created_ms  BIGINT   NOT NULL,
    updated_ms  BIGINT   NOT NULL,
    deleted     BOOLEAN  NOT NULL,
    PRIMARY KEY (universe_id, store_kind, store_name, scope, entry_key)
);
