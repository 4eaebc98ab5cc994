//! A few jobs under contention, and a report of what the controller did.
//!
//! Run: `cargo run --example quickstart`
//!
//! - 200 callers ask for the same "scan" at once: one run, one shared result.
//! - Callers arriving during the scan's cooldown are refused at once with the time to wait.
//! - A flaky "fetch" fails twice and succeeds on the third attempt, with jittered backoff.
//! - 40 "report" jobs on distinct keys share a concurrency group of 4 and a rate limit.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use job_runtime::{
    Jitter, JobError, JobPolicy, JobRuntimeController, RateLimit, RetryPolicy, RunError,
    RuntimeConfig,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = RuntimeConfig::from_env()?
        .concurrency_group("db", NonZeroUsize::new(4).unwrap())
        .rate_limit_group("db", RateLimit::parse("200/s burst 10")?);
    let ctl = JobRuntimeController::new(config);
    let wall = Instant::now();

    // 1. Single-flight under contention.
    let scan_runs = Arc::new(AtomicUsize::new(0));
    let scan = JobPolicy::builder()
        .cooldown(Duration::from_secs(2))
        .build()?;
    let callers = (0..200).map(|_| {
        let (ctl, scan, runs) = (ctl.clone(), scan.clone(), scan_runs.clone());
        tokio::spawn(async move {
            ctl.run("scan", "sessions", &scan, move |ctx| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    for i in 0..=10 {
                        ctx.progress(i, 10);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok::<_, RunError>(format!("scanned by attempt {}", ctx.attempt()))
                }
            })
            .await
        })
    });
    let results: Vec<_> = futures_join(callers).await;
    let first = results[0].as_ref().unwrap().clone();
    let shared = results
        .iter()
        .filter(|r| Arc::ptr_eq(r.as_ref().unwrap(), &first))
        .count();

    // 2. Cooldown: the next callers are refused at once.
    let mut refused = 0;
    let mut wait_hint = Duration::ZERO;
    for _ in 0..50 {
        match ctl
            .run("scan", "sessions", &scan, |_| async { Ok(String::new()) })
            .await
        {
            Err(JobError::CoolingDown { remaining, .. }) => {
                refused += 1;
                wait_hint = remaining;
            }
            other => println!("unexpected: {other:?}"),
        }
    }
    // A forced (manual) rescan bypasses the cooldown.
    ctl.run_forced("scan", "sessions", &scan, |_| async {
        Ok(String::from("forced"))
    })
    .await?;

    // 3. Retry with jitter.
    let fetch_attempts = Arc::new(AtomicUsize::new(0));
    let fetch = JobPolicy::builder()
        .retry(
            RetryPolicy::builder()
                .max_attempts(5)
                .base_delay(Duration::from_millis(20))
                .max_delay(Duration::from_millis(200))
                .jitter(Jitter::Full)
                .build()?,
        )
        .budget(Duration::from_secs(5))
        .build()?;
    let a = fetch_attempts.clone();
    let body = ctl
        .run("fetch", "upstream", &fetch, move |ctx| {
            let a = a.clone();
            async move {
                a.fetch_add(1, Ordering::SeqCst);
                if ctx.attempt() < 3 {
                    Err(RunError::msg("upstream returned 503"))
                } else {
                    Ok(format!("ok on attempt {}", ctx.attempt()))
                }
            }
        })
        .await?;

    // 4. Bounded concurrency in a group.
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let report = JobPolicy::builder().group("db").build()?;
    let reports = (0..40).map(|i| {
        let (ctl, report, running, peak) =
            (ctl.clone(), report.clone(), running.clone(), peak.clone());
        tokio::spawn(async move {
            ctl.run("report", &format!("customer-{i}"), &report, move |_| {
                let (running, peak) = (running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, RunError>(i)
                }
            })
            .await
        })
    });
    let done = futures_join(reports)
        .await
        .into_iter()
        .filter(|r| r.is_ok())
        .count();

    let s = ctl.status("scan", "sessions").expect("scan has status");
    let f = ctl.status("fetch", "upstream").expect("fetch has status");
    println!(
        "job-runtime quickstart report ({:.0?} in all)",
        wall.elapsed()
    );
    println!(
        "  scan:   200 concurrent callers -> {} run(s) of the body, {shared} callers got the same Arc, {} coalesced",
        scan_runs.load(Ordering::SeqCst),
        s.coalesced
    );
    println!(
        "  scan:   {refused} calls refused during the cooldown (next allowed in {wait_hint:.0?}), then 1 forced rescan; runs in status: {}",
        s.runs
    );
    println!(
        "  fetch:  {} attempts, {} retries, result: {body}",
        fetch_attempts.load(Ordering::SeqCst),
        f.retries
    );
    println!(
        "  report: {done}/40 runs done, at most {} at once (group limit 4)",
        peak.load(Ordering::SeqCst)
    );
    println!("  status of scan as JSON: {}", serde_json_lite(&s));
    Ok(())
}

/// Spawns everything first (the iterator is drained), then waits for each.
async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let handles: Vec<_> = handles.collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task did not panic"));
    }
    out
}

fn serde_json_lite(s: &job_runtime::KeyStatus) -> String {
    serde_json::to_string(s).unwrap_or_else(|e| format!("<{e}>"))
}
