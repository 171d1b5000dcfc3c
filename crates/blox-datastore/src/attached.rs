//! Database work polled by the Luau thread that awaits it, on the VM's own runtime.
//!
//! Spawning a call's work onto the database runtime and awaiting the join handle costs two
//! wake-ups across threads per call (VM thread -> database worker -> VM thread) that raw sqlx,
//! whose task polls its own query, never pays. So [`Attached`] polls every call's work on the
//! VM thread. A backend whose connections are sockets (PostgreSQL) gives each VM a lane of
//! its own ([`crate::backend::Backend::lane`]), whose connections open inside the VM's runtime
//! the first time a call of the VM uses them: its answers reach the VM thread without passing
//! a database worker. SQLite's connections and reader threads each run on a thread of their
//! own, which answers the VM thread directly. While an answer is outstanding the VM thread
//! polls its runtime briefly before it sleeps ([`blox_scheduler::Scheduler::expect_answer`]),
//! so an answer that comes fast finds it awake.
//!
//! ARCHITECTURE.md section 1 spawns database work onto the database runtime so that it never
//! depends on the VM thread; sessions 8 to 11 polled PostgreSQL's work on the VM thread inside
//! the database runtime's context (its sockets stayed with that runtime, every answer still
//! passed a database worker) and spawned SQLite's. With lanes, SQLite polled here and the
//! brief polling, GetAsync at 8 coroutines went from 0.59-0.64 to 0.81-1.15 of raw sqlx on
//! PostgreSQL and from 0.71-0.76 to 0.82-1.02 on SQLite across session 12's runs
//! (BENCHMARKS.md); neither the lanes nor the polling gained alone. What that costs: a lane's
//! sockets are driven only while the VM's runtime runs, so its connections serve that VM alone
//! (background work such as the purge task and `OnUpdate` polling keeps the shared connections
//! on the database runtime), and the lane closes with the VM; a VM busy with fast reads spends
//! part of a core polling.
//!
//! A call's work always finishes, as a request sent to Roblox's servers does, and never waits
//! on a thread that will not poll it again: it may hold a database connection or lead a batch
//! that other threads' requests wait for ([`crate::backend::batch`]). When the awaiting thread
//! is stopped (`task.cancel`, `coroutine.close`) the scheduler's stop hook, and when the
//! awaiting future is dropped its `Drop`, spawns the rest of the work onto the VM's runtime,
//! which drives its sockets. The hook is needed because mlua frees the future of a stopped
//! thread only when the garbage collector reaches the thread, which a quiet server may never
//! do. Work still running when the VM's runtime shuts down ends there, as a request in flight
//! when a Roblox server shuts down may or may not have been applied.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use blox_scheduler::{AnswerGuard, Scheduler, StopGuard};
use mlua::Lua;
use tokio::runtime::Handle;

/// The work of one call while the awaiting thread still polls it, and the mark that keeps the
/// VM thread polling for its answer.
type WorkCell<F> = Rc<RefCell<Option<(Pin<Box<F>>, AnswerGuard)>>>;

/// `work`, polled by the calling Luau thread on the VM's runtime; finished there, unawaited,
/// if that thread is stopped or the future dropped first.
pub(crate) struct Attached<F>
where
    F: Future + Send + 'static,
{
    runtime: Handle,
    work: WorkCell<F>,
    _stop: StopGuard,
}

impl<F> Attached<F>
where
    F: Future + Send + 'static,
{
    /// Attaches `work` to the Luau thread running in `lua` now, on the runtime it runs in.
    pub(crate) fn new(lua: &Lua, work: F) -> Self {
        let runtime = Handle::current();
        let scheduler = Scheduler::of(lua);
        let work: WorkCell<F> = Rc::new(RefCell::new(Some((
            Box::pin(work),
            scheduler.expect_answer(),
        ))));
        let stop = scheduler.on_stop(&lua.current_thread(), {
            let (runtime, work) = (runtime.clone(), Rc::clone(&work));
            move || finish_on(&runtime, &work)
        });
        Self {
            runtime,
            work,
            _stop: stop,
        }
    }
}

/// Spawns what is left of `work` onto `runtime`, to run to its end unawaited.
fn finish_on<F>(runtime: &Handle, work: &WorkCell<F>)
where
    F: Future + Send + 'static,
{
    if let Some((work, _answer)) = work.borrow_mut().take() {
        drop(runtime.spawn(async move {
            work.await;
        }));
    }
}

impl<F> Future for Attached<F>
where
    F: Future + Send + 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<F::Output> {
        let mut work = self.work.borrow_mut();
        // Empty once the thread was stopped: nothing resumes a stopped thread, so its call
        // never completes.
        let Some((running, _)) = work.as_mut() else {
            return Poll::Pending;
        };
        let polled = running.as_mut().poll(context);
        if polled.is_ready() {
            *work = None;
        }
        polled
    }
}

impl<F> Drop for Attached<F>
where
    F: Future + Send + 'static,
{
    fn drop(&mut self) {
        finish_on(&self.runtime, &self.work);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use blox_scheduler::ManualClock;

    use super::*;

    fn vm_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a VM runtime")
    }

    fn lua_with_scheduler() -> Lua {
        let lua = Lua::new();
        Scheduler::attach(&lua, Rc::new(ManualClock::default())).expect("a scheduler");
        lua
    }

    #[test]
    fn a_socket_opened_by_attached_work_belongs_to_the_vm_runtime() {
        let lua = lua_with_scheduler();
        let vm = vm_runtime();
        let (listener, address) = vm.block_on(async {
            let listener = Attached::new(&lua, async {
                tokio::net::TcpListener::bind("127.0.0.1:0").await
            })
            .await
            .expect("a listener");
            let address = listener.local_addr().expect("an address");
            (listener, address)
        });
        let accepted = vm.block_on(async move {
            let (accepted, connected) =
                tokio::join!(listener.accept(), tokio::net::TcpStream::connect(address));
            accepted.is_ok() && connected.is_ok()
        });
        assert!(accepted, "the VM's runtime drives the socket");
    }

    #[test]
    fn work_dropped_mid_call_finishes_on_the_vm_runtime() {
        let lua = lua_with_scheduler();
        let finished = Arc::new(AtomicBool::new(false));
        let work = {
            let finished = Arc::clone(&finished);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                finished.store(true, Ordering::SeqCst);
            }
        };
        let vm = vm_runtime();
        vm.block_on(async {
            let call = Attached::new(&lua, work);
            let abandoned = tokio::time::timeout(Duration::from_millis(1), call).await;
            assert!(abandoned.is_err(), "the work was still running");
            assert!(!finished.load(Ordering::SeqCst));
            tokio::time::timeout(Duration::from_secs(5), async {
                while !finished.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the work finished unawaited");
        });
    }

    #[test]
    fn work_of_a_stopped_thread_finishes_on_the_vm_runtime() {
        let lua = lua_with_scheduler();
        let finished = Arc::new(AtomicBool::new(false));
        let vm = vm_runtime();
        vm.block_on(async {
            let scheduler = Scheduler::of(&lua);
            let work = {
                let finished = Arc::clone(&finished);
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    finished.store(true, Ordering::SeqCst);
                }
            };
            let work = RefCell::new(Some(work));
            let call = lua
                .create_async_function(move |lua, ()| {
                    let work = Attached::new(&lua, work.borrow_mut().take().expect("one call"));
                    async move {
                        work.await;
                        Ok(())
                    }
                })
                .expect("a function");
            let thread = lua.create_thread(call).expect("a thread");
            scheduler
                .spawn(thread.clone(), mlua::MultiValue::new())
                .expect("started");
            scheduler.cancel(&thread);
            tokio::time::timeout(Duration::from_secs(5), async {
                while !finished.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the stopped thread's work finished");
        });
    }
}
