//! Two-way parallelism for small models: independent forward and backward
//! passes run at once, each on its own thread with single-threaded dfdx
//! kernels. At these sizes two threads inside every small matmul spend more
//! time synchronising than computing (measured on the default tiny model:
//! 10.4 k training tokens/s with 2 matmul threads, 14.4 k with 1, 24.3 k
//! with two single-threaded workers).
//!
//! The worker count is a constant, not the machine's core count, and work
//! is split the same way everywhere, so results do not depend on the machine.

use std::sync::OnceLock;

pub const WORKERS: usize = 2;

/// One single-threaded rayon pool per worker: inside it dfdx asks rayon for
/// its thread count and gets 1.
fn pools() -> &'static [rayon::ThreadPool] {
    static POOLS: OnceLock<Vec<rayon::ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        (0..WORKERS)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("posttrain-worker-{i}"))
                    .build()
                    .expect("a one-thread pool")
            })
            .collect()
    })
}

/// `f(i, item)` for every item, item i on worker i % WORKERS; results in order.
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(usize, &T) -> R + Sync) -> Vec<R> {
    let f = &f;
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = pools()
            .iter()
            .enumerate()
            .map(|(w, pool)| {
                scope.spawn(move || {
                    pool.install(|| {
                        items
                            .iter()
                            .enumerate()
                            .skip(w)
                            .step_by(WORKERS)
                            .map(|(i, item)| (i, f(i, item)))
                            .collect::<Vec<_>>()
                    })
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().expect("a worker panicked") {
                out[i] = Some(r);
            }
        }
    });
    out.into_iter()
        .map(|r| r.expect("every item mapped"))
        .collect()
}

/// `f(index, chunk)` for each `size`-long chunk of `items` (the last may be
/// shorter), spread over the workers, results in chunk order.
pub fn map_chunks<T: Sync, R: Send>(
    items: &[T],
    size: usize,
    f: impl Fn(usize, &[T]) -> R + Sync,
) -> Vec<R> {
    let chunks: Vec<&[T]> = items.chunks(size.max(1)).collect();
    map(&chunks, |i, chunk| f(i, chunk))
}

/// `a()` and `b()` at once, on the two workers.
pub fn join<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    let [pa, pb] = pools() else {
        unreachable!("two workers")
    };
    std::thread::scope(|scope| {
        let ha = scope.spawn(|| pa.install(a));
        let hb = scope.spawn(|| pb.install(b));
        (
            ha.join().expect("a worker panicked"),
            hb.join().expect("a worker panicked"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keeps_order_and_runs_single_threaded_workers() {
        let items: Vec<usize> = (0..7).collect();
        let out = map(&items, |i, x| (i, x * 10, rayon::current_num_threads()));
        for (k, (i, v, threads)) in out.into_iter().enumerate() {
            assert_eq!((i, v, threads), (k, k * 10, 1));
        }
        let (a, b) = join(|| 1 + 1, rayon::current_num_threads);
        assert_eq!((a, b), (2, 1));
    }
}
