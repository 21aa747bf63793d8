//! loom models of the take/refill protocol (`raw`) and the sleep/wake handshake.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=/work/target-ring-loom \
//!     cargo test -p unid-ring --release --test loom
//! ```
//! The preemption bound defaults to 2 here; `LOOM_MAX_PREEMPTIONS=3` explores more (minutes).
//! Without `--cfg loom` this file compiles to nothing.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use unid_ring::raw::{MemRing, ProducerCore, Take};

/// `loom::model` with a preemption bound of 2 unless `LOOM_MAX_PREEMPTIONS` says otherwise, so
/// a plain `cargo test --test loom` under `--cfg loom` (as CI runs it) stays within minutes.
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(f);
}

fn take_into(ring: &MemRing, max: u64, out: &mut Vec<u128>) -> bool {
    consume(ring.view().take(max), out)
}

/// Like `take_into` but from this thread's guess of `head` (as `Consumer` does), updating it.
fn take_guessed(ring: &MemRing, guess: &mut u64, max: u64, out: &mut Vec<u128>) -> bool {
    let (t, next) = ring.view().take_from(*guess, max);
    *guess = next;
    consume(t, out)
}

fn consume(t: Take, out: &mut Vec<u128>) -> bool {
    match t {
        Take::Got(r) => {
            out.extend((0..r.count).map(|k| r.first + u128::from(k)));
            true
        }
        Take::Empty => false,
        Take::Corrupt => panic!("corrupt read in a correct protocol"),
    }
}

fn check(per_consumer: &[Vec<u128>], drained: &[u128], total: u128) {
    let mut all: Vec<u128> = Vec::new();
    for got in per_consumer {
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "per-consumer order: {got:?}"
        );
        all.extend(got);
    }
    all.extend(drained);
    all.sort_unstable();
    let expected: Vec<u128> = (0..total).collect();
    assert_eq!(all, expected, "every pushed id exactly once");
}

/// Capacity 2, three blocks: the third recycles slot 0 while two consumers may still be reading
/// it with a stale head (torn reads, lapping, "empty but advanced"). One consumer loads `head`,
/// the other starts from a guess (`take_from`) that goes stale.
#[test]
fn two_consumers_producer_recycles_slot() {
    model(|| {
        let mem = Arc::new(MemRing::new(8, 2));
        let consumers: Vec<_> = (0..2)
            .map(|i| {
                let mem = Arc::clone(&mem);
                thread::spawn(move || {
                    let mut got = Vec::new();
                    if i == 0 {
                        take_into(&mem, 1, &mut got);
                        take_into(&mem, 2, &mut got);
                    } else {
                        // Starts from guess 0, stale as soon as the other consumer took.
                        let mut guess = 0;
                        take_guessed(&mem, &mut guess, 2, &mut got);
                        take_guessed(&mem, &mut guess, 2, &mut got);
                    }
                    got
                })
            })
            .collect();
        let ring = mem.view();
        let mut p = ProducerCore::new(2, u128::from(u64::MAX));
        assert_eq!(p.push(&ring, 0, 2), Ok(2));
        assert_eq!(p.push(&ring, 2, 1), Ok(1));
        let mut pushed = 3u128;
        // Block 2 needs block 0 fully claimed; try twice, then give up (bounded).
        for _ in 0..2 {
            if p.push(&ring, 3, 2) == Ok(2) {
                pushed = 5;
                break;
            }
            thread::yield_now();
        }
        let per: Vec<Vec<u128>> = consumers.into_iter().map(|h| h.join().unwrap()).collect();
        let mut drained = Vec::new();
        while take_into(&mem, 8, &mut drained) {}
        if pushed == 3 {
            // Still room after the consumers finished?
            if p.push(&ring, 3, 2) == Ok(2) {
                pushed = 5;
                while take_into(&mem, 8, &mut drained) {}
            }
        }
        check(&per, &drained, pushed);
        assert_eq!(p.ids_available(&ring), 0);
    });
}

/// One consumer registers to sleep while the producer publishes: either the consumer's re-check
/// sees the block, or the producer sees the waiter and bumps `wake_seq` past the value the
/// consumer would sleep on (so FUTEX_WAIT returns at once or is woken). No lost wake-up.
/// (Removing the SeqCst fence from `register_waiter` makes this model fail.)
#[test]
fn no_lost_wakeup() {
    model(|| {
        let mem = Arc::new(MemRing::new(4, 2));
        let consumer = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let ring = mem.view();
                let seq = ring.register_waiter();
                let r = ring.take(1);
                if r != Take::Empty {
                    ring.unregister_waiter();
                }
                // Empty: it would now FUTEX_WAIT(wake_seq, seq) and stay registered while asleep.
                (seq, r)
            })
        };
        let ring = mem.view();
        let mut p = ProducerCore::new(2, 1000);
        assert_eq!(p.push(&ring, 7, 1), Ok(1));
        if ProducerCore::waiters_present(&ring) {
            ProducerCore::bump_wake_seq(&ring);
        }
        let (seq, r) = consumer.join().unwrap();
        if r == Take::Empty {
            assert_ne!(
                ring.wake_seq(),
                seq,
                "consumer would sleep through the publication"
            );
        }
    });
}
