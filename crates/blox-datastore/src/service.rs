//! The Luau objects: `DataStoreService`, `DataStore`, `DataStoreKeyInfo` and the option
//! classes, with Roblox's members, return values, yielding and errors.
//!
//! Every `*Async` method runs inside [`yielding`]: a thread that cannot yield (an UpdateAsync
//! transform) is refused before any work is sent; the method validates its arguments (a bad
//! call raises at once and writes nothing), starts the database work (polled by the calling
//! thread on the VM's runtime: [`DataStoreContext::run`]) and parks the calling thread until
//! it is done; an answer that needed no wait (a cache hit) still yields once, because Roblox
//! libraries connect to their own signals after the call and hang if it returns without
//! yielding. The VM thread never waits on the database: while a call's work waits, other
//! threads run.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{
    AnyUserData, Function, IntoLuaMulti, Lua, MetaMethod, MultiValue, ObjectLike as _, Table,
    UserData, UserDataFields, UserDataMethods, UserDataRef, Value,
};

use crate::DataStoreError;
use crate::attached::Attached;
use crate::backend::{
    Backend, Entry, EntryKey, KeyListing, ScopeRange, StoreKind, StoreListing, Version,
    VersionListing, Write, stored_text,
};
use crate::budget::{Family, RequestBudgets, RequestType, Throttling};
use crate::cache::ReadCache;
use crate::codec::{self, Stored};
use crate::listing::{self, KeyQuery, Pages, StoreQuery, VersionQuery};
use crate::operations::{self, OperationError};
use crate::ordered::OrderedDataStore;
use crate::updates::UpdateWatch;
use blox_scheduler::Scheduler;

/// Limits on keys, names and scopes, in bytes (`string.len`).
const NAME_LIMIT: usize = 50;
/// The most user ids one write may carry.
const USER_ID_LIMIT: usize = 4;
/// Metadata limits: key, value and whole serialized dictionary.
const METADATA_KEY_LIMIT: usize = 50;
const METADATA_VALUE_LIMIT: usize = 250;
const METADATA_LIMIT: usize = 300;
/// .NET ticks (100 ns) at the Unix epoch, for Roblox-shaped version strings.
const UNIX_EPOCH_TICKS: i64 = 621_355_968_000_000_000;
/// How far ahead of now GetVersionAtTimeAsync may look (Roblox: ten minutes).
const VERSION_TIME_LEEWAY_MS: i64 = 10 * 60 * 1000;

/// What every DataStore object of one VM shares: where data lives and who it belongs to.
#[derive(Debug)]
pub struct DataStoreContext {
    /// The shared backend, for background work spawned onto the database runtime.
    backend: Arc<dyn Backend>,
    /// The backend this VM's calls run on: its own lane where the backend gives one.
    calls: Arc<dyn Backend>,
    runtime: tokio::runtime::Handle,
    universe: i64,
    /// `OnUpdate` subscriptions and what they have seen.
    updates: UpdateWatch,
    /// This server's request budgets and throttle queues.
    pub(crate) budgets: RequestBudgets,
}

impl DataStoreContext {
    /// A context storing into `backend` for the game `universe`, with request budgets as
    /// `throttling` sets them. Calls run on the VM's own lane of `backend` where it gives one
    /// (its connections open on the VM's runtime; see [`DataStoreContext::run`]); background
    /// work (`OnUpdate` polling) runs on `runtime`, a multi-thread runtime other than the VM's.
    pub fn new(
        backend: Arc<dyn Backend>,
        runtime: tokio::runtime::Handle,
        universe: i64,
        throttling: Throttling,
    ) -> Rc<Self> {
        Rc::new(Self {
            calls: backend.lane().unwrap_or_else(|| Arc::clone(&backend)),
            backend,
            runtime,
            universe,
            updates: UpdateWatch::default(),
            budgets: RequestBudgets::new(throttling),
        })
    }

    /// The universe (game) whose data this server reads and writes.
    pub fn universe(&self) -> i64 {
        self.universe
    }

    /// Sets the live player count that request budgets scale with.
    pub fn set_player_count(&self, players: u32) {
        self.budgets.set_players(players);
    }

    /// The server's `OnUpdate` state.
    pub(crate) fn updates(&self) -> &UpdateWatch {
        &self.updates
    }

    /// Starts `work` on the database runtime without waiting for it.
    pub(crate) fn spawn_detached<F, W>(&self, work: W)
    where
        F: Future<Output = ()> + Send + 'static,
        W: FnOnce(Arc<dyn Backend>) -> F,
    {
        self.runtime.spawn(work(Arc::clone(&self.backend)));
    }

    /// Runs `work` for the calling thread and waits for it without blocking the VM thread:
    /// polled by the calling thread on the VM's runtime ([`Attached`]), on this VM's lane of
    /// the backend where it gives one.
    pub(crate) async fn run<T, F, W>(
        &self,
        lua: &Lua,
        api: &'static str,
        store: &str,
        work: W,
    ) -> mlua::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, OperationError>> + Send + 'static,
        W: FnOnce(Arc<dyn Backend>) -> F,
    {
        let failure = match Attached::new(lua, work(Arc::clone(&self.calls))).await {
            Ok(value) => return Ok(value),
            Err(OperationError::Rejected(error)) => return Err(error.into()),
            Err(OperationError::Backend(error)) => error.to_string(),
        };
        tracing::error!(api, store, error = %failure, "DataStore request failed");
        Err(DataStoreError::Internal {
            api,
            store: store.to_owned(),
        }
        .into())
    }
}

/// Runs an `*Async` method so that the calling thread yields at least once, as every Roblox
/// `*Async` call does even when its answer is instant (a cache hit); libraries connect to their
/// own signals after such a call and would hang otherwise. A call that reached the database
/// already yielded while it waited and pays for no second resumption, which a fixed yield
/// before every call would cost. A call whose arguments are rejected raises at once.
///
/// A thread that cannot yield (inside an UpdateAsync transform, a metamethod) is refused
/// before `call` starts, with Luau's own message, so such a call never sends work it could not
/// wait for.
pub(crate) async fn yielding<T, F>(lua: Lua, call: impl FnOnce(Lua) -> F) -> mlua::Result<T>
where
    F: Future<Output = mlua::Result<T>>,
{
    if !can_yield(&lua) {
        return Err(mlua::Error::runtime(
            "attempt to yield across metamethod/C-call boundary",
        ));
    }
    let mut call = std::pin::pin!(call(lua));
    let mut waited = false;
    let result = std::future::poll_fn(|context| {
        let poll = call.as_mut().poll(context);
        waited |= poll.is_pending();
        poll
    })
    .await;
    if !waited && result.is_ok() {
        blox_scheduler::yield_now().await;
    }
    result
}

/// Whether the running Luau thread may yield: false inside a call made from Rust (an
/// UpdateAsync transform) or a metamethod.
#[allow(unsafe_code)]
fn can_yield(lua: &Lua) -> bool {
    // SAFETY: `state()` is the thread running the current callback; `lua_isyieldable` only
    // reads its call depth.
    lua.exec_raw_lua(|raw| unsafe { mlua::ffi::lua_isyieldable(raw.state()) != 0 })
}

/// `game:GetService("DataStoreService")`.
#[derive(Debug)]
pub struct DataStoreService {
    context: Rc<DataStoreContext>,
    stores: RefCell<HashMap<(StoreKind, String, String, bool), AnyUserData>>,
}

impl DataStoreService {
    /// The service over `context`.
    pub fn new(context: Rc<DataStoreContext>) -> Self {
        Self {
            context,
            stores: RefCell::default(),
        }
    }

    /// The store object for (kind, name, scope, AllScopes): one per server, as on Roblox.
    fn store(
        &self,
        lua: &Lua,
        kind: StoreKind,
        name: String,
        scope: String,
        all_scopes: bool,
    ) -> mlua::Result<AnyUserData> {
        let cache_key = (kind, name.clone(), scope.clone(), all_scopes);
        if let Some(store) = self.stores.borrow().get(&cache_key) {
            return Ok(store.clone());
        }
        let store = DataStore {
            context: Rc::clone(&self.context),
            kind,
            name,
            scope,
            all_scopes,
            cache: ReadCache::default(),
        };
        let store = match kind {
            StoreKind::Standard => lua.create_userdata(store)?,
            StoreKind::Ordered => lua.create_userdata(OrderedDataStore(store))?,
        };
        self.stores.borrow_mut().insert(cache_key, store.clone());
        Ok(store)
    }
}

fn service_name(_: &DataStoreService) -> &'static str {
    "DataStoreService"
}

impl UserData for DataStoreService {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "DataStoreService", service_name);
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        instance_methods!(methods, "DataStoreService", service_name);
        methods.add_method(
            "GetDataStore",
            |lua, service, (name, scope, options): (Value, Value, Option<AnyUserData>)| {
                let all_scopes = match options {
                    Some(options) => options
                        .borrow::<DataStoreOptions>()
                        .map_err(|_| {
                            cast_error(&Value::UserData(options.clone()), "DataStoreOptions")
                        })?
                        .all_scopes
                        .get(),
                    None => false,
                };
                let (name, scope) = store_identity(lua, name, scope, all_scopes)?;
                service.store(lua, StoreKind::Standard, name, scope, all_scopes)
            },
        );
        methods.add_method(
            "GetOrderedDataStore",
            |lua, service, (name, scope): (Value, Value)| {
                let (name, scope) = store_identity(lua, name, scope, false)?;
                service.store(lua, StoreKind::Ordered, name, scope, false)
            },
        );
        methods.add_method("GetGlobalDataStore", |lua, service, ()| {
            // The global store has no name of its own; "" can never collide with a named one.
            service.store(
                lua,
                StoreKind::Standard,
                String::new(),
                "u".to_owned(),
                false,
            )
        });
        methods.add_async_method(
            "ListDataStoresAsync",
            |lua, service, (prefix, page_size, cursor): (Option<String>, Option<f64>, Option<String>)| yielding(lua, move |lua| async move {
                let page_size = listing::page_size(page_size, listing::DEFAULT_STORE_PAGE_SIZE)?;
                let after = start_after(cursor, "ListDataStoresAsync", "")?;
                let base = StoreListing {
                    universe: service.context.universe,
                    kind: StoreKind::Standard,
                    name_from: String::new(),
                    name_to: None,
                    after: String::new(),
                    limit: 0,
                };
                let query = StoreQuery {
                    listing: StoreQuery::listing_for(base, prefix.as_deref().unwrap_or("")),
                    page_size,
                };
                Pages::first(&lua, Rc::clone(&service.context), query, after).await
            }),
        );
        methods.add_method(
            "GetRequestBudgetForRequestType",
            |lua, service, request: Value| {
                let request = request_type(request)?;
                let now = Scheduler::of(lua).now();
                Ok(service.context.budgets.available(request, now))
            },
        );
        methods.add_method(
            "SetRateLimitForRequestType",
            |lua, service, (request, base, per_player): (Value, f64, f64)| {
                let request = request_type(request)?;
                let now = Scheduler::of(lua).now();
                Ok(service
                    .context
                    .budgets
                    .set_limit(request, base, per_player, now)?)
            },
        );
    }
}

/// Validates GetDataStore's and GetOrderedDataStore's name and scope arguments.
fn store_identity(
    lua: &Lua,
    name: Value,
    scope: Value,
    all_scopes: bool,
) -> mlua::Result<(String, String)> {
    let name = name_argument(lua, name, 1)?;
    if name.is_empty() {
        return Err(DataStoreError::NameEmpty.into());
    }
    if name.len() > NAME_LIMIT {
        return Err(DataStoreError::NameTooLong.into());
    }
    let scope = match scope {
        Value::Nil if all_scopes => String::new(),
        Value::Nil => "global".to_owned(),
        other => name_argument(lua, other, 2)?,
    };
    if all_scopes {
        if !scope.is_empty() {
            return Err(DataStoreError::ScopeWithAllScopes.into());
        }
    } else if scope.is_empty() {
        return Err(DataStoreError::ScopeEmpty.into());
    }
    if scope.len() > NAME_LIMIT {
        return Err(DataStoreError::ScopeTooLong.into());
    }
    Ok((name, scope))
}

/// A name, scope or key argument: strings as they are, numbers as `tostring` writes them.
pub(crate) fn name_argument(lua: &Lua, value: Value, position: usize) -> mlua::Result<String> {
    match value {
        Value::String(text) => text
            .to_str()
            .map(|text| text.to_owned())
            .map_err(|_| cast_error(&Value::String(text.clone()), "string").into()),
        Value::Integer(_) | Value::Number(_) => Ok(lua
            .coerce_string(value)?
            .map(|text| text.to_string_lossy())
            .unwrap_or_default()),
        Value::Nil => Err(DataStoreError::ArgumentMissing(position).into()),
        other => Err(cast_error(&other, "string").into()),
    }
}

pub(crate) fn cast_error(value: &Value, to: &'static str) -> DataStoreError {
    DataStoreError::Cast {
        from: match value {
            Value::UserData(userdata) => userdata
                .type_name()
                .map(|name| name.to_string_lossy())
                .unwrap_or_else(|_| "userdata".to_owned()),
            Value::Number(_) | Value::Integer(_) => "double".to_owned(),
            Value::Boolean(_) => "bool".to_owned(),
            other => other.type_name().to_owned(),
        },
        to,
    }
}

/// A `DataStore` (from GetDataStore or GetGlobalDataStore), and the state an
/// [`OrderedDataStore`] shares with it.
#[derive(Debug)]
pub struct DataStore {
    pub(crate) context: Rc<DataStoreContext>,
    kind: StoreKind,
    pub(crate) name: String,
    scope: String,
    all_scopes: bool,
    cache: ReadCache<Option<Rc<(KnownValue, KeyInfo)>>>,
}

impl DataStore {
    /// Validates a key argument and builds the entry's full identity.
    pub(crate) fn entry_key(&self, lua: &Lua, key: Value) -> mlua::Result<EntryKey> {
        let key = name_argument(lua, key, 1)?;
        let (scope, key) = if self.all_scopes {
            match key.split_once('/') {
                Some((scope, key)) if !scope.is_empty() => (scope.to_owned(), key.to_owned()),
                _ if key.is_empty() => return Err(DataStoreError::KeyNameEmpty.into()),
                _ => return Err(DataStoreError::KeyNotScoped.into()),
            }
        } else {
            (self.scope.clone(), key)
        };
        if key.is_empty() {
            return Err(DataStoreError::KeyNameEmpty.into());
        }
        if key.len() > NAME_LIMIT {
            return Err(DataStoreError::KeyNameLimit.into());
        }
        Ok(EntryKey {
            universe: self.context.universe,
            kind: self.kind,
            store: stored_text(&self.name),
            scope: stored_text(&scope),
            key: stored_text(&key),
        })
    }

    /// `OnUpdate(key, callback)`: calls `callback` with the new value after every write of
    /// `key`: at once for this server's writes, within a minute for other servers' (see
    /// [`crate::updates`]).
    pub(crate) fn on_update(
        &self,
        lua: &Lua,
        (key, callback): (Value, Value),
    ) -> mlua::Result<blox_scheduler::SignalConnection> {
        let key = self.entry_key(lua, key)?;
        let Value::Function(callback) = callback else {
            return Err(match callback {
                Value::Nil => DataStoreError::ArgumentMissing(2),
                other => cast_error(&other, "function"),
            }
            .into());
        };
        Ok(UpdateWatch::signal(&self.context, lua, key).connect(callback))
    }

    /// The scope this object reads and writes (empty under AllScopes).
    pub(crate) fn scope(&self) -> &str {
        &self.scope
    }

    /// Spends one request of `family` on `key` from this server's budget.
    pub(crate) async fn spend(
        &self,
        lua: &Lua,
        family: Family,
        api: &'static str,
        key: &EntryKey,
    ) -> mlua::Result<()> {
        let key = crate::backend::unescape_stored_text(&key.key);
        self.context
            .budgets
            .acquire(lua, family, 1, api, &self.name, &key)
            .await
    }

    /// Records what the object now knows of `key`, fresh for the cache window.
    fn remember(&self, lua: &Lua, key: &EntryKey, state: Option<Rc<(KnownValue, KeyInfo)>>) {
        let now = Scheduler::of(lua).now();
        let seq = state.as_ref().map(|known| known.1.version.seq);
        self.cache.put(&key.scope, &key.key, state, seq, now);
    }

    /// Records a write made through this object: its cache and this server's `OnUpdate`
    /// callbacks see it at once.
    pub(crate) fn written(
        &self,
        lua: &Lua,
        key: &EntryKey,
        state: Option<(KnownValue, KeyInfo)>,
    ) -> mlua::Result<()> {
        let state = state.map(Rc::new);
        self.context.updates().notify(lua, key, state.as_deref())?;
        self.remember(lua, key, state);
        Ok(())
    }

    async fn get(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, options): (Value, Value),
    ) -> mlua::Result<MultiValue> {
        let key = this.entry_key(&lua, key)?;
        let use_cache = use_cache(&options)?;
        let found = this.read_through(&lua, key, use_cache).await?;
        value_and_info(&lua, found.as_deref())
    }

    /// GetAsync's read: from the object's cache when allowed and fresh, else from the
    /// database, remembering the answer.
    pub(crate) async fn read_through(
        &self,
        lua: &Lua,
        key: EntryKey,
        use_cache: bool,
    ) -> mlua::Result<Option<Rc<(KnownValue, KeyInfo)>>> {
        if use_cache {
            let now = Scheduler::of(lua).now();
            if let Some(cached) = self.cache.get(&key.scope, &key.key, now) {
                return Ok(cached);
            }
        }
        let family = match self.kind {
            StoreKind::Standard => Family::StandardRead,
            StoreKind::Ordered => Family::OrderedRead,
        };
        self.spend(lua, family, "GetAsync", &key).await?;
        let read_key = key.clone();
        let found = self
            .context
            .run(lua, "GetAsync", &self.name, move |backend| async move {
                let Some(entry) = operations::get(backend.as_ref(), &read_key).await? else {
                    return Ok(None);
                };
                let info = KeyInfo::from_entry(&entry);
                Ok(Some((KnownValue::Text(entry.value), info)))
            })
            .await?
            .map(Rc::new);
        self.remember(lua, &key, found.clone());
        Ok(found)
    }

    async fn set(this: UserDataRef<Self>, lua: Lua, args: SetArgs) -> mlua::Result<String> {
        let key = this.entry_key(&lua, args.key)?;
        if args.value.is_nil() {
            return Err(DataStoreError::ArgumentMissing(2).into());
        }
        let value = codec::encode(&lua, &args.value)?;
        let user_ids = user_ids_json(args.user_ids)?;
        let metadata = metadata_json(&lua, options_metadata(args.options, "DataStoreSetOptions")?)?;
        this.spend(&lua, Family::StandardWrite, "SetAsync", &key)
            .await?;
        let write_key = key.clone();
        let (written, info) = this
            .context
            .run(&lua, "SetAsync", &this.name, move |backend| async move {
                let write = Write {
                    value,
                    user_ids,
                    metadata,
                    deleted: false,
                    now_ms: operations::now_ms(),
                };
                let version = backend.write(&write_key, &write).await?;
                let info = KeyInfo {
                    version,
                    user_ids: write.user_ids.into(),
                    metadata: write.metadata.into(),
                };
                Ok((write.value, info))
            })
            .await?;
        let version = version_string(&info.version);
        this.written(&lua, &key, Some((KnownValue::Text(written), info)))?;
        Ok(version)
    }

    async fn update(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, transform): (Value, Value),
    ) -> mlua::Result<MultiValue> {
        let key = Arc::new(this.entry_key(&lua, key)?);
        let Value::Function(transform) = transform else {
            return Err(match transform {
                Value::Nil => DataStoreError::ArgumentMissing(2),
                other => cast_error(&other, "function"),
            }
            .into());
        };
        this.spend(&lua, Family::StandardRead, "UpdateAsync", &key)
            .await?;
        let mut write_paid = false;
        loop {
            let read_key = Arc::clone(&key);
            let previous = this
                .context
                .run(&lua, "UpdateAsync", &this.name, move |backend| async move {
                    let mut entry = backend.read(&read_key).await?;
                    let live = match entry.as_mut() {
                        Some(entry) if !entry.deleted => {
                            let text = std::mem::take(&mut entry.value);
                            Some(KnownValue::Text(text))
                        }
                        _ => None,
                    };
                    Ok((entry, live))
                })
                .await?;
            let (entry, live) = previous;
            let (current, info) = match (&entry, &live) {
                (Some(entry), Some(value)) => (
                    value.to_lua(&lua)?,
                    Value::UserData(lua.create_userdata(KeyInfo::from_entry(entry))?),
                ),
                _ => (Value::Nil, Value::Nil),
            };
            let Some(write) = run_transform(&lua, &transform, current, info)? else {
                return Value::Nil.into_lua_multi(&lua);
            };
            if !write_paid {
                this.spend(&lua, Family::StandardWrite, "UpdateAsync", &key)
                    .await?;
                write_paid = true;
            }
            let (value, user_ids, metadata) = write;
            let now_ms = operations::now_ms();
            let created = operations::created_ms(entry.as_ref(), now_ms);
            let write = Write {
                value,
                user_ids,
                metadata,
                deleted: false,
                now_ms,
            };
            let write_key = Arc::clone(&key);
            let expected = entry.as_ref().map(|entry| entry.version);
            let (written, write) = this
                .context
                .run(&lua, "UpdateAsync", &this.name, move |backend| async move {
                    let written = backend
                        .write_if(&write_key, expected.as_ref(), created, &write)
                        .await?;
                    Ok((written, write))
                })
                .await?;
            if let Some(version) = written {
                let value = KnownValue::Text(write.value);
                let returned = value.to_lua(&lua)?;
                let info = KeyInfo {
                    version,
                    user_ids: write.user_ids.into(),
                    metadata: write.metadata.into(),
                };
                this.written(&lua, &key, Some((value, info.clone())))?;
                return (returned, info).into_lua_multi(&lua);
            }
        }
    }

    async fn increment(
        this: UserDataRef<Self>,
        lua: Lua,
        args: SetArgs,
    ) -> mlua::Result<MultiValue> {
        let key = this.entry_key(&lua, args.key)?;
        let cache_key = key.clone();
        let delta = match &args.value {
            Value::Nil => 1,
            Value::Integer(i) => *i,
            // Roblox's `int` parameter: mocks and observed behaviour round to nearest.
            Value::Number(n) if n.is_finite() => (n + 0.5).floor() as i64,
            other => return Err(cast_error(other, "int").into()),
        };
        let user_ids = user_ids_json(args.user_ids)?;
        let metadata = metadata_json(
            &lua,
            options_metadata(args.options, "DataStoreIncrementOptions")?,
        )?;
        this.spend(&lua, Family::StandardWrite, "IncrementAsync", &key)
            .await?;
        let (value, version) = this
            .context
            .run(
                &lua,
                "IncrementAsync",
                &this.name,
                move |backend| async move {
                    let (value, version) = operations::increment(
                        backend.as_ref(),
                        &key,
                        delta,
                        user_ids.clone(),
                        metadata.clone(),
                    )
                    .await?;
                    Ok((value, (version, user_ids, metadata)))
                },
            )
            .await?;
        let (version, user_ids, metadata) = version;
        let info = KeyInfo {
            version,
            user_ids: user_ids.into(),
            metadata: metadata.into(),
        };
        this.written(
            &lua,
            &cache_key,
            Some((
                KnownValue::Decoded(Stored::Number(value as f64)),
                info.clone(),
            )),
        )?;
        (value as f64, info).into_lua_multi(&lua)
    }

    async fn list_keys(
        this: UserDataRef<Self>,
        lua: Lua,
        (prefix, page_size, cursor, exclude_deleted): ListKeysArgs,
    ) -> mlua::Result<Pages<KeyQuery>> {
        let page_size = listing::page_size(page_size, listing::DEFAULT_KEY_PAGE_SIZE)?;
        let after = start_after(cursor, "ListKeysAsync", &this.name)?;
        let base = KeyListing {
            universe: this.context.universe,
            kind: StoreKind::Standard,
            store: stored_text(&this.name),
            scopes: ScopeRange::Between {
                from: String::new(),
                to: None,
            },
            key_from: String::new(),
            key_to: None,
            after: (String::new(), String::new()),
            exclude_deleted: exclude_deleted.unwrap_or(false),
            limit: 0,
        };
        let scope = (!this.all_scopes).then(|| stored_text(&this.scope));
        let query = KeyQuery {
            listing: KeyQuery::listing_for(base, scope.as_deref(), prefix.as_deref().unwrap_or("")),
            page_size,
            qualified: this.all_scopes,
            store_name: this.name.clone(),
        };
        Pages::first(&lua, Rc::clone(&this.context), query, after).await
    }

    /// Validates a version argument: a Roblox-shaped version string. Returns its sequence.
    fn version_argument(&self, api: &'static str, version: Value) -> mlua::Result<(String, i64)> {
        let text = match version {
            Value::String(text) => text.to_string_lossy(),
            Value::Nil => return Err(DataStoreError::ArgumentMissing(2).into()),
            other => return Err(cast_error(&other, "string").into()),
        };
        let invalid = || DataStoreError::InvalidVersion {
            api,
            store: self.name.clone(),
        };
        let seq = parse_version(&text).ok_or_else(invalid)?;
        Ok((text, seq))
    }

    async fn get_version(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, version): (Value, Value),
    ) -> mlua::Result<MultiValue> {
        let key = this.entry_key(&lua, key)?;
        let (version, seq) = this.version_argument("GetVersionAsync", version)?;
        this.spend(&lua, Family::StandardRead, "GetVersionAsync", &key)
            .await?;
        let found = this
            .context
            .run(
                &lua,
                "GetVersionAsync",
                &this.name,
                move |backend| async move {
                    let entry = backend.read_version(&key, seq).await?;
                    let entry = entry.filter(|entry| version_string(&entry.version) == version);
                    live_value(entry)
                },
            )
            .await?;
        value_and_info(&lua, found.as_ref())
    }

    async fn get_version_at_time(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, timestamp): (Value, Value),
    ) -> mlua::Result<MultiValue> {
        let key = this.entry_key(&lua, key)?;
        let timestamp = match timestamp {
            Value::Integer(ms) => ms as f64,
            Value::Number(ms) => ms,
            Value::Nil => return Err(DataStoreError::ArgumentMissing(2).into()),
            other => return Err(cast_error(&other, "int64").into()),
        };
        if !(timestamp > 0.0 && timestamp <= (operations::now_ms() + VERSION_TIME_LEEWAY_MS) as f64)
        {
            return Err(DataStoreError::InvalidTimestamp {
                store: this.name.clone(),
            }
            .into());
        }
        this.spend(&lua, Family::StandardRead, "GetVersionAtTimeAsync", &key)
            .await?;
        let found = this
            .context
            .run(
                &lua,
                "GetVersionAtTimeAsync",
                &this.name,
                move |backend| async move {
                    live_value(backend.read_version_at(&key, timestamp as i64).await?)
                },
            )
            .await?;
        value_and_info(&lua, found.as_ref())
    }

    async fn list_versions(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, direction, min_date, max_date, page_size): ListVersionsArgs,
    ) -> mlua::Result<Pages<VersionQuery>> {
        let key = this.entry_key(&lua, key)?;
        let descending = sort_direction(direction)?;
        let page_size = listing::page_size(page_size, listing::DEFAULT_VERSION_PAGE_SIZE)?;
        let bound = |date: Option<f64>, unbounded: i64| match date {
            None | Some(0.0) => unbounded,
            Some(ms) => ms as i64,
        };
        let query = VersionQuery {
            listing: VersionListing {
                key,
                descending,
                min_ms: bound(min_date, i64::MIN),
                max_ms: bound(max_date, i64::MAX),
                after_seq: None,
                limit: 0,
            },
            page_size,
            store_name: this.name.clone(),
        };
        Pages::first(&lua, Rc::clone(&this.context), query, Default::default()).await
    }

    async fn remove_version(
        this: UserDataRef<Self>,
        lua: Lua,
        (key, version): (Value, Value),
    ) -> mlua::Result<()> {
        let key = this.entry_key(&lua, key)?;
        let (version, seq) = this.version_argument("RemoveVersionAsync", version)?;
        this.spend(&lua, Family::RemoveVersion, "RemoveVersionAsync", &key)
            .await?;
        let remove_key = key.clone();
        this.context
            .run(
                &lua,
                "RemoveVersionAsync",
                &this.name,
                move |backend| async move {
                    let found = backend.read_version(&remove_key, seq).await?;
                    if found.is_some_and(|entry| version_string(&entry.version) == version) {
                        backend.remove_version(&remove_key, seq).await?;
                    }
                    Ok(())
                },
            )
            .await?;
        this.cache.forget(&key.scope, &key.key);
        Ok(())
    }

    async fn remove(this: UserDataRef<Self>, lua: Lua, key: Value) -> mlua::Result<MultiValue> {
        let key = this.entry_key(&lua, key)?;
        this.spend(&lua, Family::StandardRemove, "RemoveAsync", &key)
            .await?;
        let remove_key = key.clone();
        let removed = this
            .context
            .run(&lua, "RemoveAsync", &this.name, move |backend| async move {
                operations::remove(backend.as_ref(), &remove_key).await
            })
            .await?
            .map(|(value, entry)| (KnownValue::Decoded(value), KeyInfo::from_entry(&entry)));
        this.written(&lua, &key, None)?;
        value_and_info(&lua, removed.as_ref())
    }
}

/// Where a listing starts: after the position a cursor names, or at the beginning.
fn start_after(
    cursor: Option<String>,
    api: &'static str,
    store: &str,
) -> mlua::Result<(String, String)> {
    match cursor.as_deref() {
        None | Some("") => Ok((String::new(), String::new())),
        Some(cursor) => {
            listing::decode_cursor(cursor).ok_or_else(|| listing::invalid_cursor(api, store))
        }
    }
}

/// A GetAsync options argument: whether the object's cache may answer.
pub(crate) fn use_cache(options: &Value) -> mlua::Result<bool> {
    match options {
        Value::Nil => Ok(true),
        Value::UserData(options) => Ok(options
            .borrow::<DataStoreGetOptions>()
            .map_err(|_| cast_error(&Value::UserData(options.clone()), "DataStoreGetOptions"))?
            .use_cache
            .get()),
        other => Err(cast_error(other, "DataStoreGetOptions").into()),
    }
}

/// `ListVersionsAsync(key, sortDirection?, minDate?, maxDate?, pageSize?)`.
type ListVersionsArgs = (Value, Value, Option<f64>, Option<f64>, Option<f64>);

/// The value and key info of a version, or `None` when it is missing or a tombstone.
fn live_value(entry: Option<Entry>) -> Result<Option<(KnownValue, KeyInfo)>, OperationError> {
    match entry {
        Some(entry) if !entry.deleted => Ok(Some((
            KnownValue::Decoded(codec::decode(&entry.value)?),
            KeyInfo::from_entry(&entry),
        ))),
        _ => Ok(None),
    }
}

/// The value of an enum argument of `enum_name`, given as an item, its number or its name
/// (`names` lists the enum's names by value).
fn enum_value(value: &Value, enum_name: &'static str, names: &[&str]) -> mlua::Result<i64> {
    let number = match value {
        Value::UserData(item) if item.type_name()?.as_bytes() == b"EnumItem".as_slice() => {
            let of_enum: bool = item.call_method("IsA", enum_name)?;
            if !of_enum {
                return Err(cast_error(value, enum_name).into());
            }
            item.get::<i64>("Value")?
        }
        Value::Integer(n) => *n,
        Value::Number(n) if n.fract() == 0.0 => *n as i64,
        Value::String(name) => names
            .iter()
            .position(|candidate| name.as_bytes() == candidate.as_bytes())
            .ok_or_else(|| cast_error(value, enum_name))? as i64,
        Value::Nil => return Err(DataStoreError::ArgumentMissing(1).into()),
        other => return Err(cast_error(other, enum_name).into()),
    };
    if (0..names.len() as i64).contains(&number) {
        Ok(number)
    } else {
        Err(cast_error(value, enum_name).into())
    }
}

/// An `Enum.SortDirection` argument: true for Descending; nil means Ascending.
fn sort_direction(value: Value) -> mlua::Result<bool> {
    if value.is_nil() {
        return Ok(false);
    }
    Ok(enum_value(&value, "SortDirection", &["Ascending", "Descending"])? == 1)
}

/// An `Enum.DataStoreRequestType` argument.
fn request_type(value: Value) -> mlua::Result<RequestType> {
    const NAMES: [&str; 17] = [
        "GetAsync",
        "SetIncrementAsync",
        "UpdateAsync",
        "GetSortedAsync",
        "SetIncrementSortedAsync",
        "OnUpdate",
        "ListAsync",
        "GetVersionAsync",
        "RemoveVersionAsync",
        "StandardRead",
        "StandardWrite",
        "StandardList",
        "StandardRemove",
        "OrderedRead",
        "OrderedWrite",
        "OrderedList",
        "OrderedRemove",
    ];
    let number = enum_value(&value, "DataStoreRequestType", &NAMES)?;
    RequestType::from_enum_value(number)
        .ok_or_else(|| cast_error(&value, "DataStoreRequestType").into())
}

/// The sequence in a Roblox-shaped version string
/// (`<16 hex>.<10 digits>.<16 hex>.<2 digits>`), or `None` if it has another shape.
pub fn parse_version(text: &str) -> Option<i64> {
    let parts: Vec<&str> = text.split('.').collect();
    let hex = |part: &str| part.len() == 16 && part.bytes().all(|b| b.is_ascii_hexdigit());
    let digits = |part: &str, len| part.len() == len && part.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [created, seq, updated, tail]
            if hex(created) && digits(seq, 10) && hex(updated) && digits(tail, 2) =>
        {
            seq.parse().ok()
        }
        _ => None,
    }
}

/// `ListKeysAsync(prefix?, pageSize?, cursor?, excludeDeleted?)`.
type ListKeysArgs = (Option<String>, Option<f64>, Option<String>, Option<bool>);

/// The arguments shared by SetAsync and IncrementAsync: key, value (or delta), user ids and
/// an options object.
struct SetArgs {
    key: Value,
    value: Value,
    user_ids: Value,
    options: Option<AnyUserData>,
}

impl mlua::FromLuaMulti for SetArgs {
    fn from_lua_multi(values: MultiValue, lua: &Lua) -> mlua::Result<Self> {
        let (key, value, user_ids, options) =
            <(Value, Value, Value, Value)>::from_lua_multi(values, lua)?;
        let options = match options {
            Value::Nil => None,
            Value::UserData(options) => Some(options),
            other => return Err(cast_error(&other, "Instance").into()),
        };
        Ok(Self {
            key,
            value,
            user_ids,
            options,
        })
    }
}

/// Calls an UpdateAsync transform, which may not yield, and returns what it returned.
pub(crate) fn call_transform(
    transform: &Function,
    current: Value,
    info: Value,
) -> mlua::Result<MultiValue> {
    transform
        .call::<MultiValue>((current, info))
        .map_err(|error| {
            if blox_scheduler::error_message(&error).contains("attempt to yield") {
                DataStoreError::TransformYielded.into()
            } else {
                error
            }
        })
}

/// Calls an UpdateAsync transform. Returns `None` when it cancels (its first result is nil),
/// else the encoded value, user ids and metadata.
fn run_transform(
    lua: &Lua,
    transform: &Function,
    current: Value,
    info: Value,
) -> mlua::Result<Option<(String, String, String)>> {
    let mut results = call_transform(transform, current, info)?.into_iter();
    let value = results.next().unwrap_or(Value::Nil);
    match &value {
        Value::Nil => return Ok(None),
        Value::Function(_)
        | Value::Thread(_)
        | Value::UserData(_)
        | Value::LightUserData(_)
        | Value::Vector(_) => {
            return Err(DataStoreError::ValueNotAllowed(codec_type_name(&value)).into());
        }
        _ => {}
    }
    let encoded = codec::encode(lua, &value)?;
    let user_ids = user_ids_json(results.next().unwrap_or(Value::Nil))?;
    let metadata = metadata_json(lua, results.next().unwrap_or(Value::Nil))?;
    Ok(Some((encoded, user_ids, metadata)))
}

pub(crate) fn codec_type_name(value: &Value) -> String {
    match value {
        Value::UserData(userdata) => userdata
            .type_name()
            .map(|name| name.to_string_lossy())
            .unwrap_or_else(|_| "userdata".to_owned()),
        Value::Vector(_) => "Vector3".to_owned(),
        other => other.type_name().to_owned(),
    }
}

fn value_and_info(lua: &Lua, found: Option<&(KnownValue, KeyInfo)>) -> mlua::Result<MultiValue> {
    match found {
        Some((value, info)) => (value.to_lua(lua)?, info.clone()).into_lua_multi(lua),
        None => (Value::Nil, Value::Nil).into_lua_multi(lua),
    }
}

/// Validates a userIds argument and returns it as a JSON array.
fn user_ids_json(value: Value) -> Result<String, DataStoreError> {
    let table = match value {
        Value::Nil => return Ok("[]".to_owned()),
        Value::Table(table) => table,
        _ => return Err(DataStoreError::UserIdFormat),
    };
    let length = table.raw_len();
    let mut ids = Vec::with_capacity(length);
    for pair in table.pairs::<Value, Value>() {
        let (key, id) = pair.map_err(|_| DataStoreError::UserIdFormat)?;
        let position = match key {
            Value::Integer(i) => i as f64,
            Value::Number(n) => n,
            _ => return Err(DataStoreError::UserIdFormat),
        };
        let id = match id {
            Value::Integer(i) => i as f64,
            Value::Number(n) if n.is_finite() && n.fract() == 0.0 => n,
            _ => return Err(DataStoreError::UserIdFormat),
        };
        if position < 1.0 || position > length as f64 || position.fract() != 0.0 {
            return Err(DataStoreError::UserIdFormat);
        }
        ids.push((position as usize, id));
    }
    if ids.len() > USER_ID_LIMIT {
        return Err(DataStoreError::UserIdLimitExceeded);
    }
    ids.sort_by_key(|(position, _)| *position);
    let mut json = String::from("[");
    for (index, (_, id)) in ids.iter().enumerate() {
        if index > 0 {
            json.push(',');
        }
        codec::write_number(&mut json, *id);
    }
    json.push(']');
    Ok(json)
}

/// Validates a metadata dictionary and returns it as a JSON object.
fn metadata_json(lua: &Lua, value: Value) -> Result<String, DataStoreError> {
    let table = match value {
        Value::Nil => return Ok("{}".to_owned()),
        Value::Table(table) => table,
        _ => return Err(DataStoreError::MetadataFormat),
    };
    for pair in table.pairs::<Value, Value>() {
        let (key, item) = pair.map_err(|_| DataStoreError::MetadataFormat)?;
        let Value::String(key) = key else {
            return Err(DataStoreError::MetadataFormat);
        };
        if key.as_bytes().len() > METADATA_KEY_LIMIT {
            return Err(DataStoreError::AttributeSizeTooLarge(METADATA_KEY_LIMIT));
        }
        if codec::encode(lua, &item)?.len() > METADATA_VALUE_LIMIT {
            return Err(DataStoreError::AttributeSizeTooLarge(METADATA_VALUE_LIMIT));
        }
    }
    let json = codec::encode(lua, &Value::Table(table))?;
    if json.len() > METADATA_LIMIT {
        return Err(DataStoreError::AttributeSizeTooLarge(METADATA_LIMIT));
    }
    // An empty table encodes as an array; metadata is always a dictionary.
    Ok(if json == "[]" { "{}".to_owned() } else { json })
}

/// The metadata table held by a DataStoreSetOptions or DataStoreIncrementOptions.
fn options_metadata(options: Option<AnyUserData>, class: &'static str) -> mlua::Result<Value> {
    let Some(options) = options else {
        return Ok(Value::Nil);
    };
    let holder = options
        .borrow::<MetadataOptions>()
        .ok()
        .filter(|holder| holder.class == class)
        .ok_or_else(|| cast_error(&Value::UserData(options.clone()), class))?;
    Ok(holder
        .metadata
        .borrow()
        .clone()
        .map_or(Value::Nil, Value::Table))
}

/// Roblox's version string: object creation ticks, sequence, version ticks (reference §9.7).
///
/// Written digit by digit: every SetAsync returns one, and `format!`'s padded hex took more
/// instructions than the rest of the string's building (callgrind).
pub fn version_string(version: &Version) -> String {
    let ticks = |ms: i64| ms * 10_000 + UNIX_EPOCH_TICKS;
    let mut out = String::with_capacity(48);
    push_hex16(&mut out, ticks(version.created_ms));
    out.push('.');
    push_padded_decimal(&mut out, version.seq);
    out.push('.');
    push_hex16(&mut out, ticks(version.updated_ms));
    out.push_str(".01");
    out
}

/// `value` as 16 upper-case hex digits, as `{:016X}` writes it.
fn push_hex16(out: &mut String, value: i64) {
    let bits = value as u64;
    for shift in (0..16).rev() {
        out.push(char::from(
            b"0123456789ABCDEF"[(bits >> (shift * 4) & 0xF) as usize],
        ));
    }
}

/// A sequence number zero-padded to at least 10 digits, as `{:010}` writes it.
fn push_padded_decimal(out: &mut String, seq: i64) {
    match u64::try_from(seq) {
        Ok(seq) => codec::push_decimal(out, seq, 10),
        Err(_) => {
            let _ = std::fmt::Write::write_fmt(out, format_args!("{seq:010}"));
        }
    }
}

fn store_name(store: &DataStore) -> String {
    store.name.clone()
}

impl UserData for DataStore {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "DataStore", store_name);
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        instance_methods!(methods, "DataStore", store_name);
        methods.add_async_method("GetAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| DataStore::get(this, lua, args))
        });
        methods.add_async_method("SetAsync", |lua, this, args: SetArgs| {
            yielding(lua, |lua| DataStore::set(this, lua, args))
        });
        methods.add_async_method("UpdateAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| DataStore::update(this, lua, args))
        });
        methods.add_async_method("IncrementAsync", |lua, this, args: SetArgs| {
            yielding(lua, |lua| DataStore::increment(this, lua, args))
        });
        methods.add_async_method("RemoveAsync", |lua, this, key: Value| {
            yielding(lua, |lua| DataStore::remove(this, lua, key))
        });
        methods.add_async_method("ListKeysAsync", |lua, this, args: ListKeysArgs| {
            yielding(lua, |lua| DataStore::list_keys(this, lua, args))
        });
        methods.add_async_method("GetVersionAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| DataStore::get_version(this, lua, args))
        });
        methods.add_async_method(
            "GetVersionAtTimeAsync",
            |lua, this, args: (Value, Value)| {
                yielding(lua, |lua| DataStore::get_version_at_time(this, lua, args))
            },
        );
        methods.add_async_method("ListVersionsAsync", |lua, this, args: ListVersionsArgs| {
            yielding(lua, |lua| DataStore::list_versions(this, lua, args))
        });
        methods.add_async_method("RemoveVersionAsync", |lua, this, args: (Value, Value)| {
            yielding(lua, |lua| DataStore::remove_version(this, lua, args))
        });
        methods.add_method("OnUpdate", |lua, this, args: (Value, Value)| {
            this.on_update(lua, args)
        });
        methods.add_method("BatchGetAsync", |_, this, _: MultiValue| {
            Err::<(), _>(
                DataStoreError::BatchGetOnStandard {
                    store: this.name.clone(),
                }
                .into(),
            )
        });
    }
}

/// A key's value as this server knows it, in its read cache and for `OnUpdate`: still the
/// stored JSON text where the VM thread would have had to decode it, a value a call read (the
/// VM thread polls every call's work, and parsing the text straight into Luau skips building
/// and dropping a tree there) or wrote (a script rarely reads back what it just saved, so a
/// write does not pay for a decoded copy the cache would most likely drop unread); decoded
/// where a database thread read it (`OnUpdate` polling) or the value is a number at hand.
#[derive(Debug)]
pub(crate) enum KnownValue {
    /// Decoded already: read by background work on a database thread (`OnUpdate` polling),
    /// or a number at hand.
    Decoded(Stored),
    /// The stored JSON, parsed into Luau each time a script reads it.
    Text(String),
}

impl KnownValue {
    /// A fresh Luau value for a script.
    pub(crate) fn to_lua(&self, lua: &Lua) -> mlua::Result<Value> {
        match self {
            Self::Decoded(stored) => codec::to_lua(lua, stored),
            Self::Text(text) => codec::text_to_lua(lua, text),
        }
    }
}

/// `DataStoreKeyInfo`: the service metadata of one version.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    version: Version,
    /// The userIds as stored JSON; shared, since every GetAsync answered from one read or
    /// cache entry hands the script a key info of its own.
    user_ids: Arc<str>,
    /// The metadata as stored JSON; shared like `user_ids`.
    metadata: Arc<str>,
}

impl KeyInfo {
    /// The key info of a store without versions (an ordered store), which scripts never see.
    pub(crate) fn unversioned() -> Self {
        Self {
            version: Version {
                seq: 0,
                created_ms: 0,
                updated_ms: 0,
            },
            user_ids: "[]".into(),
            metadata: "{}".into(),
        }
    }

    /// The version this key info describes.
    pub(crate) fn version(&self) -> &Version {
        &self.version
    }

    pub(crate) fn from_entry(entry: &Entry) -> Self {
        Self {
            version: entry.version,
            user_ids: entry.user_ids.as_str().into(),
            metadata: entry.metadata.as_str().into(),
        }
    }
}

fn key_info_name(_: &KeyInfo) -> &'static str {
    "DataStoreKeyInfo"
}

impl UserData for KeyInfo {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "DataStoreKeyInfo", key_info_name);
        fields.add_field_method_get("CreatedTime", |_, info| Ok(info.version.created_ms));
        fields.add_field_method_get("UpdatedTime", |_, info| Ok(info.version.updated_ms));
        fields.add_field_method_get("Version", |_, info| Ok(version_string(&info.version)));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        instance_methods!(methods, "DataStoreKeyInfo", key_info_name);
        methods.add_method("GetUserIds", |lua, info, ()| {
            codec::to_lua(lua, &codec::decode(&info.user_ids)?)
        });
        methods.add_method("GetMetadata", |lua, info, ()| {
            codec::to_lua(lua, &codec::decode(&info.metadata)?)
        });
    }
}

/// `DataStoreOptions`: `AllScopes` and the no-longer-effective experimental features.
#[derive(Debug, Default)]
pub struct DataStoreOptions {
    all_scopes: Cell<bool>,
}

fn options_name(_: &DataStoreOptions) -> &'static str {
    "DataStoreOptions"
}

impl UserData for DataStoreOptions {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "DataStoreOptions", options_name);
        fields.add_field_method_get("AllScopes", |_, options| Ok(options.all_scopes.get()));
        fields.add_field_method_set("AllScopes", |_, options, value: bool| {
            options.all_scopes.set(value);
            Ok(())
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        instance_methods!(methods, "DataStoreOptions", options_name);
        methods.add_method("SetExperimentalFeatures", |_, _, _: Table| Ok(()));
    }
}

/// `DataStoreGetOptions`: `UseCache = false` makes GetAsync read the database even when the
/// object's cache holds a fresh answer.
#[derive(Debug)]
pub struct DataStoreGetOptions {
    use_cache: Cell<bool>,
}

fn get_options_name(_: &DataStoreGetOptions) -> &'static str {
    "DataStoreGetOptions"
}

impl UserData for DataStoreGetOptions {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "DataStoreGetOptions", get_options_name);
        fields.add_field_method_get("UseCache", |_, options| Ok(options.use_cache.get()));
        fields.add_field_method_set("UseCache", |_, options, value: bool| {
            options.use_cache.set(value);
            Ok(())
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        instance_methods!(methods, "DataStoreGetOptions", get_options_name);
    }
}

/// `DataStoreSetOptions` and `DataStoreIncrementOptions`: a metadata holder.
#[derive(Debug)]
pub struct MetadataOptions {
    class: &'static str,
    metadata: RefCell<Option<Table>>,
}

fn metadata_options_name(options: &MetadataOptions) -> &'static str {
    options.class
}

impl UserData for MetadataOptions {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field_method_get("ClassName", |_, options| Ok(options.class));
        fields.add_field_method_get("Name", |_, options| Ok(options.class));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, options, ()| {
            Ok(metadata_options_name(options))
        });
        methods.add_method("IsA", |_, options, class: String| {
            Ok(class == options.class || class == "Instance")
        });
        methods.add_method("SetMetadata", |lua, options, attributes: Value| {
            let Value::Table(attributes) = attributes else {
                return Err(DataStoreError::MetadataFormat.into());
            };
            metadata_json(lua, Value::Table(attributes.clone()))?;
            let copy = lua.create_table()?;
            for pair in attributes.pairs::<Value, Value>() {
                let (key, value) = pair?;
                copy.raw_set(key, value)?;
            }
            *options.metadata.borrow_mut() = Some(copy);
            Ok(())
        });
        methods.add_method("GetMetadata", |lua, options, ()| {
            let copy = lua.create_table()?;
            if let Some(metadata) = options.metadata.borrow().as_ref() {
                for pair in metadata.pairs::<Value, Value>() {
                    let (key, value) = pair?;
                    copy.raw_set(key, value)?;
                }
            }
            Ok(copy)
        });
    }
}

/// `Instance.new` for the DataStore option classes; `None` for any other class.
pub fn create_instance(lua: &Lua, class: &str) -> mlua::Result<Option<AnyUserData>> {
    Ok(Some(match class {
        "DataStoreOptions" => lua.create_userdata(DataStoreOptions::default())?,
        "DataStoreGetOptions" => lua.create_userdata(DataStoreGetOptions {
            use_cache: Cell::new(true),
        })?,
        "DataStoreSetOptions" | "DataStoreIncrementOptions" => {
            let class = if class == "DataStoreSetOptions" {
                "DataStoreSetOptions"
            } else {
                "DataStoreIncrementOptions"
            };
            lua.create_userdata(MetadataOptions {
                class,
                metadata: RefCell::default(),
            })?
        }
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_strings_are_padded_hex_and_decimal() {
        for (created_ms, seq, updated_ms) in [
            (0, 0, 0),
            (1_764_115_200_123, 1, 1_764_115_260_456),
            (1_764_115_200_123, 9_999_999_999, 1_764_115_200_124),
            (1_764_115_200_123, 12_345_678_901_234, 1_764_115_200_124),
            (-62_135_596_800_001, -5, i64::MAX / 20_000),
        ] {
            let version = Version {
                seq,
                created_ms,
                updated_ms,
            };
            let ticks = |ms: i64| ms * 10_000 + UNIX_EPOCH_TICKS;
            assert_eq!(
                version_string(&version),
                format!(
                    "{:016X}.{seq:010}.{:016X}.01",
                    ticks(created_ms),
                    ticks(updated_ms)
                )
            );
        }
    }
}
