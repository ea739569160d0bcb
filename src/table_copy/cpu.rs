//! CPU-bound work of a table copy, on a few threads fed by async reads.
//!
//! Decoding, checking and rewriting a manifest takes milliseconds of CPU;
//! reading it takes an async hop or two. Handed to the blocking pool one
//! item at a time, every item waited for the coordinating task to be
//! scheduled, to see the read finish, and to start the CPU work: on two
//! cores about a quarter of the time went idle in those hand-offs (measured
//! with `perf sched`). Here a fixed set of threads, one per core, take items
//! from a queue that the async side keeps filled ahead of them, so a thread
//! that finishes one item starts the next at once.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;

use super::TableCopyError;
use crate::rewrite::RewriteError;

/// How many threads run CPU-bound work: one per core, and at most the items
/// a copy has in flight.
pub(super) fn threads(in_flight: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    cores.min(in_flight).max(1)
}

/// Runs `work` on each item `inputs` yields, on `threads` blocking threads,
/// and yields the results as they finish (in no particular order).
///
/// An error from `inputs` stops the feeding and is yielded after the
/// results already finished; the caller stops at the first error it sees.
/// Dropping the stream stops the threads: an item they are working on is
/// finished, queued ones are not started. A panic in `work` is yielded as
/// an error, never lost as a missing result.
pub(super) fn map<I, O, W>(
    inputs: impl Stream<Item = Result<I, TableCopyError>>,
    threads: usize,
    work: W,
) -> impl Stream<Item = Result<O, TableCopyError>>
where
    I: Send + 'static,
    O: Send + 'static,
    W: Fn(I) -> Result<O, RewriteError> + Send + Sync + 'static,
{
    let threads = threads.max(1);
    // Room for one item per thread waiting: enough that a thread never waits
    // for the async side, few enough that read-ahead stays small.
    let (to_cpu, queue) = mpsc::channel::<I>(threads);
    let (done, results) = mpsc::channel::<Result<O, TableCopyError>>(threads);
    let (queue, work) = (Arc::new(Mutex::new(queue)), Arc::new(work));
    for _ in 0..threads {
        let (queue, work, done) = (queue.clone(), work.clone(), done.clone());
        tokio::task::spawn_blocking(move || {
            while let Some(item) = next(&queue) {
                if done.is_closed() {
                    return;
                }
                let result = match catch_unwind(AssertUnwindSafe(|| work(item))) {
                    Ok(worked) => worked.map_err(TableCopyError::from),
                    Err(panic) => Err(TableCopyError::Task(panic_message(&*panic))),
                };
                if done.blocking_send(result).is_err() {
                    return;
                }
            }
        });
    }
    let feed = async move {
        let mut inputs = std::pin::pin!(inputs);
        while let Some(input) = inputs.next().await {
            let failed = match input {
                Ok(item) => match to_cpu.send(item).await {
                    Ok(()) => continue,
                    // Only if every thread is gone: the results must not
                    // then end as if they were complete.
                    Err(_) => TableCopyError::Task("the rewriting threads stopped".to_owned()),
                },
                Err(e) => e,
            };
            let _ = done.send(Err(failed)).await;
            break;
        }
        // `to_cpu` and this `done` are dropped here: the threads end once the
        // queue is empty, and the results end once they have.
    };
    let results =
        futures::stream::unfold(
            results,
            |mut results| async move { results.recv().await.map(|result| (result, results)) },
        );
    // The feed is polled with the results rather than spawned: `inputs`
    // borrows the copier and the run.
    futures::stream::select(feed.into_stream().filter_map(|()| std::future::ready(None)), results)
}

/// The next item of the queue, waiting for one; `None` once it is closed
/// and empty.
fn next<I>(queue: &Mutex<mpsc::Receiver<I>>) -> Option<I> {
    // One thread waits on the channel, the others on the lock: the same
    // order in which they would get items anyway.
    // A thread that panicked held no lock (`work` runs after it is let go),
    // so a poisoned lock still guards a sound receiver.
    queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).blocking_recv()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    format!("decoding or rewriting panicked: {detail}")
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_item_is_worked_on_once() {
        let inputs = futures::stream::iter((0..1000u64).map(Ok));
        let mut out: Vec<u64> = map(inputs, 3, |n| Ok(n * 2)).try_collect().await.expect("results");
        out.sort_unstable();
        assert_eq!(out, (0..1000).map(|n| n * 2).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_input_error_and_a_panic_come_out_as_errors() {
        let inputs = futures::stream::iter(vec![Ok(1u64), Err(TableCopyError::Task("read failed".into()))]);
        let out: Result<Vec<u64>, _> = map(inputs, 2, Ok).try_collect().await;
        assert!(matches!(out, Err(TableCopyError::Task(m)) if m == "read failed"));

        let inputs = futures::stream::iter((0..10u64).map(Ok));
        let out: Vec<Result<u64, TableCopyError>> =
            map(inputs, 2, |n| if n == 7 { panic!("item {n}") } else { Ok(n) }).collect().await;
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 9, "the other items are still done");
        let failed: Vec<String> = out.into_iter().filter_map(Result::err).map(|e| e.to_string()).collect();
        assert_eq!(failed.len(), 1);
        assert!(failed[0].contains("item 7"), "{failed:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_results_stops_the_threads() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let started = Arc::new(AtomicUsize::new(0));
        let counted = started.clone();
        let inputs = futures::stream::iter((0..1_000_000u64).map(Ok));
        let mut results = Box::pin(map(inputs, 2, move |n| {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(n)
        }));
        assert!(results.next().await.is_some());
        drop(results);
        let at_drop = started.load(Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // At most the item each thread had taken when the stream went.
        let after = started.load(Ordering::SeqCst);
        assert!(after <= at_drop + 2, "{after} items started, {at_drop} when the stream was dropped");
    }
}
