//! Property tests of the value codec: everything storable round-trips exactly, everything
//! else is rejected with error 104, whatever the nesting.

use std::collections::BTreeMap;

use blox_datastore::DataStoreError;
use blox_datastore::codec::{self, Stored};
use mlua::{Lua, Value};
use proptest::prelude::*;

/// A storable value, built independently of Luau so the test does not trust the codec.
#[derive(Debug, Clone)]
enum Tree {
    Bool(bool),
    Number(f64),
    Text(String),
    Array(Vec<Tree>),
    Dictionary(BTreeMap<String, Tree>),
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Tree::Bool),
        any::<f64>().prop_map(Tree::Number),
        (-(1i64 << 53)..=(1i64 << 53)).prop_map(|n| Tree::Number(n as f64)),
        any::<String>().prop_map(Tree::Text),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..6).prop_map(Tree::Array),
            prop::collection::btree_map("[a-zA-Z0-9_ é日]{1,8}", inner, 1..6)
                .prop_map(Tree::Dictionary),
        ]
    })
}

fn to_lua(lua: &Lua, tree: &Tree) -> Value {
    match tree {
        Tree::Bool(b) => Value::Boolean(*b),
        Tree::Number(n) => Value::Number(*n),
        Tree::Text(s) => Value::String(lua.create_string(s).unwrap()),
        Tree::Array(items) => {
            let table = lua.create_table().unwrap();
            for (index, item) in items.iter().enumerate() {
                table.raw_set(index + 1, to_lua(lua, item)).unwrap();
            }
            Value::Table(table)
        }
        Tree::Dictionary(fields) => {
            let table = lua.create_table().unwrap();
            for (key, item) in fields {
                table.raw_set(key.as_str(), to_lua(lua, item)).unwrap();
            }
            Value::Table(table)
        }
    }
}

fn same(tree: &Tree, value: &Value) -> bool {
    match (tree, value) {
        (Tree::Bool(a), Value::Boolean(b)) => a == b,
        (Tree::Number(a), Value::Number(b)) => {
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
        }
        (Tree::Number(a), Value::Integer(b)) => *a == *b as f64,
        (Tree::Text(a), Value::String(b)) => a.as_bytes() == &*b.as_bytes(),
        (Tree::Array(items), Value::Table(table)) => {
            table.raw_len() == items.len()
                && table.pairs::<Value, Value>().count() == items.len()
                && items
                    .iter()
                    .enumerate()
                    .all(|(i, item)| same(item, &table.raw_get::<Value>(i + 1).unwrap()))
        }
        (Tree::Dictionary(fields), Value::Table(table)) => {
            table.pairs::<Value, Value>().count() == fields.len()
                && fields
                    .iter()
                    .all(|(key, item)| same(item, &table.raw_get::<Value>(key.as_str()).unwrap()))
        }
        _ => false,
    }
}

/// Puts a value that cannot be stored somewhere inside `tree`, following `path`.
fn poison(lua: &Lua, tree: &Tree, path: &[usize], bad: Value) -> Value {
    let value = to_lua(lua, tree);
    let mut table = match &value {
        Value::Table(table) => table.clone(),
        _ => return bad,
    };
    for step in path {
        let keys: Vec<Value> = table
            .pairs::<Value, Value>()
            .map(|p| p.unwrap().0)
            .collect();
        let key = &keys[step % keys.len()];
        match table.raw_get::<Value>(key.clone()).unwrap() {
            Value::Table(inner) => table = inner,
            _ => {
                table.raw_set(key.clone(), bad).unwrap();
                return value;
            }
        }
    }
    let keys: Vec<Value> = table
        .pairs::<Value, Value>()
        .map(|p| p.unwrap().0)
        .collect();
    table.raw_set(keys[0].clone(), bad).unwrap();
    value
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn storable_values_round_trip_exactly(tree in tree()) {
        let lua = Lua::new();
        let original = to_lua(&lua, &tree);
        let text = codec::encode(&lua, &original).expect("storable");
        let decoded = codec::decode(&text).expect("what the codec writes, it reads");
        let back = codec::to_lua(&lua, &decoded).unwrap();
        prop_assert!(same(&tree, &back), "{tree:?} came back as {text}");
        prop_assert_eq!(&codec::encode(&lua, &back).unwrap(), &text, "encoding is stable");
        let parsed = codec::text_to_lua(&lua, &text).expect("what the codec writes, it parses");
        prop_assert!(same(&tree, &parsed), "{tree:?} parsed straight into Luau as {text}");
    }

    #[test]
    fn unstorable_values_are_rejected_anywhere(
        tree in tree(),
        path in prop::collection::vec(any::<usize>(), 0..4),
        kind in 0..4usize,
    ) {
        let lua = Lua::new();
        let bad = match kind {
            0 => Value::Function(lua.create_function(|_, ()| Ok(())).unwrap()),
            1 => Value::String(lua.create_string(b"bad \xff utf-8").unwrap()),
            2 => {
                let sparse = lua.create_table().unwrap();
                sparse.raw_set(1, 1).unwrap();
                sparse.raw_set(3, 3).unwrap();
                Value::Table(sparse)
            }
            _ => {
                let mixed = lua.create_table().unwrap();
                mixed.raw_set(1, 1).unwrap();
                mixed.raw_set("x", 2).unwrap();
                Value::Table(mixed)
            }
        };
        let value = poison(&lua, &tree, &path, bad);
        match codec::encode(&lua, &value) {
            Err(DataStoreError::CantStoreValue(_)) => {}
            other => prop_assert!(false, "expected 104, got {other:?}"),
        }
    }

    #[test]
    fn every_number_round_trips_bit_for_bit(n in any::<f64>()) {
        let text = codec::encode(&Lua::new(), &Value::Number(n)).unwrap();
        match codec::decode(&text).unwrap() {
            Stored::Number(back) => prop_assert!(back.to_bits() == n.to_bits() || (n.is_nan() && back.is_nan()), "{n} -> {text} -> {back}"),
            other => prop_assert!(false, "{other:?}"),
        }
    }
}

#[test]
fn strings_and_integers_are_written_as_json() {
    let lua = Lua::new();
    let text = lua
        .create_string("quote \" backslash \\ newline \n tab \t return \r bell \u{7} é 日")
        .unwrap();
    assert_eq!(
        codec::encode(&lua, &Value::String(text)).unwrap(),
        r#""quote \" backslash \\ newline \n tab \t return \r bell \u0007 é 日""#
    );
    for (n, written) in [
        (1500.0, "1500"),
        (-42.0, "-42"),
        (9_007_199_254_740_992.0, "9007199254740992"),
        (-9_007_199_254_740_992.0, "-9007199254740992"),
        (0.955, "0.955"),
    ] {
        assert_eq!(codec::encode(&lua, &Value::Number(n)).unwrap(), written);
    }
}

#[test]
fn roblox_rules_for_tables() {
    let lua = Lua::new();
    let encode = |source: &str| codec::encode(&lua, &lua.load(source).eval::<Value>().unwrap());
    assert_eq!(encode("return {}").unwrap(), "[]");
    assert_eq!(encode("return {1, 2, 3}").unwrap(), "[1,2,3]");
    assert_eq!(encode("return {[5] = true}").unwrap(), r#"{"5":true}"#);
    assert_eq!(encode("return {a = 0.955}").unwrap(), r#"{"a":0.955}"#);
    assert_eq!(encode("return 2^53").unwrap(), "9007199254740992");
    assert_eq!(encode("return 0/0").unwrap(), "NaN");
    assert_eq!(encode("return -math.huge").unwrap(), "-Infinity");
    assert_eq!(encode(r#"return "a\"b\n""#).unwrap(), r#""a\"b\n""#);
    assert_eq!(
        encode("return {[-3] = 1, [1.5] = 2, [2^60] = 3}").unwrap(),
        r#"{"-3":1,"1.5":2,"1152921504606846976":3}"#,
        "number keys of a length-0 table are stringified: whole numbers in full, others in shortest form"
    );
    for (source, named) in [
        ("return {1, 2, x = 3}", "Array"),
        ("return {[1] = 1, [3] = 3}", "Array"),
        ("return {[true] = 1}", "Dictionary"),
        ("return print", "function"),
        ("return coroutine.create(print)", "thread"),
        ("return vector.create(1, 2, 3)", "Vector3"),
        ("return {vector.create(1, 2, 3)}", "Array"),
        ("return {a = {print}}", "Array"),
        ("return {{a = print}}", "Dictionary"),
        ("local t = {} t.t = t return t", "Dictionary"),
    ] {
        assert_eq!(
            encode(source),
            Err(DataStoreError::CantStoreValue(named.to_owned())),
            "{source}"
        );
    }
    let deep = "local t = {} local c = t for _ = 1, 300 do c.x = {} c = c.x end return t";
    assert!(
        encode(deep).is_err(),
        "nesting deeper than the limit is rejected"
    );
    assert_eq!(
        encode(r#"return {[5] = 1, ["5"] = 2}"#),
        Err(DataStoreError::CantStoreValue("Dictionary".to_owned())),
        "keys that collide once stringified are rejected"
    );
}

#[test]
fn size_limit_is_the_serialized_length() {
    let lua = Lua::new();
    let at_limit = lua
        .create_string("x".repeat(codec::MAX_VALUE_LENGTH - 2))
        .unwrap();
    assert!(codec::encode(&lua, &Value::String(at_limit)).is_ok());
    let over = lua
        .create_string("x".repeat(codec::MAX_VALUE_LENGTH - 1))
        .unwrap();
    assert_eq!(
        codec::encode(&lua, &Value::String(over)),
        Err(DataStoreError::ValueTooLarge)
    );
}

#[test]
fn decoding_rejects_what_blox_never_writes() {
    for text in [
        "",
        "{",
        "[1,",
        "\"open",
        "tru",
        "{\"a\" 1}",
        "1 2",
        "\"\\x\"",
    ] {
        assert!(
            matches!(codec::decode(text), Err(DataStoreError::Corrupt(_))),
            "{text:?}"
        );
        let error = codec::text_to_lua(&Lua::new(), text).expect_err(text);
        assert!(
            error.to_string().contains("invalid stored JSON at byte"),
            "{text:?}: {error}"
        );
    }
    assert_eq!(
        codec::decode(r#"{"a":[1,"\u00e9\ud83d\ude00"],"b":null}"#).unwrap(),
        Stored::Object(vec![
            (
                "a".to_owned(),
                Stored::Array(vec![Stored::Number(1.0), Stored::String("é😀".to_owned())])
            ),
            ("b".to_owned(), Stored::Null),
        ])
    );
    let lua = Lua::new();
    let parsed =
        codec::text_to_lua(&lua, r#"{"a":[1,"\u00e9\ud83d\ude00","x\ny"],"b":null}"#).unwrap();
    let parsed = parsed.as_table().unwrap();
    let items: mlua::Table = parsed.get("a").unwrap();
    assert_eq!(items.raw_len(), 3);
    assert_eq!(items.get::<f64>(1).unwrap(), 1.0);
    assert_eq!(items.get::<String>(2).unwrap(), "é😀");
    assert_eq!(items.get::<String>(3).unwrap(), "x\ny");
    assert!(parsed.get::<Value>("b").unwrap().is_nil());
}

#[test]
fn building_a_value_too_large_for_the_heap_fails_cleanly() {
    let lua = Lua::new();
    let big = Stored::Array(
        (0..20_000)
            .map(|i| Stored::String(format!("item number {i} with some padding")))
            .collect(),
    );
    lua.set_memory_limit(lua.used_memory() + 256 * 1024)
        .unwrap();
    let error = codec::to_lua(&lua, &big).expect_err("the heap is too small");
    assert!(matches!(error, mlua::Error::MemoryError(_)), "{error:?}");
    let text = format!(
        "[{}]",
        (0..20_000)
            .map(|i| format!("\"item number {i} with some padding\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let error = codec::text_to_lua(&lua, &text).expect_err("the heap is too small");
    assert!(matches!(error, mlua::Error::MemoryError(_)), "{error:?}");
    lua.set_memory_limit(0).unwrap();
    let value = codec::text_to_lua(&lua, &text).expect("fits once the limit is lifted");
    assert_eq!(value.as_table().map(|table| table.raw_len()), Some(20_000));
    let value = codec::to_lua(&lua, &big).expect("fits once the limit is lifted");
    assert_eq!(value.as_table().map(|table| table.raw_len()), Some(20_000));
}

#[test]
fn values_nested_as_deep_as_the_codec_allows_build() {
    let lua = Lua::new();
    let mut stored = Stored::Bool(true);
    for depth in 0..codec::MAX_DEPTH {
        stored = if depth % 2 == 0 {
            Stored::Array(vec![stored])
        } else {
            Stored::Object(vec![("k".to_owned(), stored)])
        };
    }
    let value = codec::to_lua(&lua, &stored).unwrap();
    let text = codec::encode(&lua, &value).unwrap();
    assert_eq!(codec::decode(&text).unwrap(), stored);
    let parsed = codec::text_to_lua(&lua, &text).unwrap();
    assert_eq!(codec::encode(&lua, &parsed).unwrap(), text);
    let too_deep = format!(
        "{}{}",
        "[".repeat(codec::MAX_DEPTH + 2),
        "]".repeat(codec::MAX_DEPTH + 2)
    );
    assert!(matches!(
        codec::decode(&too_deep),
        Err(DataStoreError::Corrupt(_))
    ));
    assert!(codec::text_to_lua(&lua, &too_deep).is_err());
}
