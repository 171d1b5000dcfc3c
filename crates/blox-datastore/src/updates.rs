//! `OnUpdate` (deprecated, still used): callbacks when a key changes, as Roblox runs them.
//!
//! Writes made on this server fire the key's callbacks at once. Writes made by other servers
//! are found by polling once a minute, as Roblox documents: every 60 seconds the keys that
//! have callbacks are read on the database runtime, and a key whose version differs from the
//! last one this server saw fires with its new value. The poll runs from a frame hook and
//! never blocks the VM; a watched key's first poll only records where it stands, and a key this
//! server wrote while the poll was reading is left to the next poll (the poll's answer may be
//! older than the write the callbacks already saw).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use blox_scheduler::{Scheduler, Signal};
use mlua::{IntoLuaMulti, Lua, Value};
use tokio::sync::oneshot;

use crate::backend::{Entry, EntryKey, StoreKind};
use crate::codec;
use crate::service::{DataStoreContext, KeyInfo, KnownValue};

/// How often other servers' writes are looked for (Roblox: once per minute).
pub const POLL_INTERVAL: Duration = Duration::from_secs(60);

/// What a poll found: each watched key's current row.
type PollResult = Vec<(EntryKey, Option<Entry>)>;

/// The `OnUpdate` state of one server.
#[derive(Default)]
pub(crate) struct UpdateWatch {
    signals: RefCell<HashMap<EntryKey, Signal>>,
    /// The version of each watched key this server last saw (None: absent or removed).
    seen: RefCell<HashMap<EntryKey, Option<i64>>>,
    /// Keys this server wrote since the running poll started: what the poll read of them may
    /// be older than what the callbacks already saw, so the poll leaves them alone.
    written_during_poll: RefCell<HashSet<EntryKey>>,
    polling: Cell<bool>,
    last_poll: Cell<Option<Duration>>,
    pending: RefCell<Option<oneshot::Receiver<PollResult>>>,
}

impl std::fmt::Debug for UpdateWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateWatch")
            .field("keys", &self.signals.borrow().len())
            .finish_non_exhaustive()
    }
}

impl UpdateWatch {
    /// The signal `OnUpdate` connects to for `key`; starts polling on first use.
    pub(crate) fn signal(context: &Rc<DataStoreContext>, lua: &Lua, key: EntryKey) -> Signal {
        let watch = context.updates();
        if !watch.polling.replace(true) {
            let context = Rc::clone(context);
            Scheduler::of(lua).on_frame(move |lua, _| context.updates().poll(&context, lua));
        }
        watch.signals.borrow_mut().entry(key).or_default().clone()
    }

    /// Fires `key`'s callbacks with its new state (nil after a removal), and remembers the
    /// version so the next poll does not report it again.
    pub(crate) fn notify(
        &self,
        lua: &Lua,
        key: &EntryKey,
        state: Option<&(KnownValue, KeyInfo)>,
    ) -> mlua::Result<()> {
        let signal = self.signals.borrow().get(key).cloned();
        let Some(signal) = signal.filter(Signal::is_observed) else {
            return Ok(());
        };
        self.seen
            .borrow_mut()
            .insert(key.clone(), state.map(|(_, info)| info.version().seq));
        self.written_during_poll.borrow_mut().insert(key.clone());
        let args = match state {
            // Ordered stores have no key info: their callbacks get the value alone.
            Some((value, _)) if key.kind == StoreKind::Ordered => {
                value.to_lua(lua)?.into_lua_multi(lua)?
            }
            Some((value, info)) => (value.to_lua(lua)?, info.clone()).into_lua_multi(lua)?,
            None => (Value::Nil, Value::Nil).into_lua_multi(lua)?,
        };
        signal.fire(lua, args)
    }

    /// Once a frame: starts a poll when one is due, and handles a finished one.
    fn poll(&self, context: &DataStoreContext, lua: &Lua) -> mlua::Result<()> {
        let finished = {
            let mut pending = self.pending.borrow_mut();
            match pending.as_mut().map(oneshot::Receiver::try_recv) {
                Some(Ok(rows)) => {
                    *pending = None;
                    Some(rows)
                }
                Some(Err(oneshot::error::TryRecvError::Closed)) => {
                    *pending = None;
                    None
                }
                _ => None,
            }
        };
        if let Some(rows) = finished {
            self.report_changes(lua, rows)?;
        }
        let now = Scheduler::of(lua).now();
        let due = self
            .last_poll
            .get()
            .is_none_or(|last| now.saturating_sub(last) >= POLL_INTERVAL);
        if !due || self.pending.borrow().is_some() {
            return Ok(());
        }
        let keys: Vec<EntryKey> = self
            .signals
            .borrow()
            .iter()
            .filter(|(_, signal)| signal.is_observed())
            .map(|(key, _)| key.clone())
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        self.last_poll.set(Some(now));
        self.written_during_poll.borrow_mut().clear();
        let (send, receive) = oneshot::channel();
        *self.pending.borrow_mut() = Some(receive);
        context.spawn_detached(move |backend| async move {
            let mut rows = Vec::with_capacity(keys.len());
            for key in keys {
                match backend.read(&key).await {
                    Ok(row) => rows.push((key, row)),
                    Err(error) => tracing::warn!(%error, "polling an OnUpdate key failed"),
                }
            }
            let _ = send.send(rows);
        });
        Ok(())
    }

    /// Fires the callbacks of the keys whose version moved since this server last saw them.
    fn report_changes(&self, lua: &Lua, rows: PollResult) -> mlua::Result<()> {
        for (key, row) in rows {
            if self.written_during_poll.borrow().contains(&key) {
                // The next poll looks again; a later write by another server is reported then.
                continue;
            }
            let live = row.filter(|entry| !entry.deleted);
            let version = live.as_ref().map(|entry| entry.version.seq);
            let previous = self.seen.borrow_mut().insert(key.clone(), version);
            let Some(previous) = previous else {
                continue;
            };
            if previous == version {
                continue;
            }
            let state = match live {
                Some(entry) => match codec::decode(&entry.value) {
                    Ok(value) => Some((KnownValue::Decoded(value), KeyInfo::from_entry(&entry))),
                    Err(_) => continue,
                },
                None => None,
            };
            self.notify(lua, &key, state.as_ref())?;
        }
        Ok(())
    }
}
