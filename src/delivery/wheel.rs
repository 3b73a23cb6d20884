//! The sweeper's timing wheel: which sessions each sweep tick visits, and which of those it
//! pings.
//!
//! Visiting every session on every sweep and pinging those whose interval had elapsed made
//! sessions that connected together (after a deploy, a reconnect wave, a load test's setup)
//! get their pings together: thousands of pings, and as many pongs read back, in one tick,
//! which held up deliveries for tens of milliseconds. Here every session gets a place when
//! it registers, the next one in sequence that holds no more than the average, so that
//! places fill evenly whatever the connect pattern (and refill evenly after disconnects): a
//! *slot* (which tick of a rotation visits it) and a *phase* (which rotation of a ping cycle
//! pings it). A tick visits one slot, about N/slots sessions, and pings the ones
//! in that slot whose phase is the current rotation's, about N/(slots × phases); a session
//! is visited once per rotation (what the idle, write and token checks need) and pinged once
//! per ping cycle, which lasts one ping interval.

use std::time::Duration;

use crate::transport::LivenessSettings;

/// The shortest tick. Each wake-up of the sweeper has a fixed cost (a timer, a parked worker
/// woken, the hub's lock): with 20 ms ticks a node holding 10,000 idle sessions used 1.6 %
/// of a core at rest against 0.6 % with one sweep a second; 100 ms ticks keep the sweeper
/// at 10 wake-ups a second, and the pings of one tick (N / 250 at the defaults) are still a
/// small batch.
const MIN_TICK: Duration = Duration::from_millis(100);

/// The most slots per rotation (a rotation lasts at most a second, so 10 ticks of 100 ms).
const MAX_SLOTS: u32 = 10;

/// How the wheel turns: `slots` ticks make a rotation (every session visited once), and
/// `phases` rotations make a ping cycle (every session pinged once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WheelShape {
    slots: u32,
    phases: u32,
    tick: Duration,
}

impl Default for WheelShape {
    /// One slot, one phase, a tick of a second: every visit sees every session and pings
    /// it (unit tests that do not care about the wheel).
    fn default() -> Self {
        WheelShape {
            slots: 1,
            phases: 1,
            tick: Duration::from_secs(1),
        }
    }
}

impl WheelShape {
    /// The wheel for these settings. A rotation lasts at most the sweep period (so every
    /// limit is still checked within a quarter of itself), and a ping cycle lasts exactly
    /// the ping interval: `phases` is the number of sweep periods in it, rounded up, and the
    /// tick is the interval divided by `slots × phases`.
    pub(crate) fn new(live: &LivenessSettings) -> Self {
        let period = live.sweep_period();
        let slots = (period.as_millis() / MIN_TICK.as_millis()).clamp(1, MAX_SLOTS as u128) as u32;
        let interval = live.ping_interval.max(Duration::from_millis(1));
        let phases = interval
            .as_nanos()
            .div_ceil(period.as_nanos().max(1))
            .clamp(1, u32::MAX as u128) as u32;
        let positions = u64::from(slots) * u64::from(phases);
        let tick = Duration::from_nanos((interval.as_nanos() / u128::from(positions)) as u64)
            .max(Duration::from_millis(1));
        WheelShape {
            slots,
            phases,
            tick,
        }
    }

    /// How often the sweeper ticks.
    pub(crate) fn tick(&self) -> Duration {
        self.tick
    }

    /// Ticks per rotation: a session is visited once every `slots` ticks.
    pub(crate) fn slots(&self) -> u32 {
        self.slots
    }

    /// Rotations per ping cycle.
    #[cfg(test)]
    pub(crate) fn phases(&self) -> u32 {
        self.phases
    }

    /// The slot that tick `tick` visits, and the phase it pings.
    fn at(&self, tick: u64) -> (usize, u32) {
        let slots = u64::from(self.slots);
        let slot = (tick % slots) as usize;
        let phase = ((tick / slots) % u64::from(self.phases)) as u32;
        (slot, phase)
    }
}

/// Where an item is in the wheel: returned by [`Wheel::insert`], given back to
/// [`Wheel::remove`]. It names a location record, not a position in a slot, so it stays
/// valid while other items move; the generation makes a key that outlived its item miss
/// instead of removing whichever item took over the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WheelKey {
    index: u32,
    generation: u32,
}

/// One item in a slot: the item, the phase that pings it, and its location record.
#[derive(Debug)]
struct Slotted<T> {
    item: T,
    phase: u32,
    key: u32,
}

/// Where the item of one key is: its place (slot and phase) and its index in the slot's
/// list. `generation` 0 marks a free record.
#[derive(Debug, Clone, Copy)]
struct Location {
    generation: u32,
    place: u32,
    position: u32,
}

/// Items (the hub's session handles) in their places.
#[derive(Debug)]
pub(crate) struct Wheel<T> {
    shape: WheelShape,
    /// One list per slot. Removal is O(1): the item's location record gives its index, the
    /// last item of the list takes its index (`swap_remove`), and that item's record is
    /// updated. A scan of the slot instead (N/slots items) made a mass disconnect of N
    /// sessions cost O(N²/slots) under the hub's write lock.
    slots: Vec<Vec<Slotted<T>>>,
    /// Location records, one per item in the wheel plus the free ones in `free`: 12 bytes
    /// each, as many as the most items held at once since the wheel was last empty.
    locations: Vec<Location>,
    /// Free records, reused before new ones are added.
    free: Vec<u32>,
    /// The generation the next inserted item gets (never 0).
    next_generation: u32,
    /// Items per place (`slots × phases` places; place `p` is slot `p % slots`, phase
    /// `p / slots`): 4 bytes a place, 5 KiB at the default settings.
    load: Vec<u32>,
    /// Items in the wheel.
    len: u64,
    /// Where the search for the next place starts.
    cursor: usize,
}

impl<T: Clone> Wheel<T> {
    pub(crate) fn new(shape: WheelShape) -> Self {
        let places = shape.slots as usize * shape.phases as usize;
        Wheel {
            shape,
            slots: (0..shape.slots).map(|_| Vec::new()).collect(),
            locations: Vec::new(),
            free: Vec::new(),
            next_generation: 1,
            load: vec![0; places],
            len: 0,
            cursor: 0,
        }
    }

    pub(crate) fn shape(&self) -> WheelShape {
        self.shape
    }

    /// Places `item` at the next place in sequence that holds no more than the average;
    /// returns its key (needed to remove it). Consecutive registrations go to consecutive
    /// slots, and once every slot has one, to the next phase: N registrations in a burst
    /// fill the places evenly, and places emptied by disconnects are refilled first. Usually
    /// the first place looked at will do; at worst one pass over the places (one exists:
    /// not all can be above the average).
    pub(crate) fn insert(&mut self, item: T) -> WheelKey {
        let places = self.load.len();
        let fair = self.len / places as u64;
        let mut place = self.cursor % places;
        for _ in 0..places {
            if u64::from(self.load[place]) <= fair {
                break;
            }
            place = (place + 1) % places;
        }
        self.cursor = place + 1;
        self.load[place] = self.load[place].saturating_add(1);
        self.len += 1;
        let (slot, phase) = self.shape.at(place as u64);
        let list = &mut self.slots[slot];
        let generation = self.next_generation;
        self.next_generation = self.next_generation.checked_add(1).unwrap_or(1);
        let location = Location {
            generation,
            place: place as u32,
            position: list.len() as u32,
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.locations[index as usize] = location;
                index
            }
            None => {
                self.locations.push(location);
                (self.locations.len() - 1) as u32
            }
        };
        list.push(Slotted {
            item,
            phase,
            key: index,
        });
        WheelKey { index, generation }
    }

    /// Removes the item of `key` and returns it; `None` if it was removed already. O(1).
    pub(crate) fn remove(&mut self, key: WheelKey) -> Option<T> {
        let location = *self.locations.get(key.index as usize)?;
        if location.generation == 0 || location.generation != key.generation {
            return None;
        }
        let (slot, _) = self.shape.at(u64::from(location.place));
        let list = self.slots.get_mut(slot)?;
        let position = location.position as usize;
        if position >= list.len() {
            return None;
        }
        let removed = list.swap_remove(position);
        // The item that was last in the list now sits where the removed one was.
        if let Some(moved) = list.get(position) {
            if let Some(l) = self.locations.get_mut(moved.key as usize) {
                l.position = location.position;
            }
        }
        if list.is_empty() {
            // A slot emptied by a wave of disconnects gives its memory back.
            *list = Vec::new();
        }
        if let Some(l) = self.load.get_mut(location.place as usize) {
            *l = l.saturating_sub(1);
        }
        self.len = self.len.saturating_sub(1);
        if self.len == 0 {
            // So do the location records once the wheel is empty. Keys handed out before
            // cannot match a later item: generations keep counting.
            self.locations = Vec::new();
            self.free = Vec::new();
        } else if let Some(l) = self.locations.get_mut(key.index as usize) {
            l.generation = 0;
            self.free.push(key.index);
        }
        Some(removed.item)
    }

    /// Appends the items tick `tick` visits to `out`, each with whether it is pinged.
    pub(crate) fn visit(&self, tick: u64, out: &mut Vec<(T, bool)>) {
        let (slot, phase) = self.shape.at(tick);
        if let Some(list) = self.slots.get(slot) {
            out.reserve(list.len());
            out.extend(list.iter().map(|s| (s.item.clone(), s.phase == phase)));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.check();
        self.len as usize
    }

    /// Panics unless every item's location record points at it, every place's load is its
    /// number of items, and every record is either in use by exactly one item or free.
    #[cfg(test)]
    fn check(&self) {
        let mut load = vec![0u32; self.load.len()];
        let mut used = vec![false; self.locations.len()];
        let mut listed = 0u64;
        for (slot, list) in self.slots.iter().enumerate() {
            for (position, s) in list.iter().enumerate() {
                let l = self.locations[s.key as usize];
                assert_ne!(
                    l.generation, 0,
                    "slot {slot} item {position}: a free record"
                );
                assert_eq!(l.position as usize, position, "slot {slot}: wrong position");
                let (at_slot, phase) = self.shape.at(u64::from(l.place));
                assert_eq!((at_slot, phase), (slot, s.phase), "wrong place");
                assert!(!used[s.key as usize], "two items share record {}", s.key);
                used[s.key as usize] = true;
                load[l.place as usize] += 1;
                listed += 1;
            }
        }
        assert_eq!(listed, self.len);
        assert_eq!(load, self.load);
        for &f in &self.free {
            assert_eq!(
                self.locations[f as usize].generation, 0,
                "free record {f} in use"
            );
            assert!(!used[f as usize]);
        }
        assert_eq!(
            self.free.len() + listed as usize,
            self.locations.len(),
            "records neither used nor free"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ping_ms: u64, idle_ms: u64, write_ms: u64) -> LivenessSettings {
        LivenessSettings {
            ping_interval: Duration::from_millis(ping_ms),
            idle_timeout: Duration::from_millis(idle_ms),
            write_timeout: Duration::from_millis(write_ms),
            token_grace: Duration::from_secs(10),
        }
    }

    #[test]
    fn the_shape_keeps_the_sweep_period_and_the_ping_interval() {
        // herald's defaults: 25 s pings, 60 s idle, 10 s write timeout; sweep period 1 s.
        let s = WheelShape::new(&settings(25_000, 60_000, 10_000));
        assert_eq!((s.slots(), s.phases()), (10, 25));
        assert_eq!(s.tick(), Duration::from_millis(100));
        // The bench's "no pings" setting: a 600 s ping cycle, still visited every second.
        let s = WheelShape::new(&settings(600_000, 1_200_000, 10_000));
        assert_eq!((s.slots(), s.phases()), (10, 600));
        assert_eq!(s.tick(), Duration::from_millis(100));
        // Test settings: a 100 ms ping, sweep period 25 ms.
        let s = WheelShape::new(&settings(100, 300, 200));
        assert_eq!((s.slots(), s.phases()), (1, 4));
        assert_eq!(s.tick(), Duration::from_millis(25));
        // Whatever the settings: a rotation is never longer than the sweep period, and a
        // ping cycle lasts the ping interval (to the tick's rounding).
        for (p, i, w) in [
            (25_000, 60_000, 10_000),
            (1_000, 3_000, 10_000),
            (7_000, 9_000, 2_300),
            (30, 90, 10_000),
            (3_000, 3_500, 50),
            (600_000, 1_200_000, 10_000),
        ] {
            let live = settings(p, i, w);
            let s = WheelShape::new(&live);
            let rotation = s.tick() * s.slots();
            assert!(rotation <= live.sweep_period(), "{p} {i} {w}: {s:?}");
            let cycle = rotation * s.phases();
            let diff = live.ping_interval.abs_diff(cycle);
            assert!(
                diff < s.tick() * s.slots() * 2 + Duration::from_millis(2),
                "{s:?}"
            );
        }
    }

    /// Runs `ticks` ticks over `wheel`, counting visits and pings per item and per tick.
    fn turn(
        wheel: &Wheel<usize>,
        n: usize,
        from: u64,
        ticks: u64,
    ) -> (Vec<u32>, Vec<u32>, usize, usize) {
        let mut visits = vec![0u32; n];
        let mut pings = vec![0u32; n];
        let (mut most_visited, mut most_pinged) = (0, 0);
        let mut out = Vec::new();
        for t in from..from + ticks {
            wheel.visit(t, &mut out);
            most_visited = most_visited.max(out.len());
            most_pinged = most_pinged.max(out.iter().filter(|(_, p)| *p).count());
            for (i, ping) in out.drain(..) {
                visits[i] += 1;
                pings[i] += u32::from(ping);
            }
        }
        (visits, pings, most_visited, most_pinged)
    }

    #[test]
    fn a_burst_of_sessions_is_spread_over_every_tick() {
        let shape = WheelShape::new(&settings(25_000, 60_000, 10_000));
        let (slots, places) = (
            shape.slots() as usize,
            (shape.slots() * shape.phases()) as usize,
        );
        for n in [1, 49, 50, 51, 1_249, 1_250, 8_000, 20_001] {
            let mut wheel = Wheel::new(shape);
            for i in 0..n {
                wheel.insert(i);
            }
            assert_eq!(wheel.len(), n);
            // Start anywhere: the sweeper's tick count is not the registration count.
            let cycle = places as u64;
            let (visits, pings, most_visited, most_pinged) = turn(&wheel, n, 7_777, cycle);
            assert!(
                most_visited <= n.div_ceil(slots),
                "n={n}: {most_visited} visited in one tick"
            );
            assert!(
                most_pinged <= n.div_ceil(places),
                "n={n}: {most_pinged} pinged in one tick"
            );
            assert!(
                visits.iter().all(|&v| v == shape.phases()),
                "n={n}: once per rotation"
            );
            assert!(pings.iter().all(|&p| p == 1), "n={n}: once per ping cycle");
        }
    }

    #[test]
    fn churn_keeps_every_session_visited_and_pinged_once_per_period() {
        let shape = WheelShape::new(&settings(3_000, 9_000, 2_000));
        let places = u64::from(shape.slots() * shape.phases());
        let mut wheel = Wheel::new(shape);
        let mut key_of = Vec::new();
        let n = 5_000;
        for i in 0..n {
            key_of.push(wheel.insert(i));
        }
        // Every third session leaves (which empties every third place: the number of places
        // is a multiple of 3, the worst case for a plain sequence), then as many new ones
        // come (a reconnect wave).
        assert_eq!(places % 3, 0);
        for i in (0..n).step_by(3) {
            assert_eq!(wheel.remove(key_of[i]), Some(i));
            assert_eq!(wheel.remove(key_of[i]), None, "removed once");
        }
        let left = n - n.div_ceil(3);
        assert_eq!(wheel.len(), left);
        let total = n + n / 3;
        for i in n..total {
            key_of.push(wheel.insert(i));
        }
        let live = left + (total - n);
        assert_eq!(wheel.len(), live);
        let (visits, pings, most_visited, most_pinged) = turn(&wheel, total, 0, places);
        for i in 0..total {
            let gone = i < n && i % 3 == 0;
            let want = if gone { (0, 0) } else { (shape.phases(), 1) };
            assert_eq!((visits[i], pings[i]), want, "session {i}");
        }
        // The new sessions went to the emptied places: no tick visits or pings more than a
        // fair share of the live sessions, plus one per phase (and one) for the rounding.
        let slots = shape.slots() as usize;
        let bound = live.div_ceil(slots) + shape.phases() as usize;
        assert!(most_visited <= bound, "{most_visited} > {bound}");
        assert!(
            most_pinged <= live.div_ceil(places as usize) + 1,
            "{most_pinged}"
        );
    }

    /// splitmix64: a fixed-seed generator, so a failure replays exactly (no new dependency).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_inserts_and_removes_keep_every_location_right() {
        // Several shapes (one slot and one phase; the defaults; a short test interval),
        // each with a random walk of inserts and removes that grows, shrinks to empty and
        // grows again, checked against a model after every step.
        for (seed, (p, i, w)) in [
            (1u64, (1_000, 1_000, 1_000)),
            (2, (25_000, 60_000, 10_000)),
            (3, (100, 300, 200)),
            (4, (3_000, 9_000, 2_000)),
        ] {
            let shape = WheelShape::new(&settings(p, i, w));
            let mut rng = Rng(seed);
            let mut wheel = Wheel::new(shape);
            let mut live: Vec<(usize, WheelKey)> = Vec::new();
            let mut gone: Vec<WheelKey> = Vec::new();
            let mut next = 0usize;
            for step in 0..6_000 {
                // Mostly inserts in the first and third thousand-steps, mostly removes in
                // the second, until empty (which also frees the location records).
                let insert_odds = match step / 1_000 {
                    0 | 2 | 4 => 70,
                    _ => 25,
                };
                if live.is_empty() || rng.below(100) < insert_odds {
                    let key = wheel.insert(next);
                    live.push((next, key));
                    next += 1;
                } else {
                    let (item, key) = live.swap_remove(rng.below(live.len()));
                    assert_eq!(wheel.remove(key), Some(item), "seed {seed} step {step}");
                    gone.push(key);
                }
                // A key already used misses, whoever holds its record now.
                if !gone.is_empty() && rng.below(10) == 0 {
                    let key = gone[rng.below(gone.len())];
                    assert_eq!(
                        wheel.remove(key),
                        None,
                        "seed {seed} step {step}: stale key"
                    );
                }
                assert_eq!(wheel.len(), live.len(), "seed {seed} step {step}");
            }
            // Every live item is still visited exactly once per rotation.
            let mut seen = vec![0u32; next];
            let mut out = Vec::new();
            for t in 0..u64::from(shape.slots()) {
                wheel.visit(t, &mut out);
                for (item, _) in out.drain(..) {
                    seen[item] += 1;
                }
            }
            let mut want = vec![0u32; next];
            for (item, _) in &live {
                want[*item] = 1;
            }
            assert_eq!(seen, want, "seed {seed}");
        }
    }

    #[test]
    fn removing_many_sessions_leaves_the_rest_in_place() {
        let shape = WheelShape::new(&settings(25_000, 60_000, 10_000));
        let mut wheel = Wheel::new(shape);
        let n = 50_000;
        let keys: Vec<WheelKey> = (0..n).map(|i| wheel.insert(i)).collect();
        // A mass disconnect of all but every seventh session, newest first (each removal
        // moves the slot's last item into the hole, the case the location records exist for).
        for i in (0..n).rev().filter(|i| i % 7 != 0) {
            assert_eq!(wheel.remove(keys[i]), Some(i));
        }
        let kept: Vec<usize> = (0..n).filter(|i| i % 7 == 0).collect();
        assert_eq!(wheel.len(), kept.len());
        let places = u64::from(shape.slots() * shape.phases());
        let (visits, pings, _, _) = turn(&wheel, n, 0, places);
        for i in 0..n {
            let want = if i % 7 == 0 {
                (shape.phases(), 1)
            } else {
                (0, 0)
            };
            assert_eq!((visits[i], pings[i]), want, "session {i}");
        }
        // The rest leave too, oldest first: the wheel is empty and gives its memory back.
        for &i in &kept {
            assert_eq!(wheel.remove(keys[i]), Some(i));
        }
        assert_eq!(wheel.len(), 0);
        assert!(wheel.slots.iter().all(|l| l.capacity() == 0));
        assert_eq!(wheel.locations.capacity(), 0);
        // Keys from before the wheel emptied miss; new sessions are placed as before.
        assert_eq!(wheel.remove(keys[0]), None);
        let k = wheel.insert(7);
        assert_eq!(wheel.remove(keys[0]), None);
        assert_eq!(wheel.remove(k), Some(7));
    }

    /// The cost of a mass disconnect: 100,000 sessions at the default shape (10 slots of
    /// 10,000), then every one removed, in connect order, as the hub does under its write
    /// lock. Prints the times; run with
    /// `cargo test --workspace --lib -- --ignored --nocapture wheel::tests::remove_100k`.
    #[test]
    #[ignore = "a timing, not a check: run by hand"]
    fn remove_100k_sessions_timing() {
        let shape = WheelShape::new(&settings(25_000, 60_000, 10_000));
        let n = 100_000;
        let items: Vec<std::sync::Arc<usize>> = (0..n).map(std::sync::Arc::new).collect();
        let mut wheel = Wheel::new(shape);
        let start = std::time::Instant::now();
        let keys: Vec<WheelKey> = items.iter().map(|i| wheel.insert(i.clone())).collect();
        let inserted = start.elapsed();
        let start = std::time::Instant::now();
        for (item, key) in items.iter().zip(&keys) {
            let removed = wheel.remove(*key).expect("in the wheel");
            assert!(std::sync::Arc::ptr_eq(&removed, item));
        }
        let removed = start.elapsed();
        assert_eq!(wheel.len(), 0);
        eprintln!(
            "wheel: {n} sessions inserted in {:.1} ms, removed in {:.1} ms ({:.0} ns per remove)",
            inserted.as_secs_f64() * 1e3,
            removed.as_secs_f64() * 1e3,
            removed.as_nanos() as f64 / n as f64
        );
    }
}
