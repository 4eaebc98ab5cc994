//! Achievements over a session history: a [`SnapshotStore`] fed by an incremental scan, on a
//! real workload, with every claim checked.
//!
//! Run: `cargo run --release --example achievements` (`-- --quick` for a smoke run).
//!
//! The demo writes a session history to `target/achievements-demo/` — 20,000 files of JSON
//! lines, one message per line (time, role, text length, tools called), the same every time
//! (fixed seed; written once, kept for later runs) — and computes achievements over it. The scan
//! has one item per session file, fingerprinted by modification time and size; an item's
//! contribution is that session's counts; the aggregate is totals plus count maps (per tool,
//! per day), so a changed session's old counts can be subtracted exactly. Then it shows:
//!
//! 1. a cold full scan (with a progress bar) while 1,000 readers arrive: one scan serves all;
//! 2. warm reads: p50 / p99 latency over 1,000,000 `get()` calls;
//! 3. 1% of the sessions changed: an incremental refresh against a full rescan;
//! 4. a restart (new controller and store on the same directory): the first answer from disk;
//! 5. a damaged `snapshot.json`: set aside with a warning, rebuilt, the same totals;
//! 6. the final totals against a from-scratch computation (a plain loop over the files);
//!
//! then the achievements: bronze / silver / gold per metric with unlock dates, and the longest
//! daily streak. The store's files go to `target/achievements-demo/state/`, emptied at the start.
//! The touched sessions are put back at the end. Exits with 1 if a check fails, 2 on an error.
//!
//! Flags:
//! - `--sessions N`  sessions to generate (default 20,000)
//! - `--reads N`     warm reads to time (default 1,000,000)
//! - `--data DIR`    scan your own `*.jsonl` files instead (read only: step 3 changes nothing)
//! - `--regen`       write the generated history again
//! - `--quick`       2,000 sessions and 100,000 reads, for CI smoke runs

#[path = "achievements/scan.rs"]
mod scan;
#[path = "achievements/sessions.rs"]
mod sessions;

use std::error::Error;
use std::fmt::Display;
use std::io::IsTerminal;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use job_runtime::scan::{ItemRef, ScanPlugin};
use job_runtime::snapshot::{Origin, ScanState, Snapshot, SnapshotStore};
use job_runtime::{JobPolicy, JobRuntimeController, KeyStatus, RuntimeConfig};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, spawn_blocking};

use scan::{SessionScan, Tier, Totals, list_sessions};
use sessions::Touched;

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The store's name: its directory under the state dir, and the job name in `ctl.status`.
const STORE: &str = "achievements";
/// Readers started during the cold scan.
const READERS: usize = 1_000;
/// Reads per timed batch: one `get()` takes about as long as reading the clock.
const BATCH: usize = 100;
/// Seed of the generated history.
const SEED: u64 = 0xAC41_E7E5;

const USAGE: &str =
    "usage: achievements [--sessions N] [--reads N] [--data DIR] [--regen] [--quick]";

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(checks) if checks.failed.is_empty() => ExitCode::SUCCESS,
        Ok(checks) => {
            eprintln!("\n{} check(s) failed:", checks.failed.len());
            for f in &checks.failed {
                eprintln!("  - {f}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Res<Checks> {
    let started = Instant::now();
    println!("job-runtime · achievements demo");
    // With feature `otel` and OTEL_EXPORTER_OTLP_ENDPOINT set, the demo's spans and metrics go
    // to that collector (see docs/observability.md). Before the controllers are made: their
    // metric instruments come from the meter provider installed here.
    #[cfg(feature = "otel")]
    let mut otel = otel_from_env()?;
    let mut demo = Demo::prepare(&args).await?;
    let service = demo.start()?;
    let cold = demo.cold_scan(&service).await?;
    demo.warm_reads(&service, args.reads).await?;
    let (touched, last) = demo.changes(&service, &cold).await?;
    let (service, last) = demo.restart(service, &last).await?;
    let service = demo.damaged_snapshot(service, &last).await?;
    let totals = demo.against_reference(&service).await?;
    service.stop().await;

    print_achievements(&totals);
    if let Some(t) = touched {
        let n = t.len();
        drop(t);
        println!("\nPut the {n} touched sessions back as they were.");
    }
    #[cfg(feature = "otel")]
    if let Some(otel) = otel.as_mut() {
        let _ = otel.shutdown(Duration::from_secs(5)).await;
        println!(
            "\nTelemetry: {} spans exported, {} dropped.",
            otel.exported_spans(),
            otel.dropped_spans()
        );
    }
    println!(
        "{} checks passed, {} failed, in {}.",
        demo.checks.passed,
        demo.checks.failed.len(),
        dur(started.elapsed())
    );
    Ok(demo.checks)
}

/// OpenTelemetry export when OTEL_EXPORTER_OTLP_ENDPOINT is set: the guard, after installing
/// a global subscriber with the OpenTelemetry layer (a binary may; the library never does).
#[cfg(feature = "otel")]
fn otel_from_env() -> Res<Option<job_runtime::telemetry::Telemetry>> {
    use tracing_subscriber::layer::SubscriberExt as _;
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        return Ok(None);
    }
    let otel = job_runtime::telemetry::init_from_env()?;
    let subscriber = tracing_subscriber::registry().with(otel.layer());
    tracing::subscriber::set_global_default(subscriber)?;
    println!(
        "Exporting spans and metrics to {}.",
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default()
    );
    Ok(Some(otel))
}

/// What a service holds: a controller and the store.
struct Service {
    ctl: JobRuntimeController,
    store: SnapshotStore<Totals>,
}

impl Service {
    /// The controller's counts for the store's refresh job.
    fn runs(&self) -> Res<KeyStatus> {
        Ok(self
            .ctl
            .status(STORE, "snapshot")
            .ok_or("no status for the store's key")?)
    }

    /// Shuts down as a service does before it exits.
    async fn stop(self) {
        self.ctl.shutdown(Duration::from_secs(5)).await;
    }
}

/// The demo's setup, and the checks made so far.
struct Demo {
    /// The session files.
    root: PathBuf,
    /// The store's files.
    state: PathBuf,
    /// The session files as listed at the start.
    items: Vec<ItemRef>,
    /// `--data`: the user's own files, never changed.
    own_data: bool,
    config: RuntimeConfig,
    parallelism: NonZeroUsize,
    /// How long the cold full scan took (for estimates).
    scan_time: Duration,
    checks: Checks,
}

impl Demo {
    /// Generates the history if needed (or takes the user's), empties the state directory.
    async fn prepare(args: &Args) -> Res<Self> {
        let demo = demo_dir();
        let root = match &args.data {
            Some(dir) => dir.clone(),
            None => demo.join(format!("sessions-{}", args.sessions)),
        };
        if args.data.is_none() && (args.regen || !sessions::is_generated(&root)) {
            let (dir, n) = (root.clone(), args.sessions);
            let t = Instant::now();
            let bytes = spawn_blocking(move || sessions::generate(&dir, n, SEED)).await??;
            println!(
                "   generated {} sessions ({:.1} MB) in {}",
                num(n as u64),
                bytes as f64 / 1e6,
                dur(t.elapsed())
            );
        }
        if !root.is_dir() {
            return Err(format!("{}: not a directory", show(&root)).into());
        }
        let state = demo.join("state");
        if state.exists() {
            std::fs::remove_dir_all(&state)?;
        }
        let dir = root.clone();
        let items = spawn_blocking(move || list_sessions(&dir)).await??;
        if items.is_empty() {
            return Err(format!("no *.jsonl files under {}", show(&root)).into());
        }
        let parallelism = std::thread::available_parallelism().map_or(4, |n| n.get() * 2);
        println!(
            "   data:  {} ({} session files)",
            show(&root),
            num(items.len() as u64)
        );
        println!("   state: {}", show(&state));
        Ok(Self {
            root,
            state,
            items,
            own_data: args.data.is_some(),
            // Status is kept an hour after a run, so `ctl.status` still has the counts.
            config: RuntimeConfig::from_env_with([("JOBRT_STATUS_RETENTION", "1h")])?,
            parallelism: NonZeroUsize::new(parallelism.max(4)).expect("at least 4"),
            scan_time: Duration::ZERO,
            checks: Checks::default(),
        })
    }

    /// A new controller and store on the state directory: a service (re)starting.
    fn start(&self) -> Res<Service> {
        let ctl = JobRuntimeController::new(self.config.clone());
        let scan = ScanPlugin::new(SessionScan::new(&self.root)).parallelism(self.parallelism);
        let store = SnapshotStore::builder(STORE)
            .ttl(Duration::from_secs(3600))
            .persist_dir(&self.state)
            .policy(
                JobPolicy::builder()
                    .budget(Duration::from_secs(600))
                    .build()?,
            )
            .build(&ctl, scan)?;
        Ok(Service { ctl, store })
    }

    /// Step 1: nothing in memory or on disk: every reader waits for the one scan.
    async fn cold_scan(&mut self, s: &Service) -> Res<Snapshot<Totals>> {
        println!(
            "\n1. Cold full scan, {} readers arriving while it runs",
            num(READERS as u64)
        );
        let t = Instant::now();
        let progress = ProgressWatch::start(s.store.clone());
        let first = tokio::spawn(get(&s.store));
        while s.store.status().state != ScanState::Scanning && !first.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let readers: Vec<_> = (0..READERS).map(|_| tokio::spawn(get(&s.store))).collect();
        let readers_early = s.store.peek().is_none();
        let first = first.await??;
        let first_answer = t.elapsed();
        progress.stop().await;
        let mut shared = 0;
        for r in readers {
            shared += usize::from(Arc::ptr_eq(&r.await??.data, &first.data));
        }
        let st = s.store.status();
        let key = s.runs()?;
        self.scan_time = st.last_duration.unwrap_or(first_answer);
        println!(
            "   scan: {} sessions in {} ({} items/s, {} files at a time); first answer after {}",
            num(st.items_seen),
            dur(self.scan_time),
            num((st.items_seen as f64 / self.scan_time.as_secs_f64()) as u64),
            self.parallelism,
            dur(first_answer),
        );
        println!(
            "   readers: {} {}; {} joined the scan in flight (ctl.status coalesced)",
            num(READERS as u64),
            if readers_early {
                "started before the scan ended"
            } else {
                "started, but the scan had already ended (too few sessions)"
            },
            num(key.coalesced),
        );
        self.checks.check(
            key.runs == 1,
            format!("scans run: {} (ctl.status runs)", key.runs),
        );
        self.checks.check(
            shared == READERS,
            format!(
                "{shared} of {READERS} readers got scan #{}'s value (the same Arc)",
                first.scan_id
            ),
        );
        Ok(first)
    }

    /// Step 2: a fresh read is a pointer load and an Arc clone.
    async fn warm_reads(&mut self, s: &Service, reads: usize) -> Res<()> {
        println!("\n2. Warm reads: {} get() calls", num(reads as u64));
        // In a task, as a request handler reads (not in `block_on` itself).
        let store = s.store.clone();
        let lat = tokio::spawn(async move { time_reads(&store, reads).await }).await??;
        println!(
            "   timed in batches of {BATCH} (one read is as short as a clock read): per read p50 {} · p99 {} · worst batch {} · {:.1} M reads/s",
            ns(lat.batch_p50),
            ns(lat.batch_p99),
            ns(lat.batch_max),
            lat.per_sec / 1e6,
        );
        println!(
            "   timed one by one, {} more reads: p50 {} · p99 {} · p99.9 {} (each includes ~{} of clock reading)",
            num(reads as u64),
            ns(lat.single_p50),
            ns(lat.single_p99),
            ns(lat.single_p999),
            ns(lat.clock),
        );
        let runs = s.runs()?.runs;
        self.checks.check(
            runs == 1 && !s.store.peek().is_some_and(|s| s.is_stale),
            format!(
                "{} fresh reads started no scan (runs still {runs})",
                num(2 * reads as u64),
            ),
        );
        Ok(())
    }

    /// Step 3: 1% of the sessions change: an incremental refresh recomputes those, a full rescan
    /// everything. Returns the touched files (put back on drop) and the last value.
    async fn changes(
        &mut self,
        s: &Service,
        cold: &Snapshot<Totals>,
    ) -> Res<(Option<Touched>, Snapshot<Totals>)> {
        let touched = if self.own_data {
            println!("\n3. Refresh with nothing changed (--data: your files are left as they are)");
            None
        } else {
            let ids: Vec<String> = self
                .items
                .iter()
                .step_by(100)
                .map(|i| i.id.clone())
                .collect();
            println!(
                "\n3. 1% of the sessions change (one message appended to {} files)",
                num(ids.len() as u64)
            );
            let dir = self.root.clone();
            Some(spawn_blocking(move || Touched::append(&dir, &ids)).await??)
        };
        let n_touched = touched.as_ref().map_or(0, Touched::len) as u64;
        let t = Instant::now();
        let inc = s.store.refresh_now(true, false).await?;
        let inc_time = t.elapsed();
        let inc_changed = s.store.status().items_changed;
        let t = Instant::now();
        let full = s.store.refresh_now(true, true).await?;
        let full_time = t.elapsed();
        let full_changed = s.store.status().items_changed;

        // Where the incremental time goes: the listing is timed on its own here, recomputing
        // is estimated at the cold scan's rate, the rest is the scan's per-item bookkeeping.
        let dir = self.root.clone();
        let t = Instant::now();
        spawn_blocking(move || list_sessions(&dir)).await??;
        let list_time = t.elapsed();
        let n = self.items.len() as u64;
        let recompute = self.scan_time.mul_f64(inc_changed as f64 / n as f64);
        let checkpoint = self.state.join(STORE).join("checkpoint.json");
        let checkpoint_len = std::fs::metadata(checkpoint).map_or(0, |m| m.len());
        println!(
            "   incremental refresh: {:>6} of {} sessions recomputed in {}",
            num(inc_changed),
            num(n),
            dur(inc_time)
        );
        println!(
            "     ~{:>9}  listing {} files (a stat each)",
            dur(list_time),
            num(n)
        );
        println!(
            "     ~{:>9}  recomputing {} sessions (at the cold scan's rate)",
            dur(recompute),
            num(inc_changed)
        );
        println!(
            "     ~{:>9}  the rest: carrying {} unchanged entries over, rewriting checkpoint.json ({:.1} MB)",
            dur(inc_time.saturating_sub(list_time + recompute)),
            num(n - inc_changed),
            checkpoint_len as f64 / 1e6,
        );
        println!(
            "   full rescan:         {:>6} of {} sessions recomputed in {}",
            num(full_changed),
            num(n),
            dur(full_time)
        );
        println!(
            "   → the incremental refresh took {:.1}% of the full rescan's time ({:.1}× faster)",
            100.0 * inc_time.as_secs_f64() / full_time.as_secs_f64(),
            full_time.as_secs_f64() / inc_time.as_secs_f64(),
        );
        self.checks.check(
            inc_changed == n_touched && full_changed == n,
            format!("items changed (status): {inc_changed} incremental, {full_changed} full"),
        );
        self.checks.check(
            inc.data.messages == cold.data.messages + n_touched,
            format!("the refresh saw the {n_touched} appended messages"),
        );
        self.checks.check(
            inc.data == full.data,
            format!(
                "incremental and full give the same totals{}",
                differs(&inc.data, &full.data)
            ),
        );
        Ok((touched, full))
    }

    /// Step 4: a restart: the first answer comes from the file, and the checkpoint is reused.
    async fn restart(
        &mut self,
        s: Service,
        last: &Snapshot<Totals>,
    ) -> Res<(Service, Snapshot<Totals>)> {
        println!("\n4. Restart: new controller and store on the same directory");
        s.stop().await;
        let t = Instant::now();
        let s = self.start()?;
        let snap = s.store.get().await?;
        let first_answer = t.elapsed();
        let file = self.state.join(STORE).join("snapshot.json");
        let file_len = std::fs::metadata(&file).map_or(0, |m| m.len());
        println!(
            "   first answer {} after the start: scan #{} from {:?}, {} old ({}, {:.0} KB)",
            dur(first_answer),
            snap.scan_id,
            snap.source,
            dur(snap.age()),
            show(&file),
            file_len as f64 / 1e3,
        );
        self.checks.check(
            snap.source == Origin::Disk && snap.scan_id == last.scan_id && snap.data == last.data,
            "served from disk: the last scan's totals",
        );
        let t = Instant::now();
        let again = s.store.refresh_now(true, false).await?;
        let again_time = t.elapsed();
        let changed = s.store.status().items_changed;
        println!(
            "   the checkpoint survived too: a refresh recomputed {changed} sessions, in {}",
            dur(again_time)
        );
        self.checks.check(
            changed == 0 && again.data == last.data,
            "after the restart, an incremental refresh with nothing changed recomputes nothing",
        );
        Ok((s, again))
    }

    /// Step 5: a damaged snapshot file (a torn write): set aside with a warning, rebuilt.
    async fn damaged_snapshot(&mut self, s: Service, last: &Snapshot<Totals>) -> Res<Service> {
        println!("\n5. Damaged snapshot.json (cut to half its length), then a restart");
        s.stop().await;
        let file = self.state.join(STORE).join("snapshot.json");
        let len = std::fs::metadata(&file)?.len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)?
            .set_len(len / 2)?;
        let t = Instant::now();
        let s = self.start()?;
        let warning = s.store.status().persistence;
        let rebuilt = s.store.get().await?;
        let rebuilt_in = t.elapsed();
        let st = s.store.status();
        let set_aside: Vec<String> = std::fs::read_dir(self.state.join(STORE))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("snapshot.json.corrupt-"))
            .collect();
        println!(
            "   status.persistence: {}",
            warning.as_deref().unwrap_or("(none)")
        );
        println!(
            "   rebuilt by scan #{} ({} of {} sessions recomputed{}), answer {} after the start",
            rebuilt.scan_id,
            num(st.items_changed),
            num(st.items_seen),
            if st.items_changed == 0 {
                ": checkpoint.json was intact, the totals were folded from it"
            } else {
                ""
            },
            dur(rebuilt_in)
        );
        self.checks.check(
            warning.as_deref().is_some_and(|w| w.contains("set aside")) && !set_aside.is_empty(),
            format!(
                "the damaged file was set aside with a warning ({})",
                set_aside.join(", ")
            ),
        );
        self.checks.check(
            rebuilt.source == Origin::Scan && rebuilt.data == last.data,
            format!(
                "rebuilt by a scan, the same totals{}",
                differs(&rebuilt.data, &last.data)
            ),
        );
        if rebuilt.scan_id <= last.scan_id {
            println!(
                "   note: scan ids went back from #{} to #{}: the next id is read from snapshot.json only",
                last.scan_id, rebuilt.scan_id
            );
        }
        Ok(s)
    }

    /// Step 6: the store's totals against a plain loop over the files.
    async fn against_reference(&mut self, s: &Service) -> Res<Arc<Totals>> {
        println!(
            "\n6. The totals against a from-scratch computation (a plain loop over the files)"
        );
        let dir = self.root.clone();
        let t = Instant::now();
        let expected = spawn_blocking(move || sessions::reference_totals(&dir)).await??;
        let took = t.elapsed();
        let now = s.store.get().await?;
        println!(
            "   {} sessions, {} messages, {} tool calls; computed in {}",
            num(expected.sessions),
            num(expected.messages),
            num(expected.tool_uses_total()),
            dur(took)
        );
        self.checks.check(
            *now.data == expected,
            format!(
                "the store's totals equal it{}",
                differs(&now.data, &expected)
            ),
        );
        Ok(now.data)
    }
}

/// A reader: a spawned `get()`.
fn get(store: &SnapshotStore<Totals>) -> impl Future<Output = Res<Snapshot<Totals>>> + use<> {
    let store = store.clone();
    async move { Ok(store.get().await?) }
}

/// Read latencies, in nanoseconds per read.
struct Latency {
    batch_p50: f64,
    batch_p99: f64,
    batch_max: f64,
    per_sec: f64,
    single_p50: f64,
    single_p99: f64,
    single_p999: f64,
    clock: f64,
}

/// Times `reads` reads in batches of [`BATCH`] (the mean of each batch is one sample), then
/// `reads` more one by one, and the cost of reading the clock alone.
async fn time_reads(store: &SnapshotStore<Totals>, reads: usize) -> Res<Latency> {
    let mut batches = Vec::with_capacity(reads / BATCH);
    let all = Instant::now();
    for _ in 0..reads / BATCH {
        let t = Instant::now();
        for _ in 0..BATCH {
            std::hint::black_box(store.get().await?);
        }
        batches.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    let per_sec = (reads / BATCH * BATCH) as f64 / all.elapsed().as_secs_f64();
    let mut single = Vec::with_capacity(reads);
    for _ in 0..reads {
        let t = Instant::now();
        std::hint::black_box(store.get().await?);
        single.push(t.elapsed().as_nanos() as f64);
    }
    let mut clock: Vec<f64> = (0..10_000)
        .map(|_| std::hint::black_box(Instant::now()).elapsed().as_nanos() as f64)
        .collect();
    Ok(Latency {
        batch_p50: percentile(&mut batches, 0.50),
        batch_p99: percentile(&mut batches, 0.99),
        batch_max: percentile(&mut batches, 1.0),
        per_sec,
        single_p50: percentile(&mut single, 0.50),
        single_p99: percentile(&mut single, 0.99),
        single_p999: percentile(&mut single, 0.999),
        clock: percentile(&mut clock, 0.50),
    })
}

/// The `q` quantile (nearest rank) of `v`; sorts `v`.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// The store's scan progress, drawn as a bar on a terminal and as lines otherwise.
struct ProgressWatch {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ProgressWatch {
    fn start(store: SnapshotStore<Totals>) -> Self {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let bar = std::io::stdout().is_terminal().then(|| {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
                bar.set_style(
                    ProgressStyle::with_template(
                        "   scanning [{bar:40}] {human_pos}/{human_len} sessions · eta {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar
            });
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut last = None;
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let Some(p) = store.status().progress else {
                    continue;
                };
                if last.replace(p) == Some(p) {
                    continue;
                }
                match &bar {
                    Some(bar) => {
                        bar.set_length(p.total);
                        bar.set_position(p.done);
                    }
                    None => println!(
                        "   scanning: {} of {} sessions ({:.0}%)",
                        num(p.done),
                        num(p.total),
                        100.0 * p.done as f64 / p.total.max(1) as f64
                    ),
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Self { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The achievements table.
fn print_achievements(t: &Totals) {
    let (list, streak) = scan::achievements(t);
    let span = match (t.days.first_key_value(), t.days.last_key_value()) {
        (Some((a, _)), Some((b, _))) => format!(", {} … {}", scan::date(*a), scan::date(*b)),
        _ => String::new(),
    };
    println!("\nAchievements ({} sessions{span})", num(t.sessions));
    for a in &list {
        let tier = a.tier().map_or("—", Tier::name);
        let unlocked: Vec<String> = Tier::ALL
            .iter()
            .zip(&a.unlocked)
            .filter_map(|(tier, day)| Some(format!("{} {}", tier.name(), scan::date((*day)?))))
            .collect();
        let next = a.next().map(|(tier, at)| {
            format!(
                "{} at {} ({:.0}%)",
                tier.name(),
                num(at),
                100.0 * a.value as f64 / at as f64
            )
        });
        let mut notes = unlocked;
        notes.extend(next.map(|n| format!("next: {n}")));
        let line = format!(
            "   {tier:<6}  {:<22} {:>11}   {}",
            a.name,
            num(a.value),
            notes.join(" · ")
        );
        println!("{}", line.trim_end());
    }
    if let Some(end) = streak.longest_ends {
        println!(
            "   longest daily streak: {} day(s), {} … {}; the last active day ends a streak of {}",
            streak.longest,
            scan::date(end + 1 - streak.longest as i64),
            scan::date(end),
            streak.last
        );
    }
    if t.malformed_lines > 0 {
        println!(
            "   ({} lines were not messages and were skipped)",
            num(t.malformed_lines)
        );
    }
}

/// Checks, printed as they are made; any failure makes the exit code 1.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl Display) {
        if ok {
            self.passed += 1;
            println!("   ✔ {what}");
        } else {
            println!("   ✘ FAILED: {what}");
            self.failed.push(what.to_string());
        }
    }
}

/// `": <what differs>"` when `a != b`, else nothing.
fn differs(a: &Totals, b: &Totals) -> String {
    if a == b {
        String::new()
    } else {
        format!(": {}", sessions::diff(a, b))
    }
}

/// Command-line flags.
struct Args {
    sessions: usize,
    reads: usize,
    data: Option<PathBuf>,
    regen: bool,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let (mut sessions, mut reads, mut data, mut regen, mut quick) =
            (None, None, None, false, false);
        while let Some(a) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            let count = |name: &str, v: String| {
                v.replace(['_', ','], "")
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("{name}: expected a positive number, got {v:?}"))
            };
            match a.as_str() {
                "--sessions" => sessions = Some(count("--sessions", value("--sessions")?)?),
                "--reads" => reads = Some(count("--reads", value("--reads")?)?),
                "--data" => data = Some(PathBuf::from(value("--data")?)),
                "--regen" => regen = true,
                "--quick" => quick = true,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Self {
            sessions: sessions.unwrap_or(if quick { 2_000 } else { 20_000 }),
            reads: reads
                .unwrap_or(if quick { 100_000 } else { 1_000_000 })
                .max(BATCH),
            data,
            regen,
        })
    }
}

/// `target/achievements-demo`, next to the running example when it is in `target/*/examples`.
fn demo_dir() -> PathBuf {
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        let examples = exe.parent()?;
        (examples.file_name()? == "examples")
            .then(|| examples.parent()?.parent().map(Path::to_path_buf))?
    });
    beside_exe
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("achievements-demo")
}

/// A path relative to the working directory when it is under it.
fn show(p: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    p.strip_prefix(&cwd).unwrap_or(p).display().to_string()
}

/// `12,345,678`.
fn num(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration with a unit that fits.
fn dur(d: Duration) -> String {
    ns(d.as_nanos() as f64)
}

/// Nanoseconds with a unit that fits.
fn ns(n: f64) -> String {
    match n {
        n if n < 1e3 => format!("{n:.0} ns"),
        n if n < 1e6 => format!("{:.1} µs", n / 1e3),
        n if n < 1e9 => format!("{:.1} ms", n / 1e6),
        n => format!("{:.2} s", n / 1e9),
    }
}
