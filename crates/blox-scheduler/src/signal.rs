//! `RBXScriptSignal` and `RBXScriptConnection`: events that Luau code connects to or waits on.
//!
//! Firing a signal starts every connected handler in a thread of its own, immediately, as
//! Roblox does, so a handler that yields (a DataStore call in `PlayerAdded`) never holds up the
//! others or the code that fired the signal.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use mlua::{
    Function, Lua, MetaMethod, MultiValue, Thread, UserData, UserDataFields, UserDataMethods,
};
use tokio::sync::oneshot;

use crate::Scheduler;

#[derive(Default)]
struct SignalState {
    next_id: u64,
    connections: Vec<(u64, Function, bool)>,
    waiters: Vec<oneshot::Sender<MultiValue>>,
}

/// An event source. Cloning it gives another handle to the same signal.
#[derive(Clone, Default)]
pub struct Signal(Rc<RefCell<SignalState>>);

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal")
            .field("connections", &self.0.borrow().connections.len())
            .finish_non_exhaustive()
    }
}

impl Signal {
    /// A signal with no connections.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts every connected handler with `args` and resumes every thread waiting on it.
    pub fn fire(&self, lua: &Lua, args: MultiValue) -> mlua::Result<()> {
        self.fire_tracked(lua, args).map(drop)
    }

    /// Like [`Signal::fire`], and returns the handlers' threads, so the caller can tell when
    /// they have all finished (a player's `PlayerRemoving` saves before the same user's next
    /// session loads).
    pub fn fire_tracked(&self, lua: &Lua, args: MultiValue) -> mlua::Result<Vec<Thread>> {
        let (handlers, waiters) = {
            let mut state = self.0.borrow_mut();
            let handlers: Vec<Function> = state.connections.iter().map(|c| c.1.clone()).collect();
            state.connections.retain(|(_, _, once)| !once);
            (handlers, std::mem::take(&mut state.waiters))
        };
        let scheduler = Scheduler::of(lua);
        let mut threads = Vec::with_capacity(handlers.len());
        for handler in handlers {
            let thread = lua.create_thread(handler)?;
            scheduler.spawn(thread.clone(), args.clone())?;
            threads.push(thread);
        }
        for waiter in waiters {
            let _ = waiter.send(args.clone());
        }
        Ok(threads)
    }

    /// True when at least one handler is connected or one thread waits.
    pub fn is_observed(&self) -> bool {
        let state = self.0.borrow();
        !state.connections.is_empty() || !state.waiters.is_empty()
    }

    /// Disconnects every handler (an Instance's signals, when it is destroyed).
    pub fn disconnect_all(&self) {
        self.0.borrow_mut().connections.clear();
    }

    /// Connects `handler`, as `Connect` does from Luau.
    pub fn connect(&self, handler: Function) -> SignalConnection {
        self.connect_with(handler, false)
    }

    fn connect_with(&self, handler: Function, once: bool) -> SignalConnection {
        let mut state = self.0.borrow_mut();
        state.next_id += 1;
        let id = state.next_id;
        state.connections.push((id, handler, once));
        SignalConnection {
            signal: Rc::downgrade(&self.0),
            id,
        }
    }
}

impl UserData for Signal {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "RBXScriptSignal");
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("Connect", |_, signal, handler: Function| {
            Ok(signal.connect_with(handler, false))
        });
        methods.add_method("Once", |_, signal, handler: Function| {
            Ok(signal.connect_with(handler, true))
        });
        methods.add_async_method("Wait", |_, signal, ()| {
            let (sender, receiver) = oneshot::channel();
            signal.0.borrow_mut().waiters.push(sender);
            async move { Ok(receiver.await.unwrap_or_default()) }
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("Signal"));
    }
}

/// One handler's connection to a [`Signal`].
pub struct SignalConnection {
    signal: Weak<RefCell<SignalState>>,
    id: u64,
}

impl SignalConnection {
    fn is_connected(&self) -> bool {
        self.signal.upgrade().is_some_and(|state| {
            state
                .borrow()
                .connections
                .iter()
                .any(|(id, _, _)| *id == self.id)
        })
    }
}

impl UserData for SignalConnection {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "RBXScriptConnection");
        fields.add_field_method_get("Connected", |_, connection| Ok(connection.is_connected()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("Disconnect", |_, connection, ()| {
            if let Some(state) = connection.signal.upgrade() {
                state
                    .borrow_mut()
                    .connections
                    .retain(|(id, _, _)| *id != connection.id);
            }
            Ok(())
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("Connection"));
    }
}
