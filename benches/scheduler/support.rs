//! Shared pieces: runtimes, the plugin every scheduler fires, a lock-free recorder of fire
//! times, lateness statistics, process CPU time, and the summary table
//! printed at the end of the run.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use job_runtime::{Job, JobContext, RunError};
use tokio::runtime::Runtime;

// ---------------------------------------------------------------------------------------------
// Runtimes

/// A work-stealing runtime with `workers` threads (two: the machine's cores).
pub(crate) fn multi_thread(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// [`multi_thread`] with worker `i` pinned to CPU `i` (mod the CPUs this process may use).
///
/// Not how a service runs, and not used for any comparison: it shows how much of a burst's
/// lateness is the kernel placing both woken workers on one CPU (see `workers_waiting`).
pub(crate) fn multi_thread_pinned(workers: usize) -> Runtime {
    let next = std::sync::Arc::new(AtomicUsize::new(0));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: `sched_getaffinity` / `sched_setaffinity` only read and write the set we
            // pass; zeroed is a valid empty `cpu_set_t`.
            unsafe {
                let mut allowed: libc::cpu_set_t = std::mem::zeroed();
                let size = std::mem::size_of::<libc::cpu_set_t>();
                if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
                    return;
                }
                let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &allowed))
                    .collect();
                if cpus.is_empty() {
                    return;
                }
                let cpu = cpus[next.fetch_add(1, Ordering::Relaxed) % cpus.len()];
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut one);
                libc::sched_setaffinity(0, size, &one);
            }
        })
        .build()
        .expect("runtime")
}

/// Time this process's tokio worker threads have spent runnable but not running (waiting for a
/// CPU), summed, from `/proc/self/task/*/schedstat`; zero where that is not available.
pub(crate) fn workers_waiting() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut nanos = 0u64;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("tokio-runtime-w") && !comm.starts_with("tokio-rt-worker") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        nanos += stat
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(nanos)
}

/// A single-threaded runtime.
pub(crate) fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------------------
// The plugin

/// A plugin that records the wall time its body starts at: what a fire's lateness is measured
/// from, the same way for every scheduler.
pub(crate) struct Probe {
    pub(crate) name: String,
    pub(crate) rec: &'static Recorder,
}

impl Job for Probe {
    type Output = ();
    fn name(&self) -> &str {
        &self.name
    }
    async fn run(&self, _ctx: JobContext) -> Result<(), RunError> {
        self.rec.record();
        Ok(())
    }
}

/// Job names `job0`, `job1`, … (one plugin per scheduled job, as tokio-cron-scheduler has one
/// `Job` per schedule).
pub(crate) fn job_name(i: usize) -> String {
    format!("job{i}")
}

/// A cron expression (UTC) whose next fire is between one and two hours away, for
/// registrations that must not fire while measured.
pub(crate) fn far_cron() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let hour = (secs / 3600 + 2) % 24;
    format!("0 0 {hour} * * *")
}

/// A cron expression of its own for job `i` (up to 10,800 distinct ones), each firing at
/// least an hour from now, like [`far_cron`].
pub(crate) fn far_cron_distinct(i: usize) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let hour = (secs / 3600 + 2 + (i / 3600) as u64) % 24;
    format!("{} {} {hour} * * *", i % 60, i / 60 % 60)
}

/// A cron expression for job `i` whose date fields are its own too (up to 11,088 distinct
/// ones: day of month, month and a year from 2030), the most a cron job can differ.
pub(crate) fn far_cron_distinct_dates(i: usize) -> String {
    format!(
        "0 0 0 {} {} * {}",
        1 + i % 28,
        1 + i / 28 % 12,
        2030 + i / 336
    )
}

// ---------------------------------------------------------------------------------------------
// Fire times

/// Wall-clock times of fires (nanoseconds since the epoch), in a fixed array written with one
/// `fetch_add` and one store per fire, so recording costs every scheduler the same few
/// nanoseconds and no lock.
pub(crate) struct Recorder {
    next: AtomicUsize,
    times: Box<[AtomicU64]>,
}

impl Recorder {
    /// A recorder for up to `capacity` fires, leaked: job closures need `'static`.
    pub(crate) fn leak(capacity: usize) -> &'static Recorder {
        Box::leak(Box::new(Recorder {
            next: AtomicUsize::new(0),
            times: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
        }))
    }

    /// Records a fire now.
    pub(crate) fn record(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.times.get(i) {
            slot.store(now, Ordering::Relaxed);
        }
    }

    /// Fires recorded (including any past capacity).
    pub(crate) fn count(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// The recorded fires as (scheduled second, lateness in ns), each fire attributed to the
    /// whole second it follows. A fire within 1 ms *before* a whole second is attributed to
    /// that second with a negative lateness (no scheduler here should fire early; a negative
    /// value would show it). A fire more than a second late would alias to the next second:
    /// the fire counts per second show it as a missing fire there.
    pub(crate) fn fires(&self) -> Vec<(u64, i64)> {
        let n = self.count().min(self.times.len());
        self.times[..n]
            .iter()
            .map(|t| {
                let t = t.load(Ordering::Relaxed);
                let (sec, sub) = (t / 1_000_000_000, (t % 1_000_000_000) as i64);
                if sub >= 999_000_000 {
                    (sec + 1, sub - 1_000_000_000)
                } else {
                    (sec, sub)
                }
            })
            .collect()
    }
}

/// The current wall time in whole seconds since the epoch, rounded up.
pub(crate) fn next_whole_second() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    d.as_secs() + 1
}

/// Sleeps (tokio) until the wall clock shows `sec` (seconds since the epoch) plus `extra`.
pub(crate) async fn sleep_until_wall(sec: u64, extra: Duration) {
    let target = UNIX_EPOCH + Duration::from_secs(sec) + extra;
    if let Ok(d) = target.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}

/// Lateness over the fires scheduled in the seconds `[first, first + secs)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lateness {
    pub(crate) fires: usize,
    pub(crate) fires_per_sec: f64,
    /// The fewest fires in one of the seconds.
    pub(crate) min_per_sec: usize,
    pub(crate) median: Duration,
    pub(crate) p99: Duration,
    pub(crate) max: Duration,
    /// Fires before their second (should be 0).
    pub(crate) early: usize,
    /// Process CPU time (all threads) over the window.
    pub(crate) cpu: Duration,
    /// Time the runtime's workers spent runnable but waiting for a CPU, over the window.
    pub(crate) waiting: Duration,
}

impl Lateness {
    /// Process CPU time over the window per fire in it, in µs.
    pub(crate) fn cpu_per_fire_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.fires.max(1) as f64
    }
}

pub(crate) fn lateness(rec: &Recorder, first: u64, secs: u64) -> Lateness {
    let fires: Vec<(u64, i64)> = rec
        .fires()
        .into_iter()
        .filter(|&(s, _)| s >= first && s < first + secs)
        .collect();
    let mut per_sec = vec![0usize; secs as usize];
    for &(s, _) in &fires {
        per_sec[(s - first) as usize] += 1;
    }
    let early = fires.iter().filter(|&&(_, l)| l < 0).count();
    let mut late: Vec<u64> = fires.iter().map(|&(_, l)| l.max(0) as u64).collect();
    late.sort_unstable();
    let pick = |q: f64| -> Duration {
        if late.is_empty() {
            return Duration::ZERO;
        }
        // Nearest rank.
        let rank = ((q * late.len() as f64).ceil() as usize).clamp(1, late.len());
        Duration::from_nanos(late[rank - 1])
    };
    Lateness {
        fires: fires.len(),
        fires_per_sec: fires.len() as f64 / secs as f64,
        min_per_sec: per_sec.iter().copied().min().unwrap_or(0),
        median: pick(0.5),
        p99: pick(0.99),
        max: late
            .last()
            .map_or(Duration::ZERO, |&n| Duration::from_nanos(n)),
        early,
        cpu: Duration::ZERO,
        waiting: Duration::ZERO,
    }
}

/// `d` in milliseconds with three decimals.
pub(crate) fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------------
// CPU

/// User + system CPU time of the whole process so far (every thread, exited ones included).
pub(crate) fn cpu_time() -> Duration {
    // SAFETY: `getrusage` only writes the struct we pass; zeroed is a valid `rusage`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage` and a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// Summary

static SUMMARY: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Adds a row (already formatted as a Markdown table row) to the summary.
pub(crate) fn summary_row(row: String) {
    println!("{row}");
    SUMMARY.lock().unwrap_or_else(|p| p.into_inner()).push(row);
}

/// Prints the summary table; registered as the last criterion target.
pub(crate) fn print_summary(_c: &mut criterion::Criterion) {
    let rows = SUMMARY.lock().unwrap_or_else(|p| p.into_inner());
    println!();
    println!("scheduler summary (registration times: see criterion's `register/*` above)");
    println!("| measurement | scheduler | result |");
    println!("|---|---|---|");
    for r in rows.iter() {
        println!("{r}");
    }
}
