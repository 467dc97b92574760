//! What the process used: CPU time (from `getrusage`; a thread's own from its CPU clock), the
//! part of it spent polling for work, and peak resident memory; and the memory it may use.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Nanoseconds the pools' threads have spent polling for work ([`crate::polling`]).
static POLLING_NANOS: AtomicU64 = AtomicU64::new(0);

/// Counts `time` as spent polling for work rather than working.
pub fn add_polling_time(time: Duration) {
    POLLING_NANOS.fetch_add(time.as_nanos() as u64, Ordering::Relaxed);
}

/// CPU time this process's threads have spent polling for work so far, all threads together
/// (see [`crate::polling`]: the clock until a thread first yields its core, its own CPU clock
/// after that).
pub fn polling_time() -> Duration {
    Duration::from_nanos(POLLING_NANOS.load(Ordering::Relaxed))
}

/// CPU time this process has spent working so far: [`process_cpu_time`] less [`polling_time`].
pub fn working_cpu_time() -> Duration {
    process_cpu_time().saturating_sub(polling_time())
}

/// CPU time (user + system) the calling thread has used so far.
pub fn thread_cpu_time() -> Duration {
    // SAFETY: clock_gettime only writes the struct it is given; the clock id is a constant.
    let time = unsafe {
        let mut time: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time);
        time
    };
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// CPU time (user + system) this process has used so far, all threads together.
pub fn process_cpu_time() -> Duration {
    let usage = rusage();
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The largest resident set this process has had, in bytes.
///
/// On Linux, the high-water mark of this program's own memory (`VmHWM`): `getrusage`'s
/// `ru_maxrss` starts from the parent's resident set at `fork` and survives `exec`, so a run
/// started by `cargo run` reported cargo's 128 MiB instead of its own 69.
pub fn peak_rss_bytes() -> u64 {
    vm_hwm_bytes().unwrap_or_else(|| {
        // Linux and most Unixes report kilobytes.
        rusage().ru_maxrss as u64 * 1024
    })
}

/// `VmHWM` from `/proc/self/status`, where there is one.
fn vm_hwm_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kilobytes: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kilobytes * 1024)
}

/// The memory this process may use: the machine's, or its cgroup's limit where that is lower.
/// `None` where neither can be read.
pub fn memory_limit_bytes() -> Option<u64> {
    // SAFETY: sysconf only reads system constants.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let physical = (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64);
    match (physical, cgroup_memory_max()) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

/// The memory limit of this process's cgroup (`memory.max` in v2, `memory.limit_in_bytes` in
/// v1), where one is set and readable.
fn cgroup_memory_max() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    groups.lines().find_map(|line| {
        // "0::/path" (v2), or "4:memory:/path" (v1).
        let mut fields = line.splitn(3, ':');
        let (id, controllers, group) = (fields.next()?, fields.next()?, fields.next()?);
        let group = group.trim_start_matches('/');
        let file = match (id, controllers) {
            ("0", "") => Path::new("/sys/fs/cgroup").join(group).join("memory.max"),
            (_, c) if c.split(',').any(|c| c == "memory") => Path::new("/sys/fs/cgroup/memory")
                .join(group)
                .join("memory.limit_in_bytes"),
            _ => return None,
        };
        // "max" where a v2 group has no limit.
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    })
}

fn rusage() -> libc::rusage {
    // SAFETY: getrusage only writes the struct it is given; RUSAGE_SELF is always valid.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    }
}

/// Measures how busy the threads were with work (polling for it not counted) since `start`.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    wall: Instant,
    cpu: Duration,
}

impl CpuMeter {
    pub fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: working_cpu_time(),
        }
    }

    /// Working CPU time / (wall time x threads): 1.0 means every thread working all the time.
    pub fn utilization(&self, threads: usize) -> f64 {
        let wall = self.wall.elapsed().as_secs_f64();
        let cpu = working_cpu_time().saturating_sub(self.cpu).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        cpu / (wall * threads as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_shows_as_busy() {
        let meter = CpuMeter::start();
        let until = Instant::now() + Duration::from_millis(200);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let busy = meter.utilization(1);
        // A lower bound only: a loaded machine can steal the core, and tests running beside
        // this one in the same process add their CPU time to the process's.
        assert!(busy > 0.05, "{busy}");
        assert!(peak_rss_bytes() > 1 << 20);
    }

    #[test]
    fn the_memory_limit_is_at_least_what_this_process_holds() {
        let limit = memory_limit_bytes().expect("Linux reports its memory");
        assert!(limit >= peak_rss_bytes(), "{limit}");
    }

    /// The peak follows this program's own memory: 64 MiB touched show up in it.
    #[test]
    fn the_peak_counts_memory_this_process_touched() {
        #[cfg(target_os = "linux")]
        assert!(vm_hwm_bytes().is_some(), "Linux has VmHWM");
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        assert!(peak_rss_bytes() >= 64 << 20, "{}", peak_rss_bytes());
    }
}
