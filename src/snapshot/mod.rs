//! Snapshots: answer from memory at once, refresh in the background, survive restarts.
//!
//! Why: a service page computed by scanning thousands of files cannot rescan on every request,
//! must never run two scans at once, and must keep answering when a scan fails or the process
//! restarts. A [`SnapshotStore`] keeps the last good value in memory (a pointer load to read),
//! refreshes it through the [`JobRuntimeController`](crate::JobRuntimeController) — so the
//! job's overlap policy, cooldown, budget, retry and limits all apply and at most one refresh
//! runs at a time — and writes it to disk after each successful scan, crash-safely.
//!
//! A read is one of:
//! - **fresh** (younger than `ttl`): returned at once;
//! - **stale**: returned at once, and one background refresh starts (however many readers);
//! - **missing** (nothing in memory or on disk): the reader waits for the first scan, which
//!   every concurrent first reader shares;
//! - **too stale** (older than `max_stale`, if set): the reader waits for the refresh up to
//!   `max_stale_wait`, then gets the stale value.
//!
//! A failed refresh keeps the last good value (readers see no error) and shows the error in
//! [`ScanStatus`]. See [`persist`] for the file protocol and [`crate::scan`] for incremental
//! scans.

pub mod persist;
mod store;

pub use store::{
    Origin, Produce, Produced, RefreshPlugin, ScanState, ScanStatus, Snapshot, SnapshotSource,
    SnapshotStore, SnapshotStoreBuilder,
};
