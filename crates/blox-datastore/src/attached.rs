//! Database work polled by the Luau thread that awaits it, inside the database runtime's
//! context.
//!
//! Spawning a call's work onto the database runtime and awaiting the join handle costs two
//! wake-ups across threads per call (VM thread -> database worker -> VM thread) that raw sqlx,
//! whose task polls its own query, never pays; on PostgreSQL, where the work is socket I/O,
//! polling it where it is awaited was worth a third more GetAsync calls per second at 8
//! coroutines (BENCHMARKS.md, session 8). [`Attached`] polls the work on the VM thread, but
//! with the database runtime entered for every poll, so whatever the work opens (sockets,
//! timers) registers with the database runtime's drivers, which its worker threads run: a
//! connection first opened by a VM-thread call belongs to the database runtime like every
//! other, outlives the VM's own runtime, and serves the purge task and `OnUpdate` polling
//! without waiting for the VM thread.
//!
//! A call's work always finishes, as a request sent to Roblox's servers does, and never waits
//! on a thread that will not poll it again: it may hold a database connection or lead a batch
//! that other threads' requests wait for ([`crate::backend::batch`]). When the awaiting thread
//! is stopped (`task.cancel`, `coroutine.close`) the scheduler's stop hook, and when the
//! awaiting future is dropped (the VM closes) its `Drop`, spawns the rest of the work onto the
//! database runtime. The hook is needed because mlua frees the future of a stopped thread only
//! when the garbage collector reaches the thread, which a quiet server may never do.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use blox_scheduler::{Scheduler, StopGuard};
use mlua::Lua;
use tokio::runtime::Handle;

/// The work of one call, while the awaiting thread still polls it.
type WorkCell<F> = Rc<RefCell<Option<Pin<Box<F>>>>>;

/// `work`, polled by the calling Luau thread inside `runtime`'s context; finished on `runtime`
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
    /// Attaches `work` to the Luau thread running in `lua` now.
    pub(crate) fn new(lua: &Lua, runtime: Handle, work: F) -> Self {
        let work: WorkCell<F> = Rc::new(RefCell::new(Some(Box::pin(work))));
        let stop = Scheduler::of(lua).on_stop(&lua.current_thread(), {
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
    if let Some(work) = work.borrow_mut().take() {
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
        let Some(running) = work.as_mut() else {
            return Poll::Pending;
        };
        let polled = {
            let _entered = self.runtime.enter();
            running.as_mut().poll(context)
        };
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

    fn database_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a database runtime")
    }

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
    fn a_socket_opened_by_attached_work_serves_the_database_runtime_after_the_vm_ends() {
        let database = database_runtime();
        let lua = lua_with_scheduler();
        let vm = vm_runtime();
        let listener = vm
            .block_on(Attached::new(&lua, database.handle().clone(), async {
                tokio::net::TcpListener::bind("127.0.0.1:0").await
            }))
            .expect("a listener");
        drop(vm);
        let address = listener.local_addr().expect("an address");
        let connected = database.block_on(async move {
            let (accepted, connected) =
                tokio::join!(listener.accept(), tokio::net::TcpStream::connect(address));
            accepted.is_ok() && connected.is_ok()
        });
        assert!(connected);
    }

    #[test]
    fn work_dropped_mid_call_finishes_on_the_database_runtime() {
        let database = database_runtime();
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
            let call = Attached::new(&lua, database.handle().clone(), work);
            let abandoned = tokio::time::timeout(Duration::from_millis(1), call).await;
            assert!(abandoned.is_err(), "the work was still running");
        });
        drop(vm);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !finished.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the work never finished"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
