//! Hooks: listeners see started / succeeded / failed / skipped / retried / stuck events, and a
//! slow, failing or overwhelmed listener never delays a run (bounded channel, overflow counted).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use job_runtime::hooks::{EventKind, JobEvent};
use job_runtime::time::Instant;
use job_runtime::{JobPolicy, JobRuntimeController, Overlap, RunError, RuntimeConfig};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

type Log = Arc<Mutex<Vec<JobEvent>>>;

fn recorder(ctl: &JobRuntimeController) -> Log {
    let log: Log = Arc::default();
    let l = Arc::clone(&log);
    ctl.listen(1024, move |e| {
        let l = Arc::clone(&l);
        async move { l.lock().unwrap().push(e) }
    });
    log
}

fn kinds(log: &Log) -> Vec<(EventKind, u32)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|e| (e.kind, e.attempt))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn every_kind_of_event_reaches_the_listener() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let log = recorder(&ctl);

    // Started, Retried, Succeeded.
    let flaky = JobPolicy::builder().max_attempts(2).build().unwrap();
    let tries = Arc::new(Mutex::new(0));
    let t = Arc::clone(&tries);
    ctl.run("flaky", "k", &flaky, move |_ctx| {
        let t = Arc::clone(&t);
        async move {
            let mut n = t.lock().unwrap();
            *n += 1;
            if *n == 1 {
                Err(RunError::msg("first try fails"))
            } else {
                Ok(1)
            }
        }
    })
    .await
    .unwrap();
    tokio::task::yield_now().await;
    assert_eq!(
        kinds(&log),
        [
            (EventKind::Started, 1),
            (EventKind::Retried, 1),
            (EventKind::Succeeded, 0)
        ]
    );
    let done = log.lock().unwrap()[2].clone();
    assert_eq!((&*done.job, &*done.key), ("flaky", "k"));
    assert!(done.duration.is_some());
    log.lock().unwrap().clear();

    // Skipped: cooling down; and busy under overlap Skip.
    let cool = JobPolicy::builder().cooldown(secs(60)).build().unwrap();
    ctl.run("cool", "k", &cool, |_| async { Ok(1) })
        .await
        .unwrap();
    ctl.run("cool", "k", &cool, |_| async { Ok(1) })
        .await
        .unwrap_err();
    let skip = JobPolicy::builder().overlap(Overlap::Skip).build().unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = Arc::clone(&gate);
    let held = tokio::spawn({
        let (ctl, skip) = (ctl.clone(), skip.clone());
        async move {
            ctl.run("busy", "k", &skip, move |_| {
                let g = Arc::clone(&g);
                async move {
                    g.notified().await;
                    Ok(1)
                }
            })
            .await
        }
    });
    tokio::task::yield_now().await;
    let busy = ctl
        .run("busy", "k", &skip, |_| async { Ok(2) })
        .await
        .unwrap_err();
    assert_eq!(busy.kind(), "busy");
    gate.notify_one();
    held.await.unwrap().unwrap();
    // Failed, and Stuck.
    ctl.run("fail", "k", &JobPolicy::default(), |_| async {
        Err::<u32, _>(RunError::msg("no"))
    })
    .await
    .unwrap_err();
    let stuck = JobPolicy::builder()
        .heartbeat_timeout(secs(1))
        .build()
        .unwrap();
    ctl.run("stuck", "k", &stuck, |ctx| async move {
        ctx.cancelled().await;
        Ok(0)
    })
    .await
    .unwrap_err();
    tokio::task::yield_now().await;
    let by_job: Vec<(String, EventKind)> = log
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.job.to_string(), e.kind))
        .collect();
    let expect = |job: &str, kind| (job.to_string(), kind);
    assert_eq!(
        by_job,
        [
            expect("cool", EventKind::Started),
            expect("cool", EventKind::Succeeded),
            expect("cool", EventKind::Skipped),
            expect("busy", EventKind::Started),
            expect("busy", EventKind::Skipped),
            expect("busy", EventKind::Succeeded),
            expect("fail", EventKind::Started),
            expect("fail", EventKind::Failed),
            expect("stuck", EventKind::Started),
            expect("stuck", EventKind::Stuck),
            expect("stuck", EventKind::Failed),
        ]
    );
    let skipped = &log.lock().unwrap()[2];
    assert_eq!(skipped.error.as_ref().unwrap().kind(), "cooling_down");
}

#[tokio::test(start_paused = true)]
async fn a_slow_listener_never_delays_runs_and_its_overflow_is_counted() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    // 10 s per event, room for 4 queued.
    let slow = ctl.listen(4, |_e| async { tokio::time::sleep(secs(10)).await });
    let start = Instant::now();
    for i in 0..50 {
        ctl.run("j", &format!("k{i}"), &JobPolicy::default(), |_| async {
            Ok(1)
        })
        .await
        .unwrap();
    }
    assert_eq!(start.elapsed(), Duration::ZERO, "100 events, no run waited");
    assert!(slow.overflowed() >= 100 - 5, "{}", slow.overflowed());
    tokio::time::sleep(secs(1000)).await;
    assert_eq!(slow.delivered() + slow.overflowed(), 100);
    assert_eq!(slow.panicked(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_listener_is_counted_and_goes_on() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let seen = Arc::new(Mutex::new(0));
    let s = Arc::clone(&seen);
    let l = ctl.listen(64, move |e| {
        let s = Arc::clone(&s);
        async move {
            if e.kind == EventKind::Started {
                panic!("listener exploded");
            }
            *s.lock().unwrap() += 1;
        }
    });
    for _ in 0..3 {
        ctl.run("j", "k", &JobPolicy::default(), |_| async { Ok(1) })
            .await
            .unwrap();
    }
    tokio::time::sleep(secs(1)).await;
    assert_eq!(
        (l.delivered(), l.panicked(), *seen.lock().unwrap()),
        (6, 3, 3)
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_even_with_a_listener_that_never_returns() {
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let _l = ctl.listen(8, |_e| std::future::pending::<()>());
    ctl.run("j", "k", &JobPolicy::default(), |_| async { Ok(1) })
        .await
        .unwrap();
    let start = Instant::now();
    assert!(ctl.shutdown(secs(2)).await, "no run was left");
    assert_eq!(
        start.elapsed(),
        secs(2),
        "the listener got the grace, then was left"
    );
}
