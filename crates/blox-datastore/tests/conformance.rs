//! The backend conformance suite: every test runs against a real SQLite file and a real
//! PostgreSQL schema, each its own fresh database.

use std::sync::Arc;

use blox_datastore::DataStoreError;
use blox_datastore::backend::{
    self, Backend, EntryKey, KeyListing, OpenOptions, ScopeRange, SortedListing, StoreKind,
    StoreListing, VersionListing, Write,
};
use blox_datastore::operations::{self, OperationError};
use blox_testkit::{Scratch, TestDatabase};

fn key(name: &str) -> EntryKey {
    EntryKey {
        universe: 1,
        kind: StoreKind::Standard,
        store: "Conformance".to_owned(),
        scope: "global".to_owned(),
        key: name.to_owned(),
    }
}

fn write(value: &str, now_ms: i64) -> Write {
    Write {
        value: value.to_owned(),
        user_ids: "[1]".to_owned(),
        metadata: r#"{"a":1}"#.to_owned(),
        deleted: false,
        now_ms,
    }
}

async fn reads_what_was_written(backend: Arc<dyn Backend>) {
    assert_eq!(backend.read(&key("k")).await.unwrap(), None);
    let first = backend.write(&key("k"), &write("1", 1_000)).await.unwrap();
    assert_eq!(
        (first.seq, first.created_ms, first.updated_ms),
        (1, 1_000, 1_000)
    );
    let entry = backend.read(&key("k")).await.unwrap().unwrap();
    assert_eq!(entry.value, "1");
    assert_eq!(entry.user_ids, "[1]");
    assert_eq!(entry.metadata, r#"{"a":1}"#);
    assert_eq!(entry.version, first);
    assert!(!entry.deleted);

    let second = backend.write(&key("k"), &write("2", 2_000)).await.unwrap();
    assert_eq!(
        (second.seq, second.created_ms, second.updated_ms),
        (2, 1_000, 2_000)
    );
    assert_eq!(backend.read(&key("k")).await.unwrap().unwrap().value, "2");
}

async fn keys_are_isolated(backend: Arc<dyn Backend>) {
    backend
        .write(&key("k"), &write("\"base\"", 1))
        .await
        .unwrap();
    let variants = [
        EntryKey {
            universe: 2,
            ..key("k")
        },
        EntryKey {
            store: "Other".to_owned(),
            ..key("k")
        },
        EntryKey {
            scope: "other".to_owned(),
            ..key("k")
        },
        key("K"),
        key("k "),
    ];
    for variant in &variants {
        assert_eq!(backend.read(variant).await.unwrap(), None, "{variant:?}");
    }
    for (index, variant) in variants.iter().enumerate() {
        backend
            .write(variant, &write(&index.to_string(), 1))
            .await
            .unwrap();
    }
    assert_eq!(
        backend.read(&key("k")).await.unwrap().unwrap().value,
        "\"base\""
    );
}

/// Reads that arrive together each get exactly their own key's row, across universes, kinds,
/// stores and scopes, for keys read twice at once, for tombstones, for keys never written
/// and for keys that need escaping, whether they share statements (PostgreSQL's batches,
/// `backend::batch`) or run side by side (SQLite's reader threads). Every read is counted.
async fn concurrent_reads_each_get_their_own_row(backend: Arc<dyn Backend>) {
    let (reads, statements) = read_concurrently(backend).await;
    assert!(
        statements <= reads,
        "{statements} statements for {reads} reads"
    );
}

/// PostgreSQL, where every statement is a round trip, batches reads that arrive together.
async fn postgres_reads_that_arrive_together_share_statements(backend: Arc<dyn Backend>) {
    let (reads, statements) = read_concurrently(backend).await;
    assert!(
        statements < reads,
        "{reads} concurrent reads never shared a statement"
    );
}

/// Reads 40 varied keys 8 times over, all at once, checks every answer and returns how many
/// reads and statements the backend counted meanwhile.
async fn read_concurrently(backend: Arc<dyn Backend>) -> (u64, u64) {
    let mut keys = Vec::new();
    for index in 0..40 {
        let name = format!("k{index}");
        keys.push(match index % 5 {
            0 => key(&name),
            1 => EntryKey {
                universe: 2,
                ..key(&name)
            },
            // An ordered store holds integers only, so never a tombstone's value.
            2 => EntryKey {
                kind: if index % 4 == 1 {
                    StoreKind::Standard
                } else {
                    StoreKind::Ordered
                },
                store: "Other \"store\"".to_owned(),
                ..key(&name)
            },
            3 => EntryKey {
                scope: "scope\u{1}\u{2}é".to_owned(),
                ..key(&name)
            },
            _ => key(&format!("{name}\\\n\t✓")),
        });
    }
    for (index, entry_key) in keys.iter().enumerate() {
        match index % 4 {
            0 => continue,
            1 => {
                backend.write(entry_key, &write("0", 1)).await.unwrap();
                backend
                    .write(entry_key, &Write::tombstone(2))
                    .await
                    .unwrap();
            }
            _ => {
                backend
                    .write(entry_key, &write(&index.to_string(), 1))
                    .await
                    .unwrap();
            }
        }
    }
    let expected = |index: usize| match index % 4 {
        0 => None,
        1 => Some(("null".to_owned(), true, 2)),
        _ => Some((index.to_string(), false, 1)),
    };
    let before = backend.read_statistics();
    let mut reads = tokio::task::JoinSet::new();
    for round in 0..8 {
        for (index, entry_key) in keys.iter().enumerate() {
            let backend = Arc::clone(&backend);
            let entry_key = entry_key.clone();
            reads.spawn(async move {
                let entry = backend.read(&entry_key).await.unwrap();
                (round, index, entry)
            });
        }
    }
    while let Some(read) = reads.join_next().await {
        let (round, index, entry) = read.unwrap();
        let got = entry.map(|entry| (entry.value, entry.deleted, entry.version.seq));
        assert_eq!(got, expected(index), "round {round}, key {:?}", keys[index]);
    }
    let after = backend.read_statistics();
    let (reads, statements) = (
        after.requests - before.requests,
        after.batches - before.batches,
    );
    assert_eq!(reads, 8 * keys.len() as u64);
    (reads, statements)
}

/// Writes that arrive together share statements (`backend::batch`); each still gets a version
/// of its own, in one sequence per key, and the key ends as the writes, replayed in version
/// order, leave it: the last write's value, and a creation time that a removal resets.
async fn writes_that_share_a_statement_each_get_their_own_version(backend: Arc<dyn Backend>) {
    const ROUNDS: i64 = 8;
    const REMOVAL_ROUND: i64 = 3;
    let keys: Vec<EntryKey> = (0..40)
        .map(|index| match index % 3 {
            0 => key(&format!("w{index}")),
            1 => EntryKey {
                scope: "other \"scope\"".to_owned(),
                ..key(&format!("w{index}"))
            },
            _ => EntryKey {
                universe: 2,
                ..key(&format!("w{index}\u{1}\\"))
            },
        })
        .collect();
    let before = backend.write_statistics();
    let mut writes = tokio::task::JoinSet::new();
    for round in 0..ROUNDS {
        for (index, entry_key) in keys.iter().enumerate() {
            let backend = Arc::clone(&backend);
            let entry_key = entry_key.clone();
            writes.spawn(async move {
                let now_ms = 1_000 + round;
                let made = if round == REMOVAL_ROUND {
                    Write::tombstone(now_ms)
                } else {
                    write(&format!("\"{index}-{round}\\n\""), now_ms)
                };
                let version = backend.write(&entry_key, &made).await.unwrap();
                (index, made, version)
            });
        }
    }
    let mut written: Vec<Vec<(i64, Write, i64)>> = vec![Vec::new(); keys.len()];
    while let Some(write) = writes.join_next().await {
        let (index, made, version) = write.unwrap();
        assert_eq!(version.updated_ms, made.now_ms);
        written[index].push((version.seq, made, version.created_ms));
    }
    for (entry_key, mut versions) in keys.iter().zip(written) {
        versions.sort_by_key(|(seq, _, _)| *seq);
        let seqs: Vec<i64> = versions.iter().map(|(seq, _, _)| *seq).collect();
        assert_eq!(seqs, (1..=ROUNDS).collect::<Vec<_>>(), "{entry_key:?}");
        let mut created = None;
        for (seq, made, created_ms) in &versions {
            let replayed = *created.get_or_insert(made.now_ms);
            assert_eq!(*created_ms, replayed, "{entry_key:?} version {seq}");
            created = (!made.deleted).then_some(replayed);
        }
        let (_, last, last_created) = versions.pop().unwrap();
        let entry = backend.read(entry_key).await.unwrap().unwrap();
        assert_eq!(
            (entry.value, entry.deleted, entry.version.seq),
            (last.value, last.deleted, ROUNDS)
        );
        assert_eq!(entry.version.created_ms, last_created);
        assert_eq!(
            (entry.user_ids, entry.metadata),
            (last.user_ids, last.metadata)
        );
    }
    let after = backend.write_statistics();
    let (requests, batches) = (
        after.requests - before.requests,
        after.batches - before.batches,
    );
    assert_eq!(requests, ROUNDS as u64 * keys.len() as u64);
    assert!(
        batches < requests,
        "{requests} concurrent writes never shared a statement"
    );
}

/// Two servers whose batches write the same keys, each in a different order, neither wait on
/// each other in a cycle (PostgreSQL would abort one as a deadlock) nor lose a write.
async fn servers_writing_the_same_keys_in_batches_never_deadlock(database: TestDatabase) {
    let scratch = Scratch::new(database, "batched_writes_across_servers");
    let servers = [
        backend::open(&scratch.url, &OpenOptions::default())
            .await
            .unwrap(),
        backend::open(&scratch.url, &OpenOptions::default())
            .await
            .unwrap(),
    ];
    let keys: Vec<EntryKey> = (0..16).map(|index| key(&format!("d{index}"))).collect();
    let mut writes = tokio::task::JoinSet::new();
    for round in 0..20 {
        for (server_index, server) in servers.iter().enumerate() {
            let mut order = keys.clone();
            if (round + server_index) % 2 == 1 {
                order.reverse();
            }
            for entry_key in order {
                let server = Arc::clone(server);
                writes.spawn(async move { server.write(&entry_key, &write("1", 1)).await });
            }
        }
    }
    let mut made = 0;
    while let Some(write) = writes.join_next().await {
        write.unwrap().expect("no batch is aborted");
        made += 1;
    }
    assert_eq!(made, 20 * 2 * keys.len());
    for entry_key in &keys {
        let entry = servers[0].read(entry_key).await.unwrap().unwrap();
        assert_eq!(entry.version.seq, 40, "{entry_key:?}");
    }
}

async fn compare_and_set_detects_conflicts(backend: Arc<dyn Backend>) {
    let created = backend
        .write_if(&key("k"), None, 10, &write("1", 10))
        .await
        .unwrap()
        .expect("an absent key can be created");
    assert_eq!(created.seq, 1);
    assert_eq!(
        backend
            .write_if(&key("k"), None, 20, &write("2", 20))
            .await
            .unwrap(),
        None,
        "creating an existing key is a conflict"
    );
    let next = backend
        .write_if(&key("k"), Some(&created), 10, &write("3", 30))
        .await
        .unwrap()
        .expect("the current version can be replaced");
    assert_eq!((next.seq, next.created_ms, next.updated_ms), (2, 10, 30));
    assert_eq!(
        backend
            .write_if(&key("k"), Some(&created), 10, &write("4", 40))
            .await
            .unwrap(),
        None,
        "a stale version is a conflict"
    );
    assert_eq!(backend.read(&key("k")).await.unwrap().unwrap().value, "3");
}

async fn tombstones_keep_the_sequence(backend: Arc<dyn Backend>) {
    backend.write(&key("k"), &write("1", 1_000)).await.unwrap();
    let (value, before) = operations::remove(backend.as_ref(), &key("k"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(value, blox_datastore::codec::Stored::Number(1.0));
    assert_eq!(before.version.seq, 1);
    let tombstone = backend.read(&key("k")).await.unwrap().unwrap();
    assert!(tombstone.deleted);
    assert_eq!(tombstone.version.seq, 2);
    assert!(
        operations::get(backend.as_ref(), &key("k"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        operations::remove(backend.as_ref(), &key("k"))
            .await
            .unwrap()
            .is_none()
    );

    let revived = backend.write(&key("k"), &write("5", 9_000)).await.unwrap();
    assert_eq!(revived.seq, 3, "the sequence goes on after a removal");
    assert_eq!(
        revived.created_ms, 9_000,
        "a key written after removal is a new object"
    );
}

async fn increments_are_atomic(backend: Arc<dyn Backend>) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let backend = Arc::clone(&backend);
            tokio::spawn(async move {
                for _ in 0..25 {
                    operations::increment(backend.as_ref(), &key("n"), 1, "[]".into(), "{}".into())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let entry = backend.read(&key("n")).await.unwrap().unwrap();
    assert_eq!(entry.value, "200");
    assert_eq!(entry.version.seq, 200);
}

async fn increment_rejects_non_integers_and_writes_nothing(backend: Arc<dyn Backend>) {
    for stored in ["\"text\"", "1.5", "[1]", "true"] {
        backend.write(&key("v"), &write(stored, 1)).await.unwrap();
        let result =
            operations::increment(backend.as_ref(), &key("v"), 1, "[]".into(), "{}".into()).await;
        assert!(
            matches!(
                result,
                Err(OperationError::Rejected(DataStoreError::NotNumeric))
            ),
            "{stored}: {result:?}"
        );
        assert_eq!(
            backend.read(&key("v")).await.unwrap().unwrap().value,
            stored
        );
    }
}

async fn large_values_round_trip(backend: Arc<dyn Backend>) {
    let big = format!("\"{}\"", "é".repeat(2_000_000));
    backend.write(&key("big"), &write(&big, 1)).await.unwrap();
    assert_eq!(backend.read(&key("big")).await.unwrap().unwrap().value, big);
}

async fn lists_keys_in_byte_order_with_keyset_pages(backend: Arc<dyn Backend>) {
    for name in ["b", "a", "ab", "é", "B", "a\u{1}\u{1}"] {
        backend.write(&key(name), &write("1", 1)).await.unwrap();
    }
    backend
        .write(
            &EntryKey {
                scope: "other".to_owned(),
                ..key("a")
            },
            &write("1", 1),
        )
        .await
        .unwrap();
    let listing = |after: (&str, &str), limit| KeyListing {
        universe: 1,
        kind: StoreKind::Standard,
        store: "Conformance".to_owned(),
        scopes: ScopeRange::Exactly("global".to_owned()),
        key_from: String::new(),
        key_to: None,
        after: (after.0.to_owned(), after.1.to_owned()),
        exclude_deleted: false,
        limit,
    };
    let keys = |rows: Vec<(String, String)>| rows.into_iter().map(|(_, k)| k).collect::<Vec<_>>();
    let first = backend.list_keys(&listing(("", ""), 3)).await.unwrap();
    assert_eq!(keys(first), ["B", "a", "a\u{1}\u{1}"]);
    let rest = backend
        .list_keys(&listing(("global", "a\u{1}\u{1}"), 10))
        .await
        .unwrap();
    assert_eq!(keys(rest), ["ab", "b", "é"]);

    let mut prefixed = listing(("", ""), 10);
    prefixed.key_from = "a".to_owned();
    prefixed.key_to = backend::prefix_end("a");
    assert_eq!(
        keys(backend.list_keys(&prefixed).await.unwrap()),
        ["a", "a\u{1}\u{1}", "ab"]
    );

    operations::remove(backend.as_ref(), &key("b"))
        .await
        .unwrap();
    let mut live = listing(("", ""), 10);
    live.exclude_deleted = true;
    assert_eq!(
        keys(backend.list_keys(&live).await.unwrap()),
        ["B", "a", "a\u{1}\u{1}", "ab", "é"]
    );
}

async fn lists_stores_holding_live_keys(backend: Arc<dyn Backend>) {
    for (store, at) in [("b", 5), ("a", 1), ("a", 9), ("c", 3), ("", 1)] {
        let entry = EntryKey {
            store: store.to_owned(),
            key: format!("k{at}"),
            ..key("k")
        };
        backend.write(&entry, &write("1", at)).await.unwrap();
    }
    let removed = EntryKey {
        store: "c".to_owned(),
        key: "k3".to_owned(),
        ..key("k")
    };
    operations::remove(backend.as_ref(), &removed)
        .await
        .unwrap();
    let listing = |after: &str, limit| StoreListing {
        universe: 1,
        kind: StoreKind::Standard,
        name_from: String::new(),
        name_to: None,
        after: after.to_owned(),
        limit,
    };
    let stores = backend.list_stores(&listing("", 10)).await.unwrap();
    let summary: Vec<_> = stores
        .iter()
        .map(|s| (s.name.as_str(), s.created_ms, s.updated_ms))
        .collect();
    assert_eq!(
        summary,
        [("a", 1, 9), ("b", 5, 5)],
        "only stores with a live key"
    );
    let after_a = backend.list_stores(&listing("a", 10)).await.unwrap();
    assert_eq!(after_a.len(), 1);
    assert_eq!(after_a[0].name, "b");
}

const HOUR: i64 = 3_600_000;

fn versions(descending: bool, after_seq: Option<i64>, limit: i64) -> VersionListing {
    VersionListing {
        key: key("v"),
        descending,
        min_ms: 0,
        max_ms: i64::MAX,
        after_seq,
        limit,
    }
}

async fn listed(backend: &dyn Backend, listing: &VersionListing) -> Vec<(i64, bool)> {
    backend
        .list_versions(listing)
        .await
        .unwrap()
        .iter()
        .map(|summary| (summary.version.seq, summary.deleted))
        .collect()
}

/// Roblox's retention: the first write of a UTC hour keeps what it replaces; later writes in
/// the same hour overwrite for good; the latest version is always there.
async fn keeps_the_version_each_new_hour_replaces(backend: Arc<dyn Backend>) {
    let k = key("v");
    for (value, at) in [
        ("1", 10 * HOUR + 5),
        ("2", 10 * HOUR + 10),
        ("3", 10 * HOUR + 20),
        ("4", 11 * HOUR + 1),
        ("5", 11 * HOUR + 2),
        ("6", 13 * HOUR),
    ] {
        backend.write(&k, &write(value, at)).await.unwrap();
    }
    assert_eq!(
        listed(backend.as_ref(), &versions(false, None, 100)).await,
        [(3, false), (5, false), (6, false)],
        "seq 3 ended hour 10, seq 5 ended hour 11, seq 6 is the latest"
    );
    let third = backend.read_version(&k, 3).await.unwrap().unwrap();
    assert_eq!(
        (third.value.as_str(), third.version.updated_ms),
        ("3", 10 * HOUR + 20)
    );
    assert_eq!(third.user_ids, "[1]");
    assert_eq!(
        backend.read_version(&k, 2).await.unwrap(),
        None,
        "overwritten in its hour"
    );
    assert_eq!(
        backend.read_version(&k, 6).await.unwrap().unwrap().value,
        "6"
    );

    let at = |ms| {
        let backend = Arc::clone(&backend);
        let k = k.clone();
        async move {
            backend
                .read_version_at(&k, ms)
                .await
                .unwrap()
                .map(|entry| entry.value)
        }
    };
    assert_eq!(at(10 * HOUR).await, None, "nothing kept from before");
    assert_eq!(
        at(11 * HOUR).await.as_deref(),
        Some("3"),
        "the state as hour 11 began"
    );
    assert_eq!(at(12 * HOUR).await.as_deref(), Some("5"));
    assert_eq!(at(13 * HOUR).await.as_deref(), Some("6"));

    backend.remove_version(&k, 5).await.unwrap();
    assert_eq!(
        listed(backend.as_ref(), &versions(false, None, 100)).await,
        [(3, false), (6, false)]
    );
}

async fn lists_versions_in_pages_both_ways(backend: Arc<dyn Backend>) {
    let k = key("v");
    for hour in 1..=5 {
        backend.write(&k, &write("1", hour * HOUR)).await.unwrap();
    }
    let tombstone = Write::tombstone(6 * HOUR);
    let latest = backend.read(&k).await.unwrap().unwrap().version;
    backend
        .write_if(&k, Some(&latest), 6 * HOUR, &tombstone)
        .await
        .unwrap()
        .unwrap();
    let b = backend.as_ref();
    assert_eq!(
        listed(b, &versions(false, None, 4)).await,
        [(1, false), (2, false), (3, false), (4, false)]
    );
    assert_eq!(
        listed(b, &versions(false, Some(4), 4)).await,
        [(5, false), (6, true)],
        "the removal shows as a deleted version"
    );
    assert_eq!(
        listed(b, &versions(true, None, 2)).await,
        [(6, true), (5, false)]
    );
    assert_eq!(
        listed(b, &versions(true, Some(5), 10)).await,
        [(4, false), (3, false), (2, false), (1, false)]
    );
    let window = VersionListing {
        min_ms: 2 * HOUR,
        max_ms: 4 * HOUR,
        ..versions(false, None, 10)
    };
    assert_eq!(
        listed(b, &window).await,
        [(2, false), (3, false), (4, false)]
    );
    assert!(listed(b, &versions(false, Some(6), 10)).await.is_empty());
}

async fn removing_the_latest_version_leaves_a_tombstone(backend: Arc<dyn Backend>) {
    let k = key("v");
    backend.write(&k, &write("1", HOUR)).await.unwrap();
    backend.write(&k, &write("2", 2 * HOUR)).await.unwrap();
    backend.remove_version(&k, 2).await.unwrap();
    let latest = backend.read(&k).await.unwrap().unwrap();
    assert!(latest.deleted);
    assert_eq!(latest.version.seq, 2);
    assert_eq!(
        backend.read_version(&k, 1).await.unwrap().unwrap().value,
        "1"
    );
    let next = backend.write(&k, &write("3", 3 * HOUR)).await.unwrap();
    assert_eq!(next.seq, 3, "the sequence goes on");
}

async fn purges_expired_versions_and_old_tombstones(backend: Arc<dyn Backend>) {
    let day = 24 * HOUR;
    let kept = key("kept");
    let removed = key("removed");
    backend.write(&kept, &write("1", day)).await.unwrap();
    backend.write(&kept, &write("2", 2 * day)).await.unwrap();
    backend.write(&removed, &write("1", day)).await.unwrap();
    let live = backend.read(&removed).await.unwrap().unwrap().version;
    backend
        .write_if(&removed, Some(&live), 2 * day, &Write::tombstone(2 * day))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        backend.purge(31 * day).await.unwrap(),
        0,
        "nothing is 30 days old yet"
    );
    assert!(backend.read_version(&kept, 1).await.unwrap().is_some());

    let purged = backend.purge(32 * day + 1).await.unwrap();
    assert_eq!(purged, 3, "two superseded versions and one tombstone");
    assert_eq!(backend.read_version(&kept, 1).await.unwrap(), None);
    assert_eq!(
        backend.read(&kept).await.unwrap().unwrap().value,
        "2",
        "latest stays"
    );
    assert_eq!(backend.read(&removed).await.unwrap(), None);
}

fn ordered(store: &str, scope: &str, name: &str) -> EntryKey {
    EntryKey {
        kind: StoreKind::Ordered,
        store: store.to_owned(),
        scope: scope.to_owned(),
        ..key(name)
    }
}

fn sorted(descending: bool, after: Option<(i64, &str)>, limit: i64) -> SortedListing {
    SortedListing {
        universe: 1,
        store: "Board".to_owned(),
        scope: "global".to_owned(),
        descending,
        min_value: i64::MIN,
        max_value: i64::MAX,
        after: after.map(|(value, key)| (value, key.to_owned())),
        limit,
    }
}

async fn lists_ordered_entries_by_value_then_key(backend: Arc<dyn Backend>) {
    for (name, value) in [
        ("c", 5),
        ("a", 5),
        ("b", -3),
        ("d", 40),
        ("e", 9_007_199_254_740_992_i64),
    ] {
        let entry = ordered("Board", "global", name);
        backend
            .write(&entry, &write(&value.to_string(), 1))
            .await
            .unwrap();
    }
    // Neighbours that must not show: another scope, another store, a standard store.
    backend
        .write(&ordered("Board", "weekly", "x"), &write("7", 1))
        .await
        .unwrap();
    backend
        .write(&ordered("Other", "global", "y"), &write("7", 1))
        .await
        .unwrap();
    let standard = EntryKey {
        store: "Board".to_owned(),
        ..key("z")
    };
    backend.write(&standard, &write("7", 1)).await.unwrap();

    let b = backend.as_ref();
    let page = |listing: SortedListing| async move { b.list_sorted(&listing).await.unwrap() };
    let names = |rows: Vec<(String, i64)>| {
        rows.into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    assert_eq!(
        names(page(sorted(false, None, 10)).await),
        "b=-3,a=5,c=5,d=40,e=9007199254740992"
    );
    assert_eq!(names(page(sorted(false, None, 2)).await), "b=-3,a=5");
    assert_eq!(
        names(page(sorted(false, Some((5, "a")), 2)).await),
        "c=5,d=40"
    );
    assert_eq!(
        names(page(sorted(true, None, 3)).await),
        "e=9007199254740992,d=40,c=5"
    );
    assert_eq!(
        names(page(sorted(true, Some((5, "c")), 10)).await),
        "a=5,b=-3"
    );
    let bounded = SortedListing {
        min_value: 5,
        max_value: 40,
        ..sorted(true, None, 10)
    };
    assert_eq!(names(page(bounded).await), "d=40,c=5,a=5");

    let gone = backend
        .delete(&ordered("Board", "global", "d"))
        .await
        .unwrap();
    assert_eq!(gone.map(|entry| entry.value).as_deref(), Some("40"));
    assert_eq!(
        backend
            .delete(&ordered("Board", "global", "d"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        backend
            .read(&ordered("Board", "global", "d"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        names(page(sorted(true, None, 2)).await),
        "e=9007199254740992,c=5"
    );
}

async fn ordered_writes_keep_no_versions(backend: Arc<dyn Backend>) {
    let entry = ordered("Board", "global", "k");
    backend.write(&entry, &write("1", HOUR)).await.unwrap();
    backend.write(&entry, &write("2", 2 * HOUR)).await.unwrap();
    let listing = VersionListing {
        key: entry.clone(),
        ..versions(false, None, 10)
    };
    let seqs: Vec<i64> = backend
        .list_versions(&listing)
        .await
        .unwrap()
        .iter()
        .map(|summary| summary.version.seq)
        .collect();
    assert_eq!(seqs, [2], "only the current value");
}

async fn keeps_every_version_when_asked(database: TestDatabase) {
    let scratch = Scratch::new(database, "keep_all_versions");
    let options = OpenOptions {
        keep_all_versions: true,
        ..OpenOptions::default()
    };
    let backend = backend::open(&scratch.url, &options).await.unwrap();
    let k = key("v");
    for n in 1..=4 {
        backend
            .write(&k, &write(&n.to_string(), HOUR + n))
            .await
            .unwrap();
    }
    let latest = backend.read(&k).await.unwrap().unwrap().version;
    backend
        .write_if(&k, Some(&latest), 0, &write("5", HOUR + 5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        listed(backend.as_ref(), &versions(false, None, 100)).await,
        [(1, false), (2, false), (3, false), (4, false), (5, false)]
    );
    assert_eq!(
        backend.read_version(&k, 2).await.unwrap().unwrap().value,
        "2"
    );
}

async fn migrations_apply_once(database: TestDatabase) {
    let scratch = Scratch::new(database, "migrations");
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = scratch.url.clone();
            tokio::spawn(async move { backend::open(&url, &OpenOptions::default()).await })
        })
        .collect();
    for open in opens {
        let backend = open.await.unwrap().expect("concurrent opens all succeed");
        backend.write(&key("k"), &write("1", 1)).await.unwrap();
    }
}

async fn run<F, Fut>(database: TestDatabase, name: &str, test: F)
where
    F: FnOnce(Arc<dyn Backend>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let scratch = Scratch::new(database, name);
    let backend = backend::open(&scratch.url, &OpenOptions::default())
        .await
        .expect("database opens");
    test(backend).await;
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::TestDatabase::Sqlite, stringify!($name), super::$name).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn migrations_apply_once() {
                super::migrations_apply_once(super::TestDatabase::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn keeps_every_version_when_asked() {
                super::keeps_every_version_when_asked(super::TestDatabase::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn servers_writing_the_same_keys_in_batches_never_deadlock() {
                super::servers_writing_the_same_keys_in_batches_never_deadlock(
                    super::TestDatabase::Sqlite,
                )
                .await;
            }
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::TestDatabase::Postgres, stringify!($name), super::$name).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn migrations_apply_once() {
                super::migrations_apply_once(super::TestDatabase::Postgres).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn keeps_every_version_when_asked() {
                super::keeps_every_version_when_asked(super::TestDatabase::Postgres).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reads_that_arrive_together_share_statements() {
                super::run(
                    super::TestDatabase::Postgres,
                    "reads_that_arrive_together_share_statements",
                    super::postgres_reads_that_arrive_together_share_statements,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn servers_writing_the_same_keys_in_batches_never_deadlock() {
                super::servers_writing_the_same_keys_in_batches_never_deadlock(
                    super::TestDatabase::Postgres,
                )
                .await;
            }
        }
    };
}

conformance!(
    reads_what_was_written,
    concurrent_reads_each_get_their_own_row,
    writes_that_share_a_statement_each_get_their_own_version,
    keys_are_isolated,
    compare_and_set_detects_conflicts,
    tombstones_keep_the_sequence,
    increments_are_atomic,
    increment_rejects_non_integers_and_writes_nothing,
    large_values_round_trip,
    lists_keys_in_byte_order_with_keyset_pages,
    lists_stores_holding_live_keys,
    keeps_the_version_each_new_hour_replaces,
    lists_versions_in_pages_both_ways,
    removing_the_latest_version_leaves_a_tombstone,
    purges_expired_versions_and_old_tombstones,
    lists_ordered_entries_by_value_then_key,
    ordered_writes_keep_no_versions,
);

/// A server restart or failover breaks every pooled PostgreSQL connection. Blox pings only a
/// connection that sat idle for over a second before handing it out, so the requests that
/// come after such a break still find working connections instead of failing one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_requests_after_the_server_dropped_every_connection_succeed() {
    let scratch = Scratch::new(TestDatabase::Postgres, "dropped_connections");
    let application = format!("blox_dropped_{}", std::process::id());
    let url = format!("{}&application_name={application}", scratch.url);
    let backend = backend::open(&url, &OpenOptions::default()).await.unwrap();
    let writes: Vec<_> = (0..8)
        .map(|i| {
            let backend = Arc::clone(&backend);
            tokio::spawn(async move { backend.write(&key(&format!("k{i}")), &write("1", 1)).await })
        })
        .collect();
    for written in writes {
        written.await.unwrap().unwrap();
    }
    blox_testkit::psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = '{application}'"
    ));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    for i in 0..8 {
        let entry = backend.read(&key(&format!("k{i}"))).await;
        assert!(
            matches!(entry, Ok(Some(_))),
            "read {i} after the connections were dropped: {entry:?}"
        );
    }
    backend.write(&key("after"), &write("2", 2)).await.unwrap();
}

/// A connection that breaks while in use is closed, not handed out again: after the server
/// drops every connection, each of them fails at most the one request that found it broken,
/// and the requests after that reconnect and succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_that_broke_in_use_are_replaced_at_once() {
    let scratch = Scratch::new(TestDatabase::Postgres, "broken_connections");
    let application = format!("blox_broken_{}", std::process::id());
    let url = format!("{}&application_name={application}", scratch.url);
    let options = OpenOptions::default();
    let backend = backend::open(&url, &options).await.unwrap();
    backend.write(&key("k"), &write("1", 1)).await.unwrap();
    blox_testkit::psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = '{application}'"
    ));
    let attempts = options.postgres_pool_size as usize + 1;
    let mut failures = 0;
    for _ in 0..attempts {
        if backend.read(&key("k")).await.is_err() {
            failures += 1;
        }
    }
    assert!(
        failures < attempts,
        "a request succeeded within {attempts} attempts ({failures} failed)"
    );
    for i in 0..20 {
        let entry = backend.read(&key("k")).await;
        assert!(
            matches!(entry, Ok(Some(_))),
            "read {i} after the reconnect: {entry:?}"
        );
    }
}
