//! `OrderedDataStore`: integer values ranked by an index, for leaderboards (reference §5).
//!
//! It shares a `DataStore`'s key rules, cache and yielding, but its values are integers only,
//! it keeps no versions, user ids or metadata, its removal is permanent, and it lists entries
//! by value with `GetSortedAsync`. Entries live in the same table as standard ones under their
//! own store kind; a partial index on (value, key) serves the sorted pages, so a page costs
//! the same at rank 1 as at rank 1,000,000.

use mlua::{
    Function, IntoLua, Lua, MultiValue, Table, UserData, UserDataFields, UserDataMethods,
    UserDataRef, Value,
};

use crate::DataStoreError;
use crate::backend::{EntryKey, SortedListing, Write, stored_text};
use crate::budget::Family;
use crate::codec::Stored;
use crate::listing::{Page, PageSource, Pages, Position, keep_page};
use crate::operations::{self, OperationError};
use crate::service::{
    DataStore, DataStoreContext, KeyInfo, KnownValue, call_transform, cast_error, codec_type_name,
    use_cache, yielding,
};

/// The largest magnitude a value may have: every integer up to it is exact in a Luau number.
const MAX_EXACT_INTEGER: i64 = 1 << 53;
/// The page sizes GetSortedAsync takes.
const SORTED_PAGE_SIZES: std::ops::RangeInclusive<i64> = 1..=100;
/// The most keys one BatchGetAsync takes (Roblox's server-configured default).
const BATCH_GET_LIMIT: usize = 100;

/// An `OrderedDataStore` (from GetOrderedDataStore).
#[derive(Debug)]
pub struct OrderedDataStore(pub(crate) DataStore);

/// A value an ordered store can hold: an integer, exact in a Luau number.
fn ordered_value(value: &Value) -> Result<i64, DataStoreError> {
    let not_allowed = |name: &str| Err(DataStoreError::OrderedValueNotAllowed(name.to_owned()));
    match value {
        Value::Integer(n) if n.abs() <= MAX_EXACT_INTEGER => Ok(*n),
        Value::Number(n) if n.fract() == 0.0 && n.abs() <= MAX_EXACT_INTEGER as f64 => {
            Ok(*n as i64)
        }
        Value::Integer(_) | Value::Number(_) => not_allowed("double"),
        Value::Boolean(_) => not_allowed("bool"),
        Value::Table(table) if table.raw_len() > 0 => not_allowed("Array"),
        Value::Table(_) => not_allowed("Dictionary"),
        other => not_allowed(&codec_type_name(other)),
    }
}

/// An ordered store's write of `value`: its text is the integer, which the index reads.
fn ordered_write(value: i64) -> Write {
    Write {
        value: value.to_string(),
        user_ids: "[]".to_owned(),
        metadata: "{}".to_owned(),
        deleted: false,
        now_ms: operations::now_ms(),
    }
}

impl OrderedDataStore {
    async fn get(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, options): (Value, Value),
    ) -> mlua::Result<Value> {
        let key = this.0.entry_key(&lua, key)?;
        let use_cache = use_cache(&options)?;
        match this.0.read_through(&lua, key, use_cache).await? {
            Some(state) => state.0.to_lua(&lua),
            None => Ok(Value::Nil),
        }
    }

    /// Records a new value (or a removal) through this object and returns it to Luau.
    fn written(&self, lua: &Lua, key: &EntryKey, value: Option<i64>) -> mlua::Result<Value> {
        let state = value.map(|value| {
            (
                KnownValue::Decoded(Stored::Number(value as f64)),
                KeyInfo::unversioned(),
            )
        });
        self.0.written(lua, key, state)?;
        Ok(value.map_or(Value::Nil, |value| Value::Number(value as f64)))
    }

    async fn set(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, value): (Value, Value),
    ) -> mlua::Result<Value> {
        let key = this.0.entry_key(&lua, key)?;
        if value.is_nil() {
            return Err(DataStoreError::ArgumentMissing(2).into());
        }
        let value = ordered_value(&value)?;
        this.0
            .spend(&lua, Family::OrderedWrite, "SetAsync", &key)
            .await?;
        let write_key = key.clone();
        this.0
            .context
            .run(&lua, "SetAsync", &this.0.name, move |backend| async move {
                backend.write(&write_key, &ordered_write(value)).await?;
                Ok(())
            })
            .await?;
        this.written(&lua, &key, Some(value))?;
        Ok(Value::Nil)
    }

    async fn increment(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, delta): (Value, Value),
    ) -> mlua::Result<Value> {
        let key = this.0.entry_key(&lua, key)?;
        let delta = match &delta {
            Value::Nil => 1,
            Value::Integer(i) => *i,
            Value::Number(n) if n.is_finite() => (n + 0.5).floor() as i64,
            other => return Err(cast_error(other, "int").into()),
        };
        this.0
            .spend(&lua, Family::OrderedWrite, "IncrementAsync", &key)
            .await?;
        let write_key = key.clone();
        let value = this
            .0
            .context
            .run(
                &lua,
                "IncrementAsync",
                &this.0.name,
                move |backend| async move {
                    loop {
                        let previous = backend.read(&write_key).await?;
                        let current = match &previous {
                            Some(entry) => entry
                                .value
                                .parse::<i64>()
                                .map_err(|_| OperationError::from(DataStoreError::NotNumeric))?,
                            None => 0,
                        };
                        let next = current.saturating_add(delta);
                        if next.abs() > MAX_EXACT_INTEGER {
                            return Err(
                                DataStoreError::OrderedValueNotAllowed("double".into()).into()
                            );
                        }
                        let expected = previous.as_ref().map(|entry| &entry.version);
                        let write = ordered_write(next);
                        let created = operations::created_ms(previous.as_ref(), write.now_ms);
                        if backend
                            .write_if(&write_key, expected, created, &write)
                            .await?
                            .is_some()
                        {
                            return Ok(next);
                        }
                    }
                },
            )
            .await?;
        this.written(&lua, &key, Some(value))
    }

    async fn update(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, transform): (Value, Value),
    ) -> mlua::Result<Value> {
        let key = this.0.entry_key(&lua, key)?;
        let Value::Function(transform) = transform else {
            return Err(match transform {
                Value::Nil => DataStoreError::ArgumentMissing(2),
                other => cast_error(&other, "function"),
            }
            .into());
        };
        this.0
            .spend(&lua, Family::OrderedRead, "UpdateAsync", &key)
            .await?;
        let mut write_paid = false;
        loop {
            let read_key = key.clone();
            let previous = this
                .0
                .context
                .run(
                    &lua,
                    "UpdateAsync",
                    &this.0.name,
                    move |backend| async move { Ok(backend.read(&read_key).await?) },
                )
                .await?;
            let Some(next) = transform_ordered(&transform, previous.as_ref())? else {
                return Ok(Value::Nil);
            };
            if !write_paid {
                this.0
                    .spend(&lua, Family::OrderedWrite, "UpdateAsync", &key)
                    .await?;
                write_paid = true;
            }
            let write = ordered_write(next);
            let created = operations::created_ms(previous.as_ref(), write.now_ms);
            let expected = previous.map(|entry| entry.version);
            let write_key = key.clone();
            let written = this
                .0
                .context
                .run(
                    &lua,
                    "UpdateAsync",
                    &this.0.name,
                    move |backend| async move {
                        Ok(backend
                            .write_if(&write_key, expected.as_ref(), created, &write)
                            .await?)
                    },
                )
                .await?;
            if written.is_some() {
                return this.written(&lua, &key, Some(next));
            }
        }
    }

    async fn remove(this: UserDataRef<Self>, lua: Lua, key: Value) -> mlua::Result<Value> {
        let key = this.0.entry_key(&lua, key)?;
        this.0
            .spend(&lua, Family::OrderedRemove, "RemoveAsync", &key)
            .await?;
        let remove_key = key.clone();
        let removed = this
            .0
            .context
            .run(
                &lua,
                "RemoveAsync",
                &this.0.name,
                move |backend| async move { Ok(backend.delete(&remove_key).await?) },
            )
            .await?;
        this.written(&lua, &key, None)?;
        Ok(removed
            .and_then(|entry| entry.value.parse::<i64>().ok())
            .map_or(Value::Nil, |value| Value::Number(value as f64)))
    }

    async fn get_sorted(
        this: UserDataRef<Self>,
        lua: Lua,
        (ascending, page_size, min_value, max_value): (Value, Value, Value, Value),
    ) -> mlua::Result<Pages<SortedQuery>> {
        let ascending = match ascending {
            Value::Boolean(ascending) => ascending,
            Value::Nil => return Err(DataStoreError::ArgumentMissing(1).into()),
            other => return Err(cast_error(&other, "bool").into()),
        };
        let page_size = match page_size {
            Value::Integer(size) => size,
            Value::Number(size) if size.fract() == 0.0 => size as i64,
            Value::Nil => return Err(DataStoreError::ArgumentMissing(2).into()),
            Value::Number(_) => return Err(DataStoreError::PageSizeOutOfRange.into()),
            other => return Err(cast_error(&other, "int").into()),
        };
        if !SORTED_PAGE_SIZES.contains(&page_size) {
            return Err(DataStoreError::PageSizeOutOfRange.into());
        }
        let bound = |value: Value, unbounded: i64| match value {
            Value::Nil => Ok(unbounded),
            Value::Integer(n) => Ok(n),
            Value::Number(n) if n.fract() == 0.0 && n.is_finite() => Ok(n as i64),
            _ => Err(DataStoreError::MinMaxNotIntegers),
        };
        let min_value = bound(min_value, i64::MIN)?;
        let max_value = bound(max_value, i64::MAX)?;
        if max_value < min_value {
            return Err(DataStoreError::MinMaxOrder.into());
        }
        let query = SortedQuery {
            listing: SortedListing {
                universe: this.0.context.universe(),
                store: stored_text(&this.0.name),
                scope: stored_text(this.0.scope()),
                descending: !ascending,
                min_value,
                max_value,
                after: None,
                limit: 0,
            },
            page_size,
            store_name: this.0.name.clone(),
        };
        Pages::first(&lua, this.0.context.clone(), query, Position::default()).await
    }

    async fn batch_get(
        this: UserDataRef<Self>,
        lua: Lua,
        (keys, _options): (Value, Value),
    ) -> mlua::Result<Table> {
        let Value::Table(keys) = keys else {
            return Err(match keys {
                Value::Nil => DataStoreError::ArgumentMissing(1),
                other => cast_error(&other, "Array"),
            }
            .into());
        };
        let count = keys.raw_len();
        if count == 0 || count > BATCH_GET_LIMIT {
            return Err(DataStoreError::BatchSize(BATCH_GET_LIMIT).into());
        }
        let mut entry_keys = Vec::with_capacity(count);
        for index in 1..=count {
            let key: Value = keys.raw_get(index)?;
            entry_keys.push(this.0.entry_key(&lua, key)?);
        }
        // One OrderedRead per key, as Roblox counts it.
        this.0
            .context
            .budgets
            .acquire(
                &lua,
                Family::OrderedRead,
                count as u32,
                "BatchGetAsync",
                &this.0.name,
                "",
            )
            .await?;
        let found = this
            .0
            .context
            .run(
                &lua,
                "BatchGetAsync",
                &this.0.name,
                move |backend| async move {
                    let mut found = Vec::with_capacity(entry_keys.len());
                    for key in entry_keys {
                        if let Some(entry) = backend.read(&key).await? {
                            found.push((key.key, entry.value));
                        }
                    }
                    Ok(found)
                },
            )
            .await?;
        let results = lua.create_table()?;
        for (key, value) in found {
            if let Ok(value) = value.parse::<i64>() {
                let item = lua.create_table()?;
                item.raw_set("value", value as f64)?;
                results.raw_set(crate::backend::unescape_stored_text(&key), item)?;
            }
        }
        Ok(results)
    }
}

/// Runs an ordered UpdateAsync transform on the current value (nil when absent). Returns
/// the integer it chose, or `None` when it cancelled.
fn transform_ordered(
    transform: &Function,
    previous: Option<&crate::backend::Entry>,
) -> mlua::Result<Option<i64>> {
    let current = previous
        .and_then(|entry| entry.value.parse::<i64>().ok())
        .map_or(Value::Nil, |value| Value::Number(value as f64));
    let results: MultiValue = call_transform(transform, current, Value::Nil)?;
    match results.into_iter().next().unwrap_or(Value::Nil) {
        Value::Nil => Ok(None),
        value => Ok(Some(ordered_value(&value)?)),
    }
}

fn ordered_name(store: &OrderedDataStore) -> String {
    store.0.name.clone()
}

impl UserData for OrderedDataStore {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "OrderedDataStore", ordered_name);
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        instance_methods!(methods, "OrderedDataStore", ordered_name);
        methods.add_async_method("GetAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| OrderedDataStore::get(this, lua, args))
        });
        methods.add_async_method("SetAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| OrderedDataStore::set(this, lua, args))
        });
        methods.add_async_method("IncrementAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| OrderedDataStore::increment(this, lua, args))
        });
        methods.add_async_method("UpdateAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| OrderedDataStore::update(this, lua, args))
        });
        methods.add_async_method("RemoveAsync", |lua, this, key: Value| {
            yielding(lua, |lua| OrderedDataStore::remove(this, lua, key))
        });
        methods.add_async_method(
            "GetSortedAsync",
            |lua, this, args: (Value, Value, Value, Value)| {
                yielding(lua, |lua| OrderedDataStore::get_sorted(this, lua, args))
            },
        );
        methods.add_async_method("BatchGetAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| OrderedDataStore::batch_get(this, lua, args))
        });
        methods.add_method("OnUpdate", |lua, this, args: (Value, Value)| {
            this.0.on_update(lua, args)
        });
    }
}

/// What a `GetSortedAsync` call lists, independent of the page.
#[derive(Debug, Clone)]
pub(crate) struct SortedQuery {
    listing: SortedListing,
    page_size: i64,
    store_name: String,
}

/// One item of a `DataStorePages`: a `{key = ..., value = ...}` table.
#[derive(Debug, Clone)]
pub(crate) struct SortedEntry {
    key: String,
    value: i64,
}

impl IntoLua for SortedEntry {
    fn into_lua(self, lua: &Lua) -> mlua::Result<Value> {
        let item = lua.create_table_with_capacity(0, 2)?;
        item.raw_set("key", self.key)?;
        item.raw_set("value", self.value as f64)?;
        Ok(Value::Table(item))
    }
}

impl PageSource for SortedQuery {
    type Item = SortedEntry;
    const CLASS: &'static str = "DataStorePages";
    const FAMILY: Family = Family::OrderedList;
    const API: &'static str = "GetSortedAsync";

    fn store_name(&self) -> &str {
        &self.store_name
    }

    async fn fetch(
        &self,
        lua: &mlua::Lua,
        context: &DataStoreContext,
        after: Position,
    ) -> mlua::Result<Page<SortedEntry>> {
        let mut listing = self.listing.clone();
        listing.after = after.0.parse().ok().map(|value| (value, after.1));
        listing.limit = self.page_size + 1;
        let mut entries = context
            .run(
                lua,
                Self::API,
                &self.store_name,
                move |backend| async move { Ok(backend.list_sorted(&listing).await?) },
            )
            .await?;
        let next = keep_page(&mut entries, self.page_size)
            .map(|(key, value)| (value.to_string(), key.clone()));
        let items = entries
            .into_iter()
            .map(|(key, value)| SortedEntry {
                key: crate::backend::unescape_stored_text(&key),
                value,
            })
            .collect();
        Ok((items, next))
    }
}
