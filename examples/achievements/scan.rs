//! The achievements scan: what one session file adds, how the totals fold, and what the
//! achievements are, derived from the totals.
//!
//! Every part of [`Totals`] is a sum or a count map, never a max or a "first seen": that is
//! what lets [`SessionScan::subtract`] take a changed session's old counts out exactly. The
//! longest streak, the tiers and their unlock dates are derived from the per-day counts when
//! the report is printed, not stored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use job_runtime::scan::{IncrementalScan, ItemRef};
use job_runtime::{JobContext, RunError};
use serde::{Deserialize, Serialize};

/// Seconds in a day; a day is a UTC calendar day, numbered from 1970-01-01.
pub const DAY: i64 = 86_400;

/// One line of a session file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Message {
    /// Unix seconds.
    pub ts: i64,
    /// Who wrote it.
    pub role: Role,
    /// Characters of text.
    pub len: u64,
    /// Tools called by this message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The person.
    User,
    /// The assistant.
    Assistant,
    /// Anything else (system, tool output) in a user's own files.
    #[serde(other)]
    Other,
}

/// What one day of one session adds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayCounts {
    /// Messages that day.
    pub messages: u64,
    /// Tool calls that day.
    pub tool_uses: u64,
    /// Characters typed by the user that day.
    pub chars_typed: u64,
}

/// The contribution of one session file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCounts {
    /// Valid messages.
    pub messages: u64,
    /// Of which by the user.
    pub user_messages: u64,
    /// Characters typed by the user.
    pub chars_typed: u64,
    /// Calls per tool.
    pub tool_uses: BTreeMap<String, u64>,
    /// The days the session was active on, with what it did each day.
    pub days: BTreeMap<i64, DayCounts>,
    /// The day of its earliest message (`None`: no valid message).
    pub start_day: Option<i64>,
    /// Lines that are not a message.
    pub malformed_lines: u64,
}

impl SessionCounts {
    /// Counts one session file's bytes (JSON lines; blank lines skipped, bad ones counted).
    pub fn parse(bytes: &[u8]) -> Self {
        let mut c = Self::default();
        let mut first_ts = None::<i64>;
        for line in bytes.split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(m) = serde_json::from_slice::<Message>(line) else {
                c.malformed_lines += 1;
                continue;
            };
            let typed = if m.role == Role::User { m.len } else { 0 };
            c.messages += 1;
            c.user_messages += u64::from(m.role == Role::User);
            c.chars_typed += typed;
            for t in &m.tools {
                *c.tool_uses.entry(t.clone()).or_default() += 1;
            }
            let day = c.days.entry(m.ts.div_euclid(DAY)).or_default();
            day.messages += 1;
            day.tool_uses += m.tools.len() as u64;
            day.chars_typed += typed;
            first_ts = Some(first_ts.map_or(m.ts, |f| f.min(m.ts)));
        }
        c.start_day = first_ts.map(|t| t.div_euclid(DAY));
        c
    }
}

/// One day across all sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Day {
    /// Sessions active that day (a session over midnight counts on both days).
    pub sessions_active: u64,
    /// Sessions whose first message was that day.
    pub sessions_started: u64,
    /// Messages, tool calls and typed characters that day.
    #[serde(flatten)]
    pub counts: DayCounts,
}

/// The aggregate the store serves: totals and count maps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Session files.
    pub sessions: u64,
    /// Valid messages.
    pub messages: u64,
    /// Of which by the user.
    pub user_messages: u64,
    /// Characters typed by the user.
    pub chars_typed: u64,
    /// Lines that are not a message.
    pub malformed_lines: u64,
    /// Calls per tool (no zero entries).
    pub tool_uses: BTreeMap<String, u64>,
    /// Per active day (no empty days).
    pub days: BTreeMap<i64, Day>,
}

impl Totals {
    /// Tool calls of all tools.
    pub fn tool_uses_total(&self) -> u64 {
        self.tool_uses.values().sum()
    }
}

/// Sessions as items: one `.jsonl` file under `root` each, fingerprinted by mtime and size.
#[derive(Debug)]
pub struct SessionScan {
    root: PathBuf,
}

impl SessionScan {
    /// A scan of the session files under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl IncrementalScan for SessionScan {
    type Aggregate = Totals;
    type Contribution = SessionCounts;

    async fn list(&self, _ctx: &JobContext) -> Result<Vec<ItemRef>, RunError> {
        let root = self.root.clone();
        Ok(tokio::task::spawn_blocking(move || list_sessions(&root)).await??)
    }

    async fn compute(&self, item: &ItemRef, _ctx: &JobContext) -> Result<SessionCounts, RunError> {
        let path = self.root.join(&item.id);
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(path)).await??;
        Ok(SessionCounts::parse(&bytes))
    }

    fn add(&self, t: &mut Totals, c: &SessionCounts) {
        t.sessions += 1;
        t.messages += c.messages;
        t.user_messages += c.user_messages;
        t.chars_typed += c.chars_typed;
        t.malformed_lines += c.malformed_lines;
        for (tool, n) in &c.tool_uses {
            *t.tool_uses.entry(tool.clone()).or_default() += n;
        }
        for (day, dc) in &c.days {
            let d = t.days.entry(*day).or_default();
            d.sessions_active += 1;
            d.counts.messages += dc.messages;
            d.counts.tool_uses += dc.tool_uses;
            d.counts.chars_typed += dc.chars_typed;
        }
        if let Some(day) = c.start_day {
            t.days.entry(day).or_default().sessions_started += 1;
        }
    }

    fn subtract(&self, t: &mut Totals, c: &SessionCounts) {
        take(&mut t.sessions, 1);
        take(&mut t.messages, c.messages);
        take(&mut t.user_messages, c.user_messages);
        take(&mut t.chars_typed, c.chars_typed);
        take(&mut t.malformed_lines, c.malformed_lines);
        for (tool, n) in &c.tool_uses {
            let left = t.tool_uses.get_mut(tool).expect("a tool that was added");
            take(left, *n);
            if *left == 0 {
                t.tool_uses.remove(tool);
            }
        }
        let mut touched: BTreeSet<i64> = c.days.keys().copied().collect();
        for (day, dc) in &c.days {
            let d = t.days.get_mut(day).expect("a day that was added");
            take(&mut d.sessions_active, 1);
            take(&mut d.counts.messages, dc.messages);
            take(&mut d.counts.tool_uses, dc.tool_uses);
            take(&mut d.counts.chars_typed, dc.chars_typed);
        }
        if let Some(day) = c.start_day {
            take(
                &mut t
                    .days
                    .get_mut(&day)
                    .expect("a day that was added")
                    .sessions_started,
                1,
            );
            touched.insert(day);
        }
        // No empty entries: the totals must equal a fold that never saw this session.
        for day in touched {
            if t.days.get(&day) == Some(&Day::default()) {
                t.days.remove(&day);
            }
        }
    }
}

/// `x -= n`, refusing to go below zero: that would be a contribution taken out twice.
fn take(x: &mut u64, n: u64) {
    *x = x
        .checked_sub(n)
        .expect("subtract takes out only what add put in");
}

/// Every `.jsonl` file under `root` (recursively), sorted by relative path, with its
/// fingerprint: modification time in nanoseconds and size in bytes.
pub fn list_sessions(root: &Path) -> std::io::Result<Vec<ItemRef>> {
    let mut items = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "jsonl") {
                let meta = entry.metadata()?;
                let mtime = meta
                    .modified()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                let id = path
                    .strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .replace('\\', "/");
                items.push(ItemRef::new(id, format!("{mtime}:{}", meta.len())));
            }
        }
    }
    items.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(items)
}

// ----- Achievements, derived from the totals -----

/// A tier of an achievement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// The first.
    Bronze,
    /// The second.
    Silver,
    /// The third.
    Gold,
}

impl Tier {
    /// All tiers, lowest first.
    pub const ALL: [Tier; 3] = [Tier::Bronze, Tier::Silver, Tier::Gold];

    /// The tier's name.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Bronze => "bronze",
            Tier::Silver => "silver",
            Tier::Gold => "gold",
        }
    }
}

/// One metric with its tiers.
#[derive(Debug)]
pub struct Achievement {
    /// What is counted.
    pub name: String,
    /// Its value now.
    pub value: u64,
    /// Bronze, silver and gold thresholds.
    pub thresholds: [u64; 3],
    /// The day each tier was reached (when the metric has a history by day).
    pub unlocked: [Option<i64>; 3],
}

impl Achievement {
    /// The highest tier reached.
    pub fn tier(&self) -> Option<Tier> {
        Tier::ALL
            .into_iter()
            .zip(self.thresholds)
            .rev()
            .find(|&(_, t)| self.value >= t)
            .map(|(tier, _)| tier)
    }

    /// The next tier and its threshold, if any is left.
    pub fn next(&self) -> Option<(Tier, u64)> {
        Tier::ALL
            .into_iter()
            .zip(self.thresholds)
            .find(|&(_, t)| self.value < t)
    }
}

/// Streaks of consecutive active days.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Streaks {
    /// The longest streak, in days.
    pub longest: u64,
    /// Its last day.
    pub longest_ends: Option<i64>,
    /// The streak that ends on the last active day.
    pub last: u64,
    /// The day each length was first reached, for the given thresholds.
    pub reached: Vec<Option<i64>>,
}

/// Longest and last streak, and when each of `thresholds` was first reached.
pub fn streaks(days: &BTreeMap<i64, Day>, thresholds: &[u64]) -> Streaks {
    let mut s = Streaks {
        reached: vec![None; thresholds.len()],
        ..Streaks::default()
    };
    let mut prev = None;
    for &day in days.keys() {
        s.last = if prev == Some(day - 1) { s.last + 1 } else { 1 };
        prev = Some(day);
        if s.last > s.longest {
            s.longest = s.last;
            s.longest_ends = Some(day);
        }
        for (r, &t) in s.reached.iter_mut().zip(thresholds) {
            if r.is_none() && s.last >= t {
                *r = Some(day);
            }
        }
    }
    s
}

/// The achievements of `t`: one per metric, then one per tool.
pub fn achievements(t: &Totals) -> (Vec<Achievement>, Streaks) {
    /// The day a running sum of `f` over the days first reaches each threshold.
    fn unlocked(t: &Totals, thresholds: [u64; 3], f: impl Fn(&Day) -> u64) -> [Option<i64>; 3] {
        let mut at = [None; 3];
        let mut sum = 0;
        for (&day, d) in &t.days {
            sum += f(d);
            for (a, &th) in at.iter_mut().zip(&thresholds) {
                if a.is_none() && sum >= th {
                    *a = Some(day);
                }
            }
        }
        at
    }
    let metric = |name: &str, value: u64, thresholds: [u64; 3], f: fn(&Day) -> u64| Achievement {
        name: name.to_string(),
        value,
        thresholds,
        unlocked: unlocked(t, thresholds, f),
    };
    const STREAK: [u64; 3] = [7, 30, 100];
    let streak = streaks(&t.days, &STREAK);
    let mut v = vec![
        metric("sessions", t.sessions, [100, 1_000, 10_000], |d| {
            d.sessions_started
        }),
        metric("messages", t.messages, [10_000, 100_000, 1_000_000], |d| {
            d.counts.messages
        }),
        metric(
            "tool calls",
            t.tool_uses_total(),
            [1_000, 10_000, 100_000],
            |d| d.counts.tool_uses,
        ),
        metric(
            "characters typed",
            t.chars_typed,
            [100_000, 1_000_000, 10_000_000],
            |d| d.counts.chars_typed,
        ),
        metric("active days", t.days.len() as u64, [30, 180, 365], |_| 1),
        Achievement {
            name: "longest streak (days)".into(),
            value: streak.longest,
            thresholds: STREAK,
            unlocked: [streak.reached[0], streak.reached[1], streak.reached[2]],
        },
    ];
    for (tool, &n) in &t.tool_uses {
        v.push(Achievement {
            name: format!("tool: {tool}"),
            value: n,
            thresholds: [100, 1_000, 10_000],
            unlocked: [None; 3],
        });
    }
    (v, streak)
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01; Howard Hinnant's `civil_from_days`).
pub fn date(day: i64) -> String {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(19_358), "2023-01-01");
        assert_eq!(date(-1), "1969-12-31");
        assert_eq!(date(19_417), "2023-03-01");
    }
}
