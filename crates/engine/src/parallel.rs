//! A small fork-join pool for the engine's compute thread: the caller runs share 0 of every job
//! itself and `n - 1` pinned-for-life workers run the others. Workers spin briefly between jobs
//! (a decode step issues a few hundred jobs, microseconds apart) and then sleep on a condvar, so
//! an idle engine costs no CPU. Invariant: one job at a time; `run` returns only after every share
//! has finished, which is what makes lending the caller's closure to the workers sound.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    job: UnsafeCell<Option<Job>>,
    generation: AtomicUsize,
    pending: AtomicUsize,
    sleeping: AtomicUsize,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread inside `run` while no worker reads it (all workers
// have finished the previous generation) and read by workers only after they observe the new
// generation with acquire ordering; everything else is atomics or a mutex.
unsafe impl Sync for Shared {}
// SAFETY: see `Sync`; the raw job pointer is only dereferenced under the protocol above.
unsafe impl Send for Shared {}

/// How long a worker spins for the next job before sleeping.
const SPIN: Duration = Duration::from_micros(200);

/// A fork-join pool of `n` threads, the caller included.
///
/// `Send` but not `Sync`: the thread that owns it is the only one that can call [`run`]
/// (`ThreadPool::run`), so two jobs can never be in flight at once, and a job cannot start
/// another from inside itself (its closure must be `Sync`, which a borrowed pool is not).
///
/// ```compile_fail
/// // Sharing a pool between threads does not compile:
/// fn shared<T: Sync>() {}
/// shared::<lastmile_engine::parallel::ThreadPool>();
/// ```
///
/// ```
/// // Moving it to the thread that runs it does:
/// let pool = lastmile_engine::parallel::ThreadPool::new(2);
/// std::thread::spawn(move || pool.run(&|_| {})).join().unwrap();
/// ```
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n: usize,
    not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

impl ThreadPool {
    /// A pool that runs each job on `n` threads (the caller plus `n - 1` workers).
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n)
            .map(|idx| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("lastmile-compute-{idx}"))
                    .spawn(move || worker_loop(&shared, idx))
                    .expect("spawning a compute thread")
            })
            .collect();
        Self {
            shared,
            workers,
            n,
            not_sync: std::marker::PhantomData,
        }
    }

    /// Threads per job.
    pub fn threads(&self) -> usize {
        self.n
    }

    /// Runs `f(i)` for every `i` in `0..threads()`, in parallel, and returns when all are done.
    /// A panic in any share is re-raised here.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.n == 1 {
            f(0);
            return;
        }
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: we wait below until
        // every worker has finished with the pointer before returning.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        // SAFETY: no worker reads `job` now: all finished the previous generation (see below).
        unsafe { *s.job.get() = Some(job) };
        s.pending.store(self.n - 1, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a compute thread panicked");
        }
    }

    /// Calls `f(item)` for every item in `0..items`, handing items out dynamically in chunks of
    /// `chunk` (for work of uneven cost, such as causal attention).
    pub fn for_each_dynamic(&self, items: usize, chunk: usize, f: &(dyn Fn(usize) + Sync)) {
        let next = AtomicUsize::new(0);
        let chunk = chunk.max(1);
        self.run(&|_| loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= items {
                break;
            }
            for item in start..(start + chunk).min(items) {
                f(item);
            }
        });
    }
}

fn worker_loop(s: &Shared, idx: usize) {
    let mut seen = 0usize;
    loop {
        let mut spin_start = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins += 1;
            if !spins.is_multiple_of(64) || spin_start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            while s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst)
            {
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            drop(guard);
            s.sleeping.fetch_sub(1, Ordering::SeqCst);
            spin_start = Instant::now();
        }
        // SAFETY: the generation changed, so `run` stored a job that stays valid until `pending`
        // reaches zero, which needs this worker's decrement below.
        let job = unsafe { *s.job.get() };
        if let Some(job) = job {
            // SAFETY: see above; the closure is `Sync`, so sharing it across threads is allowed.
            let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(idx) }));
            if r.is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw pointer that may be shared across the pool's threads, for outputs that each thread
/// writes at disjoint indices.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(*mut T, usize);

// SAFETY: users write only disjoint indices from different threads (documented at each use).
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(s: &mut [T]) -> Self {
        Self(s.as_mut_ptr(), s.len())
    }

    /// The base pointer (valid for `len()` elements), for kernels that write through raw
    /// pointers under the same disjointness rule as `slice`.
    pub(crate) fn ptr(&self) -> *mut T {
        self.0
    }

    /// A mutable window `[start, start + len)`.
    ///
    /// # Safety
    /// No other thread may access the same indices while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.1, "SharedMut window out of bounds");
        // SAFETY: bounds checked above; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_share_runs_once_per_job() {
        let pool = ThreadPool::new(3);
        let counts: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        for c in &counts {
            assert_eq!(c.load(Ordering::Relaxed), 1000);
        }
    }

    #[test]
    fn dynamic_items_each_run_once_even_after_sleeping() {
        let pool = ThreadPool::new(2);
        std::thread::sleep(Duration::from_millis(5)); // workers go to sleep
        let hits: Vec<AtomicUsize> = (0..101).map(|_| AtomicUsize::new(0)).collect();
        pool.for_each_dynamic(101, 4, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panicking_share_is_reraised_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
