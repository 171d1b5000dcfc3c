-- Versioning (reference §9.7). The latest version of a key stays in blox_entries; a superseded
-- version that Roblox's retention keeps moves to blox_versions, with the time it expires.
-- Roblox keeps the data a key held when the first write of a UTC hour replaces it, for 30 days
-- from then; later writes in the same hour overwrite it for good. A server that keeps every
-- version (a setting) marks its writes with keep_versions.
-- The move is a trigger, so every write path (upsert, compare-and-set) keeps versions the same
-- way, inside the write's own transaction, and a write that keeps nothing costs nothing more.
ALTER TABLE blox_entries ADD COLUMN keep_versions INTEGER NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS blox_versions (
    universe_id INTEGER NOT NULL,
    store_kind  INTEGER NOT NULL,
    store_name  TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    entry_key   TEXT    NOT NULL,
    version_seq INTEGER NOT NULL,
    value       TEXT    NOT NULL,
    user_ids    TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    deleted     INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    PRIMARY KEY (universe_id, store_kind, store_name, scope, entry_key, version_seq)
) WITHOUT ROWID;

-- The purge task finds expired versions and old tombstones by index.
CREATE INDEX IF NOT EXISTS blox_versions_expiry ON blox_versions (expires_ms);
CREATE INDEX IF NOT EXISTS blox_entries_tombstones ON blox_entries (updated_ms) WHERE deleted = 1;

CREATE TRIGGER IF NOT EXISTS blox_entries_keep_superseded
BEFORE UPDATE ON blox_entries
WHEN NEW.version_seq <> OLD.version_seq AND OLD.store_kind = 0
    AND (NEW.keep_versions OR OLD.updated_ms / 3600000 <> NEW.updated_ms / 3600000)
BEGIN
    INSERT OR REPLACE INTO blox_versions (universe_id, store_kind, store_name, scope, entry_key,
        version_seq, value, user_ids, metadata, created_ms, updated_ms, deleted, expires_ms)
    VALUES (OLD.universe_id, OLD.store_kind, OLD.store_name, OLD.scope, OLD.entry_key,
        OLD.version_seq, OLD.value, OLD.user_ids, OLD.metadata, OLD.created_ms, OLD.updated_ms,
        OLD.deleted, NEW.updated_ms + 2592000000);
END;
