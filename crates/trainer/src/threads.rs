//! How many threads a run uses, and making the backends use exactly that many.
//!
//! Two pools do the work on the CPU: rayon's (burn's element-wise and convolution loops, and
//! flex's matmul), which a run replaces with a pool of its own size, and matrixmultiply's
//! (ndarray's matmul), which reads `MATMUL_NUM_THREADS` once per process, at the first matrix
//! product, and never uses more than 4 threads.

use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::settings::{Backend, Threads};

/// matrixmultiply's own cap on its thread count.
pub const MATMUL_MAX_THREADS: usize = 4;

/// The thread counts a run will use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPlan {
    /// Threads of the run's rayon pool.
    pub threads: usize,
    /// What this process may use (CPU affinity and cgroup quotas honoured).
    pub available: usize,
    /// Threads of matrixmultiply's pool (ndarray's matmul).
    pub matmul_threads: usize,
}

impl ThreadPlan {
    /// Resolves `training.threads`: `auto` takes every thread the process may use.
    pub fn new(setting: Threads) -> Self {
        let available = available_threads();
        let threads = match setting {
            Threads::Auto => available,
            Threads::Count(n) => n.get(),
        };
        Self {
            threads,
            available,
            matmul_threads: threads.min(MATMUL_MAX_THREADS),
        }
    }

    /// `threads` threads, where `threads = "auto"` chose them: matrixmultiply then has what the
    /// process may use (it was fixed before the calibration's first matrix product).
    pub fn chosen(threads: usize) -> Self {
        let available = available_threads();
        Self {
            threads,
            available,
            matmul_threads: available.min(MATMUL_MAX_THREADS),
        }
    }

    /// The line a run prints when it starts.
    pub fn describe(&self, backend: Backend) -> String {
        let mut line = format!(
            "{} thread{} of {} available",
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.available
        );
        if backend == Backend::Ndarray && self.threads > MATMUL_MAX_THREADS {
            line.push_str(&format!(
                " (matrix products on {} threads: matrixmultiply's limit)",
                self.matmul_threads
            ));
        }
        if self.threads > self.available {
            line.push_str(" (more threads than cores: expect no gain)");
        }
        line
    }

    /// Builds the rayon pool the run executes in, and fixes matrixmultiply's thread count.
    ///
    /// matrixmultiply reads its count once per process: a second plan with another count in the
    /// same process keeps the first (results are equal at any count; only speed differs).
    pub fn install(&self) -> Result<rayon::ThreadPool> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("allcores-{i}"))
            .build()
            .map_err(|e| Error::setting("training.threads", format!("cannot start the pool: {e}")))
    }
}

/// Threads this process may run at once.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Gives matrixmultiply (burn-ndarray's matrix product, which a model of burn's own layers
/// uses; the built-in models use the trainer's kernels) the threads a run of `setting` may
/// use, capped at [`MATMUL_MAX_THREADS`]: without it, matrixmultiply takes every core, whatever
/// the run's thread count. It reads `MATMUL_NUM_THREADS` once per process, at its first matrix
/// product, so only the first call counts. Results are the same at any count; only speed and
/// CPU use differ.
///
/// # Safety
///
/// It sets an environment variable, which races with any other thread that reads or writes
/// the environment: call it before the process starts a thread (the signal handlers of
/// `allcores_eval::Interrupt` included), as the first thing `main` does.
pub unsafe fn limit_matmul_threads(setting: Threads) {
    static SET: OnceLock<usize> = OnceLock::new();
    SET.get_or_init(|| {
        let threads = match setting {
            Threads::Auto => available_threads(),
            Threads::Count(n) => n.get(),
        }
        .min(MATMUL_MAX_THREADS);
        // SAFETY: the caller guarantees that no other thread runs yet.
        unsafe { std::env::set_var("MATMUL_NUM_THREADS", threads.to_string()) };
        threads
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    #[test]
    fn auto_takes_what_is_available() {
        let plan = ThreadPlan::new(Threads::Auto);
        assert_eq!(plan.threads, available_threads());
    }

    #[test]
    fn matmul_threads_are_capped_and_said_so() {
        let plan = ThreadPlan::new(Threads::Count(NonZeroUsize::new(16).unwrap()));
        assert_eq!(plan.matmul_threads, MATMUL_MAX_THREADS);
        assert!(
            plan.describe(Backend::Ndarray)
                .contains("matrixmultiply's limit")
        );
        assert!(!plan.describe(Backend::Flex).contains("matrixmultiply"));
    }
}
