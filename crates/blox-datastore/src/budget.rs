//! Per-server request budgets and the four throttle queues (reference §8, §10.4, §10.7).
//!
//! Roblox gives each server a budget per request family (`StandardRead`, `OrderedWrite`, …)
//! that refills continuously at `base + perPlayer × players` requests per minute, starts with
//! a one-time burst, and is spent by every request that reaches the backend (GetAsync cache
//! hits are free). A request over budget waits, first come first served within its family, in
//! one of four queues (Get, Set,
//! OrderedGet, OrderedSet) of 30 requests, with Roblox's warning; when its queue is full it
//! fails with the family's `GameServerThrottled` error. Scripts tune and read this with
//! `SetRateLimitForRequestType` and `GetRequestBudgetForRequestType`, and libraries pace
//! themselves by it, so Blox reproduces it. Self-hosters whose database takes more can scale
//! every budget or turn throttling off ([`Throttling`]).
//!
//! Budgets are plain numbers on the VM thread (`Cell`/`RefCell`): every DataStore call is
//! made from there, and time comes from the scheduler's clock, so tests control it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::Duration;

use mlua::Lua;

use crate::DataStoreError;
use blox_scheduler::Scheduler;

/// The budgeted request families: the modern `Enum.DataStoreRequestType` values, plus the
/// deprecated RemoveVersionAsync, which keeps a budget of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// DataStore GetAsync, GetVersionAsync, GetVersionAtTimeAsync, UpdateAsync's read.
    StandardRead,
    /// DataStore SetAsync, IncrementAsync, UpdateAsync's write.
    StandardWrite,
    /// ListDataStoresAsync, ListKeysAsync, ListVersionsAsync and their next pages.
    StandardList,
    /// DataStore RemoveAsync.
    StandardRemove,
    /// Ordered GetAsync, BatchGetAsync (one per key), UpdateAsync's read.
    OrderedRead,
    /// Ordered SetAsync, IncrementAsync, UpdateAsync's write.
    OrderedWrite,
    /// GetSortedAsync and its next pages.
    OrderedList,
    /// Ordered RemoveAsync.
    OrderedRemove,
    /// RemoveVersionAsync (deprecated).
    RemoveVersion,
}

const FAMILIES: usize = 9;

/// One of Roblox's four throttle queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Get,
    Set,
    OrderedGet,
    OrderedSet,
}

/// Requests one queue holds before new ones fail.
pub const QUEUE_CAPACITY: usize = 30;

/// The budget a family may bank: three minutes of its rate, which is also the start-up burst
/// (Roblox documents a burst without its size; community measurements give 3×).
const BANKED_MINUTES: f64 = 3.0;

/// How often a queued request looks again when its family's rate is zero.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

impl Family {
    fn index(self) -> usize {
        self as usize
    }

    /// Roblox's default limit: (base, per player) requests per minute (§10.4).
    fn default_limit(self) -> (f64, f64) {
        match self {
            Self::StandardRead | Self::StandardWrite | Self::StandardRemove => (60.0, 40.0),
            Self::OrderedRead => (60.0, 40.0),
            Self::OrderedWrite | Self::OrderedRemove => (30.0, 5.0),
            Self::StandardList | Self::OrderedList | Self::RemoveVersion => (5.0, 2.0),
        }
    }

    fn queue(self) -> Queue {
        match self {
            Self::StandardRead | Self::StandardList => Queue::Get,
            Self::StandardWrite | Self::StandardRemove | Self::RemoveVersion => Queue::Set,
            Self::OrderedRead | Self::OrderedList => Queue::OrderedGet,
            Self::OrderedWrite | Self::OrderedRemove => Queue::OrderedSet,
        }
    }

    /// The name in the family's throttle error.
    fn name(self) -> &'static str {
        match self {
            Self::StandardRead => "StandardRead",
            Self::StandardWrite => "StandardWrite",
            Self::StandardList => "StandardList",
            Self::StandardRemove => "StandardRemove",
            Self::OrderedRead => "OrderedRead",
            Self::OrderedWrite => "OrderedWrite",
            Self::OrderedList => "OrderedList",
            Self::OrderedRemove => "OrderedRemove",
            Self::RemoveVersion => "RemoveVersionAsync",
        }
    }
}

/// What an `Enum.DataStoreRequestType` value stands for here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// A family with its own budget, and the ranges `SetRateLimitForRequestType` accepts
    /// for it through this enum value: (max base, max per player).
    Budgeted(Family, (u32, u32)),
    /// Legacy `UpdateAsync`: spends a read and a write; its budget is the smaller of the two.
    Update,
    /// Legacy `OnUpdate`: not throttled here; reports Roblox's nominal 30 + 5 per player.
    OnUpdate,
}

impl RequestType {
    /// The request type of an `Enum.DataStoreRequestType` value; `None` if there is none.
    pub fn from_enum_value(value: i64) -> Option<Self> {
        use Family::*;
        const MODERN: (u32, u32) = (10_000, 200);
        Some(match value {
            0 => Self::Budgeted(StandardRead, (60, 40)),
            1 => Self::Budgeted(StandardWrite, (60, 40)),
            2 => Self::Update,
            3 => Self::Budgeted(OrderedList, (5, 2)),
            4 => Self::Budgeted(OrderedWrite, (30, 5)),
            5 => Self::OnUpdate,
            6 => Self::Budgeted(StandardList, (5, 2)),
            7 => Self::Budgeted(StandardRead, (5, 2)),
            8 => Self::Budgeted(RemoveVersion, (5, 2)),
            9 => Self::Budgeted(StandardRead, MODERN),
            10 => Self::Budgeted(StandardWrite, MODERN),
            11 => Self::Budgeted(StandardList, MODERN),
            12 => Self::Budgeted(StandardRemove, MODERN),
            13 => Self::Budgeted(OrderedRead, MODERN),
            14 => Self::Budgeted(OrderedWrite, MODERN),
            15 => Self::Budgeted(OrderedList, MODERN),
            16 => Self::Budgeted(OrderedRemove, MODERN),
            _ => return None,
        })
    }
}

/// The server setting for throttling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Throttling {
    /// Roblox's budgets, each multiplied by this factor (1.0: exactly Roblox's).
    Scaled(f64),
    /// No budgets and no queues: every request goes straight to the database.
    Off,
}

impl Default for Throttling {
    fn default() -> Self {
        Self::Scaled(1.0)
    }
}

impl std::str::FromStr for Throttling {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        match text.parse::<f64>() {
            Ok(scale) if scale.is_finite() && scale > 0.0 => Ok(Self::Scaled(scale)),
            _ => Err(format!("expected off or a positive factor, got {text:?}")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    base: f64,
    per_player: f64,
    tokens: f64,
    /// When the bucket was last refilled; `None` until its first use, so the start-up burst
    /// is there whenever the server's clock started.
    refilled_at: Option<Duration>,
}

/// The budgets and queues of one server.
#[derive(Debug)]
pub struct RequestBudgets {
    throttling: Throttling,
    players: Cell<u32>,
    buckets: RefCell<[Bucket; FAMILIES]>,
    queues: RefCell<[VecDeque<(u64, Family)>; 4]>,
    next_ticket: Cell<u64>,
}

const ALL_FAMILIES: [Family; FAMILIES] = [
    Family::StandardRead,
    Family::StandardWrite,
    Family::StandardList,
    Family::StandardRemove,
    Family::OrderedRead,
    Family::OrderedWrite,
    Family::OrderedList,
    Family::OrderedRemove,
    Family::RemoveVersion,
];

impl RequestBudgets {
    /// Full budgets: the start-up burst.
    pub fn new(throttling: Throttling) -> Self {
        let scale = match throttling {
            Throttling::Scaled(scale) => scale,
            Throttling::Off => 1.0,
        };
        let buckets = ALL_FAMILIES.map(|family| {
            let (base, per_player) = family.default_limit();
            Bucket {
                base,
                per_player,
                tokens: base * scale * BANKED_MINUTES,
                refilled_at: None,
            }
        });
        Self {
            throttling,
            players: Cell::new(0),
            buckets: RefCell::new(buckets),
            queues: RefCell::default(),
            next_ticket: Cell::new(0),
        }
    }

    /// Sets the live player count that budgets scale with.
    pub fn set_players(&self, players: u32) {
        self.players.set(players);
    }

    /// Requests per minute a bucket refills at.
    fn rate(&self, bucket: &Bucket) -> f64 {
        let scale = match self.throttling {
            Throttling::Scaled(scale) => scale,
            Throttling::Off => 1.0,
        };
        (bucket.base + bucket.per_player * f64::from(self.players.get())) * scale
    }

    /// The family's bucket, refilled up to `now`.
    fn refill(&self, family: Family, now: Duration) -> Bucket {
        let mut buckets = self.buckets.borrow_mut();
        let rate = self.rate(&buckets[family.index()]);
        let bucket = &mut buckets[family.index()];
        let elapsed = bucket
            .refilled_at
            .map_or(0.0, |then| now.saturating_sub(then).as_secs_f64());
        bucket.tokens = (bucket.tokens + elapsed * rate / 60.0).min(rate * BANKED_MINUTES);
        bucket.refilled_at = Some(now);
        *bucket
    }

    /// What `GetRequestBudgetForRequestType` reports for `request` at `now`.
    pub fn available(&self, request: RequestType, now: Duration) -> i64 {
        let tokens = |family| self.refill(family, now).tokens.floor() as i64;
        match request {
            RequestType::Budgeted(family, _) => tokens(family),
            RequestType::Update => tokens(Family::StandardRead).min(tokens(Family::StandardWrite)),
            RequestType::OnUpdate => 30 + 5 * i64::from(self.players.get()),
        }
    }

    /// `SetRateLimitForRequestType`: validates the limits against the ranges of the enum
    /// value used and replaces the family's per-minute limit at once.
    pub fn set_limit(
        &self,
        request: RequestType,
        base: f64,
        per_player: f64,
        now: Duration,
    ) -> Result<(), DataStoreError> {
        let RequestType::Budgeted(family, (max_base, max_per_player)) = request else {
            return Err(DataStoreError::RateLimitNotConfigurable);
        };
        let within =
            |value: f64, max: u32| value.fract() == 0.0 && (0.0..=f64::from(max)).contains(&value);
        if !within(base, max_base) {
            return Err(DataStoreError::RateLimitOutOfRange {
                parameter: "baseLimit",
                max: max_base,
            });
        }
        if !within(per_player, max_per_player) {
            return Err(DataStoreError::RateLimitOutOfRange {
                parameter: "perPlayerLimit",
                max: max_per_player,
            });
        }
        self.refill(family, now);
        let mut buckets = self.buckets.borrow_mut();
        let bucket = &mut buckets[family.index()];
        bucket.base = base;
        bucket.per_player = per_player;
        let rate = self.rate(bucket);
        bucket.tokens = bucket.tokens.min(rate * BANKED_MINUTES);
        Ok(())
    }

    /// Takes `cost` from the family's budget if the budget holds it and it is this request's
    /// turn: the first of its family in its queue (`ticket`), or, for a request not queued,
    /// when none of its family waits.
    fn try_take(&self, family: Family, cost: f64, now: Duration, ticket: Option<u64>) -> bool {
        let queue_turn = {
            let queues = self.queues.borrow();
            let first_waiting = queues[family.queue() as usize]
                .iter()
                .find(|(_, waiting)| *waiting == family)
                .map(|(ticket, _)| *ticket);
            first_waiting == ticket
        };
        if !queue_turn || self.refill(family, now).tokens < cost {
            return false;
        }
        self.buckets.borrow_mut()[family.index()].tokens -= cost;
        true
    }

    /// How long until the family's budget holds `cost`, at its current rate.
    fn time_until(&self, family: Family, cost: f64, now: Duration) -> Duration {
        let bucket = self.refill(family, now);
        let rate = self.rate(&bucket);
        if rate <= 0.0 {
            return IDLE_RECHECK;
        }
        let missing = (cost - bucket.tokens).max(0.0);
        Duration::from_secs_f64(missing * 60.0 / rate).clamp(Duration::from_millis(1), IDLE_RECHECK)
    }

    /// Spends `cost` requests of `family` for a call of `api` on `key`: at once when the
    /// budget allows, else after waiting in the family's queue, or not at all (the throttle
    /// error) when that queue is full.
    pub async fn acquire(
        &self,
        lua: &Lua,
        family: Family,
        cost: u32,
        api: &'static str,
        store: &str,
        key: &str,
    ) -> mlua::Result<()> {
        if self.throttling == Throttling::Off {
            return Ok(());
        }
        let scheduler = Scheduler::of(lua);
        let cost = f64::from(cost);
        if self.try_take(family, cost, scheduler.now(), None) {
            return Ok(());
        }
        let queue = family.queue() as usize;
        if self.queues.borrow()[queue].len() >= QUEUE_CAPACITY {
            return Err(DataStoreError::GameServerThrottled {
                family: family.name(),
                api,
                store: store.to_owned(),
            }
            .into());
        }
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        self.queues.borrow_mut()[queue].push_back((ticket, family));
        let place = QueuePlace {
            budgets: self,
            queue,
            ticket,
        };
        let warn: mlua::Function = lua.globals().get("warn")?;
        warn.call::<()>(format!(
            "DataStore request was added to queue. If request queue fills, further requests will be dropped. Try sending fewer requests.Key = {key}"
        ))?;
        loop {
            let now = scheduler.now();
            if self.try_take(family, cost, now, Some(ticket)) {
                drop(place);
                return Ok(());
            }
            scheduler.sleep(self.time_until(family, cost, now)).await;
        }
    }
}

/// A request's place in a queue; leaving (served, or its thread cancelled) frees it.
struct QueuePlace<'a> {
    budgets: &'a RequestBudgets,
    queue: usize,
    ticket: u64,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.budgets.queues.borrow_mut()[self.queue].retain(|(t, _)| *t != self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn budgets_start_with_a_burst_refill_by_rate_and_cap() {
        let budgets = RequestBudgets::new(Throttling::default());
        let read = RequestType::from_enum_value(9).unwrap();
        assert_eq!(
            budgets.available(read, Duration::ZERO),
            180,
            "3 minutes of 60/min"
        );
        for _ in 0..180 {
            assert!(budgets.try_take(Family::StandardRead, 1.0, Duration::ZERO, None));
        }
        assert!(!budgets.try_take(Family::StandardRead, 1.0, Duration::ZERO, None));
        assert_eq!(
            budgets.available(read, SECOND * 30),
            30,
            "60/min refills 30 in 30 s"
        );
        assert_eq!(
            budgets.available(read, SECOND * 600),
            180,
            "banked at most 3 minutes"
        );
    }

    #[test]
    fn budgets_scale_with_players_and_the_server_setting() {
        let budgets = RequestBudgets::new(Throttling::Scaled(2.0));
        let list = RequestType::from_enum_value(11).unwrap();
        assert_eq!(
            budgets.available(list, Duration::ZERO),
            30,
            "(5/min × 2) × 3"
        );
        budgets.set_players(10);
        for _ in 0..30 {
            assert!(budgets.try_take(Family::StandardList, 1.0, Duration::ZERO, None));
        }
        // (5 + 2 × 10) × 2 = 50 per minute.
        assert_eq!(budgets.available(list, SECOND * 6), 5);
    }

    #[test]
    fn legacy_values_map_to_modern_budgets() {
        let budgets = RequestBudgets::new(Throttling::default());
        let by_value =
            |value| budgets.available(RequestType::from_enum_value(value).unwrap(), Duration::ZERO);
        assert_eq!(by_value(0), by_value(9), "GetAsync is StandardRead");
        assert_eq!(by_value(3), by_value(15), "GetSortedAsync is OrderedList");
        assert_eq!(by_value(2), 180, "UpdateAsync: min(read, write)");
        assert_eq!(by_value(5), 30, "OnUpdate");
        assert_eq!(RequestType::from_enum_value(17), None);
    }

    #[test]
    fn set_limit_validates_ranges_by_enum_value() {
        let budgets = RequestBudgets::new(Throttling::default());
        let legacy_get = RequestType::from_enum_value(0).unwrap();
        let modern_read = RequestType::from_enum_value(9).unwrap();
        assert!(
            budgets
                .set_limit(legacy_get, 61.0, 0.0, Duration::ZERO)
                .is_err()
        );
        assert!(
            budgets
                .set_limit(legacy_get, 60.0, 41.0, Duration::ZERO)
                .is_err()
        );
        assert!(
            budgets
                .set_limit(modern_read, 1.5, 0.0, Duration::ZERO)
                .is_err()
        );
        assert!(
            budgets
                .set_limit(modern_read, -1.0, 0.0, Duration::ZERO)
                .is_err()
        );
        assert_eq!(
            budgets.set_limit(RequestType::Update, 1.0, 1.0, Duration::ZERO),
            Err(DataStoreError::RateLimitNotConfigurable)
        );
        budgets
            .set_limit(modern_read, 10.0, 0.0, Duration::ZERO)
            .unwrap();
        assert_eq!(
            budgets.available(modern_read, Duration::ZERO),
            30,
            "the bank shrinks at once"
        );
        budgets
            .set_limit(modern_read, 0.0, 0.0, Duration::ZERO)
            .unwrap();
        assert_eq!(budgets.available(modern_read, SECOND * 60), 0);
    }

    #[test]
    fn over_budget_requests_wait_in_order_with_a_warning_and_overflow_fails() {
        use std::rc::Rc;

        use blox_scheduler::ManualClock;
        use mlua::IntoLuaMulti as _;

        let lua = Lua::new();
        let clock = Rc::new(ManualClock::default());
        let scheduler = Scheduler::attach(&lua, clock.clone()).unwrap();
        let warnings = Rc::new(RefCell::new(Vec::<String>::new()));
        let sink = Rc::clone(&warnings);
        let warn = lua
            .create_function(move |_, message: String| {
                sink.borrow_mut().push(message);
                Ok(())
            })
            .unwrap();
        lua.globals().set("warn", warn).unwrap();
        let budgets = Rc::new(RequestBudgets::new(Throttling::default()));
        let read = RequestType::from_enum_value(9).unwrap();
        budgets.set_limit(read, 0.0, 0.0, Duration::ZERO).unwrap();

        let served = Rc::new(RefCell::new(Vec::<i64>::new()));
        let (queue, log) = (Rc::clone(&budgets), Rc::clone(&served));
        let request = lua
            .create_async_function(move |lua, i: i64| {
                let (budgets, served) = (Rc::clone(&queue), Rc::clone(&log));
                async move {
                    let key = format!("k{i}");
                    budgets
                        .acquire(&lua, Family::StandardRead, 1, "GetAsync", "Store", &key)
                        .await?;
                    served.borrow_mut().push(i);
                    Ok(())
                }
            })
            .unwrap();
        for i in 1..=31_i64 {
            let thread = lua.create_thread(request.clone()).unwrap();
            scheduler
                .spawn(thread, i.into_lua_multi(&lua).unwrap())
                .unwrap();
        }
        assert!(served.borrow().is_empty());
        let errors = scheduler.errors();
        assert_eq!(errors.len(), 1, "the 31st request finds the queue full");
        assert!(
            errors[0]
                .message
                .contains("StandardReadGameServerThrottled"),
            "{}",
            errors[0].message
        );
        assert_eq!(warnings.borrow().len(), 30);
        assert_eq!(
            warnings.borrow()[0],
            "DataStore request was added to queue. If request queue fills, further requests will be dropped. Try sending fewer requests.Key = k1"
        );

        budgets.set_limit(read, 60.0, 0.0, scheduler.now()).unwrap();
        for second in 1..=30 {
            clock.advance(SECOND);
            scheduler.step_frame(&lua);
            let expected: Vec<i64> = (1..=second).collect();
            assert_eq!(
                *served.borrow(),
                expected,
                "one a second, first in first out"
            );
        }
        assert!(budgets.queues.borrow().iter().all(VecDeque::is_empty));
    }

    #[test]
    fn throttling_setting_parses() {
        assert_eq!("off".parse::<Throttling>(), Ok(Throttling::Off));
        assert_eq!("2.5".parse::<Throttling>(), Ok(Throttling::Scaled(2.5)));
        assert!("0".parse::<Throttling>().is_err());
        assert!("fast".parse::<Throttling>().is_err());
    }
}
