//! A plain loop of one trivial run after another, for counting instructions (valgrind) and
//! profiling (perf) the run path; the timed, side-by-side figures come from `runtime`.
//!
//! ```text
//! cargo bench --bench run_loop --no-run
//! B=$(ls -t target/release/deps/run_loop-* | grep -v '\.d$' | head -1)
//! $B spawn|same|distinct [runs per round]      # best of 7 rounds, ns per run
//! valgrind --tool=callgrind $B same 5000       # and again with 10000: the difference
//!                                              # ÷ 35,000 is instructions per run
//! valgrind --tool=callgrind $B join 5          # and again with 10: the difference
//!                                              # ÷ 35,000 is instructions per caller
//! ```
//!
//! `spawn` is the baseline (`tokio::spawn(..).await`); `same` runs one key, `distinct` a new
//! key each time. Everything runs inside one task of a current-thread runtime, as in
//! `runtime`'s `run/current_thread` group.
//!
//! `join` and `join_shared` count what `runtime`'s `coalesce/1000_callers_1ms` group times:
//! each round is 1,000 callers in one `join_all` on a fresh key, the work a `yield_now` instead
//! of a 1 ms sleep (so no timer is counted); `join_shared` is that group's baseline, one
//! spawned task behind a `futures::future::Shared` cloned 1,000 times.

use std::fmt::Write;
use std::time::Instant;

use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mode = args.next().unwrap_or_else(|| "same".into());
    let n: u64 = args
        .next()
        .map_or(300_000, |s| s.parse().expect("runs per round"));
    assert!(
        ["spawn", "same", "distinct", "join", "join_shared"].contains(&mode.as_str()),
        "mode is spawn, same, distinct, join or join_shared, not `{mode}`"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ctl = JobRuntimeController::new(RuntimeConfig::default());
    let policy = JobPolicy::default();
    let best = rt.block_on(async move {
        tokio::spawn(async move {
            let mut key = String::new();
            let mut best = f64::MAX;
            for round in 0..7u64 {
                let start = Instant::now();
                for i in round * n..(round + 1) * n {
                    if mode.starts_with("join") {
                        key.clear();
                        write!(key, "k{i}").expect("write to a String");
                        join_round(&ctl, &policy, &key, mode == "join_shared").await;
                        continue;
                    }
                    if mode == "spawn" {
                        let v = tokio::spawn(async move { i }).await.expect("join");
                        std::hint::black_box(v);
                        continue;
                    }
                    key.clear();
                    if mode == "distinct" {
                        write!(key, "k{i}").expect("write to a String");
                    } else {
                        key.push_str("same");
                    }
                    let v = ctl
                        .run("bench", &key, &policy, move |_| async move { Ok(i) })
                        .await
                        .expect("trivial job succeeds");
                    std::hint::black_box(v);
                }
                best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
            }
            best
        })
        .await
        .expect("loop task")
    });
    println!("best of 7 rounds: {best:.0} ns per run (per round of 1,000 callers: join)");
}

/// 1,000 callers of one fresh key in one `join_all`: through the controller, or (`shared`)
/// through one spawned task behind a `futures::future::Shared`. Every caller must get the one
/// value.
async fn join_round(ctl: &JobRuntimeController, policy: &JobPolicy, key: &str, shared: bool) {
    use futures::FutureExt;
    use futures::future::join_all;
    use std::sync::Arc;
    let out: Vec<Arc<u64>> = if shared {
        let task = tokio::spawn(async {
            tokio::task::yield_now().await;
            Arc::new(42)
        });
        let work: std::pin::Pin<Box<dyn Future<Output = Arc<u64>> + Send>> =
            Box::pin(task.map(|r| r.expect("work")));
        let s = work.shared();
        join_all((0..1000).map(|_| s.clone())).await
    } else {
        join_all((0..1000).map(|_| {
            ctl.run("coalesce", key, policy, |_ctx| async {
                tokio::task::yield_now().await;
                Ok(42u64)
            })
            .map(|r| r.expect("trivial job succeeds"))
        }))
        .await
    };
    assert!(
        out.iter().all(|v| Arc::ptr_eq(v, &out[0])),
        "one shared value"
    );
}
