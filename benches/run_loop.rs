//! A plain loop of one trivial run after another, for counting instructions (valgrind) and
//! profiling (perf) the run path; the timed, side-by-side figures come from `runtime`.
//!
//! ```text
//! cargo bench --bench run_loop --no-run
//! B=$(ls -t target/release/deps/run_loop-* | grep -v '\.d$' | head -1)
//! $B spawn|same|distinct [runs per round]      # best of 7 rounds, ns per run
//! valgrind --tool=callgrind $B same 5000       # and again with 10000: the difference
//!                                              # ÷ 35,000 is instructions per run
//! ```
//!
//! `spawn` is the baseline (`tokio::spawn(..).await`); `same` runs one key, `distinct` a new
//! key each time. Everything runs inside one task of a current-thread runtime, as in
//! `runtime`'s `run/current_thread` group.

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
        ["spawn", "same", "distinct"].contains(&mode.as_str()),
        "mode is spawn, same or distinct, not `{mode}`"
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
    println!("best of 7 rounds: {best:.0} ns per run");
}
