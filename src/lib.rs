//! # job-runtime
//!
//! Run background jobs safely inside a service: one run per key at a time with the result
//! shared with everyone who asked, cooldowns, time budgets, retry with jitter, bounded
//! concurrency and rate limits — configured from `JOBRT_*` variables.
//!
//! The heart is [`JobRuntimeController`]; see its docs and `docs/pipeline.md` for the order
//! of the checks every run goes through.
//!
//! ```
//! use job_runtime::{JobPolicy, JobRuntimeController, RuntimeConfig};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let ctl = JobRuntimeController::new(RuntimeConfig::from_env().unwrap());
//! let policy = JobPolicy::builder().cooldown(Duration::from_secs(60)).build().unwrap();
//! let n = ctl.run("scan", "all", &policy, |_ctx| async { Ok(42) }).await.unwrap();
//! assert_eq!(*n, 42);
//! // Within the cooldown a second call is refused at once, with the time to wait.
//! let err = ctl.run("scan", "all", &policy, |_ctx| async { Ok(43) }).await.unwrap_err();
//! assert!(err.retry_after().is_some());
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

pub mod budget;
#[cfg(feature = "tokio-cron-scheduler")]
pub mod compat;
pub mod config;
pub mod controller;
pub mod cooldown;
pub mod coord;
pub mod error;
pub mod flight;
pub mod hooks;
pub mod job;
pub mod limit;
pub mod lock;
pub mod retry;
pub mod runtime;
pub mod scan;
pub mod schedule;
pub mod snapshot;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod time;

pub use config::RuntimeConfig;
pub use controller::{JobRuntimeController, KeyStatus, RunState};
pub use cooldown::Cooldown;
pub use coord::Coordinator;
pub use error::{ConfigError, Decision, JobError, RunError};
pub use job::{Job, JobContext, JobPolicy, Overlap};
pub use limit::RateLimit;
pub use retry::{Jitter, RetryPolicy};
