//! Thread-local subscribers in a test binary whose tests run in parallel.
//!
//! `tracing` caches one interest per callsite for the whole process, computed when the
//! callsite is first reached. While at most one dispatcher is registered, that first reach asks
//! the reaching thread's own default: a test with no subscriber makes it `NoSubscriber`, which
//! answers "never", and the callsite stays off for every thread, including one whose test
//! installed a subscriber with `set_default` to look at those spans. (CI saw this once: a test
//! found none of the `job.trigger` spans it counted.)
//!
//! [`scoped`] first installs, once per process, a global default that keeps every callsite at
//! "sometimes" (and records nothing), so each span and event asks the dispatcher of the thread
//! it is on; then it installs the test's subscriber for this thread.

#![allow(dead_code)]

use std::sync::Once;

use tracing::subscriber::{DefaultGuard, Interest};
use tracing::{Event, Metadata, Subscriber, span};

/// A global default that records nothing and never lets a callsite's interest be cached as
/// "never" or "always".
struct AskEachTime;

impl Subscriber for AskEachTime {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        // Not called while `enabled` is false; an id is needed to satisfy the trait.
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// Installs [`AskEachTime`] as the global default, once per process. A test binary that already
/// has a global default keeps it (and its callsites are then not at risk).
pub fn ask_each_time() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(AskEachTime);
    });
}

/// `tracing::subscriber::set_default(subscriber)`, after [`ask_each_time`]: the subscriber sees
/// every span and event made on this thread while the guard lives, whichever test reached the
/// callsite first.
pub fn scoped<S: Subscriber + Send + Sync + 'static>(subscriber: S) -> DefaultGuard {
    ask_each_time();
    tracing::subscriber::set_default(subscriber)
}
