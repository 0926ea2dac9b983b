//! Two-way parallelism for small models: independent forward and backward
//! passes run at once, each on its own thread with single-threaded dfdx
//! kernels. At these sizes two threads inside every small matmul spend more
//! time synchronising than computing (measured on the default tiny model:
//! 10.4 k training tokens/s with 2 matmul threads, 14.4 k with 1, 24.3 k
//! with two single-threaded workers).
//!
//! The worker count is a constant, not the machine's core count, and work
//! is split the same way everywhere, so results do not depend on the machine.
//!
//! This is a CPU strategy: with the `cuda` feature the same functions run
//! their work in order on the calling thread (a CUDA device's tensors hold
//! a stream that cannot move between threads, and the GPU parallelises
//! inside each op), with the same split and so the same results.

#[cfg(not(feature = "cuda"))]
use std::sync::OnceLock;

pub const WORKERS: usize = 2;

/// A device whose tensors the workers may share: any CPU device; with the
/// `cuda` feature any device (the work then stays on one thread).
#[cfg(not(feature = "cuda"))]
pub trait WorkerDevice: dfdx::tensor_ops::Device<f32> + Send + Sync {}
#[cfg(not(feature = "cuda"))]
impl<D: dfdx::tensor_ops::Device<f32> + Send + Sync> WorkerDevice for D {}
#[cfg(feature = "cuda")]
pub trait WorkerDevice: dfdx::tensor_ops::Device<f32> {}
#[cfg(feature = "cuda")]
impl<D: dfdx::tensor_ops::Device<f32>> WorkerDevice for D {}

/// One single-threaded rayon pool per worker: inside it dfdx asks rayon for
/// its thread count and gets 1.
#[cfg(not(feature = "cuda"))]
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
/// A lone item runs on the calling thread instead, where the matmuls use
/// every core (a second worker would have nothing to do); the GEMM sums
/// each element in the same order on any number of threads, so the result
/// is the same.
#[cfg(not(feature = "cuda"))]
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(usize, &T) -> R + Sync) -> Vec<R> {
    if let [only] = items {
        return vec![f(0, only)];
    }
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
#[cfg(not(feature = "cuda"))]
pub fn map_chunks<T: Sync, R: Send>(
    items: &[T],
    size: usize,
    f: impl Fn(usize, &[T]) -> R + Sync,
) -> Vec<R> {
    let chunks: Vec<&[T]> = items.chunks(size.max(1)).collect();
    map(&chunks, |i, chunk| f(i, chunk))
}

/// `a()` and `b()` at once, on the two workers.
#[cfg(not(feature = "cuda"))]
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

/// On CUDA: `f(i, item)` for every item, in order, on this thread.
#[cfg(feature = "cuda")]
pub fn map<T, R>(items: &[T], f: impl Fn(usize, &T) -> R) -> Vec<R> {
    items.iter().enumerate().map(|(i, x)| f(i, x)).collect()
}

/// On CUDA: `f(index, chunk)` for each chunk, in order, on this thread.
#[cfg(feature = "cuda")]
pub fn map_chunks<T, R>(items: &[T], size: usize, f: impl Fn(usize, &[T]) -> R) -> Vec<R> {
    items
        .chunks(size.max(1))
        .enumerate()
        .map(|(i, c)| f(i, c))
        .collect()
}

/// On CUDA: `a()` then `b()` on this thread.
#[cfg(feature = "cuda")]
pub fn join<A, B>(a: impl FnOnce() -> A, b: impl FnOnce() -> B) -> (A, B) {
    (a(), b())
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
        let here = rayon::current_num_threads();
        assert_eq!(
            map(&[5], |_, x| (x * 2, rayon::current_num_threads())),
            [(10, here)]
        );
    }
}
