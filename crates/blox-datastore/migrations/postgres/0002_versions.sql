-- Versioning (reference §9.7). The latest version of a key stays in blox_entries; a superseded
-- version that Roblox's retention keeps moves to blox_versions, with the time it expires.
-- Roblox keeps the data a key held when the first write of a UTC hour replaces it, for 30 days
-- from then; later writes in the same hour overwrite it for good. A server that keeps every
-- version (a setting) marks its writes with keep_versions.
-- The move is a trigger, so every write path (upsert, compare-and-set) keeps versions the same
-- way, under the write's own row lock, and a write that keeps nothing costs nothing more.
ALTER TABLE blox_entries ADD COLUMN IF NOT EXISTS keep_versions BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE IF NOT EXISTS blox_versions (
    universe_id BIGINT   NOT NULL,
    store_kind  SMALLINT NOT NULL,
    store_name  TEXT COLLATE "C" NOT NULL,
    scope       TEXT COLLATE "C" NOT NULL,
    entry_key   TEXT COLLATE "C" NOT NULL,
    version_seq BIGINT   NOT NULL,
    value       TEXT     NOT NULL,
    user_ids    TEXT     NOT NULL,
    metadata    TEXT     NOT NULL,
    created_ms  BIGINT   NOT NULL,
    updated_ms  BIGINT   NOT NULL,
    deleted     BOOLEAN  NOT NULL,
    expires_ms  BIGINT   NOT NULL,
    PRIMARY KEY (universe_id, store_kind, store_name, scope, entry_key, version_seq)
);

-- The purge task finds expired versions and old tombstones by index.
CREATE INDEX IF NOT EXISTS blox_versions_expiry ON blox_versions (expires_ms);
CREATE INDEX IF NOT EXISTS blox_entries_tombstones ON blox_entries (updated_ms) WHERE deleted;

CREATE OR REPLACE FUNCTION blox_keep_superseded_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO blox_versions (universe_id, store_kind, store_name, scope, entry_key,
        version_seq, value, user_ids, metadata, created_ms, updated_ms, deleted, expires_ms)
    VALUES (OLD.universe_id, OLD.store_kind, OLD.store_name, OLD.scope, OLD.entry_key,
        OLD.version_seq, OLD.value, OLD.user_ids, OLD.metadata, OLD.created_ms, OLD.updated_ms,
        OLD.deleted, NEW.updated_ms + 2592000000)
    ON CONFLICT (universe_id, store_kind, store_name, scope, entry_key, version_seq)
    DO UPDATE SET value = excluded.value, user_ids = excluded.user_ids,
        metadata = excluded.metadata, created_ms = excluded.created_ms,
        updated_ms = excluded.updated_ms, deleted = excluded.deleted,
        expires_ms = excluded.expires_ms;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS blox_entries_keep_superseded ON blox_entries;
CREATE TRIGGER blox_entries_keep_superseded
BEFORE UPDATE ON blox_entries
FOR EACH ROW
WHEN (NEW.version_seq <> OLD.version_seq AND OLD.store_kind = 0
    AND (NEW.keep_versions OR OLD.updated_ms / 3600000 <> NEW.updated_ms / 3600000))
EXECUTE FUNCTION blox_keep_superseded_version();
