//! The demo's data: a deterministic session history, the "1% of sessions changed" edit (undone
//! on drop), and an independent from-scratch computation of the totals to check the store by.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::scan::{DAY, Message, Role, Totals, list_sessions};

/// 2023-01-01, the first day of the generated history.
const FIRST_DAY: i64 = 19_358;
/// How many days the history spans (about 18 months).
const SPAN_DAYS: i64 = 540;
/// Tools, with how often each is called relative to the others.
const TOOLS: &[(&str, usize)] = &[
    ("read", 4),
    ("edit", 3),
    ("bash", 3),
    ("grep", 2),
    ("test", 2),
    ("write", 1),
    ("web_search", 1),
];
/// Written last: a directory without it is an interrupted generation.
const COMPLETE: &str = ".complete";

/// Whether `dir` holds a complete generated history.
pub fn is_generated(dir: &Path) -> bool {
    dir.join(COMPLETE).exists()
}

/// Writes `n` sessions under `dir` (replacing what is there), deterministically from `seed`:
/// `project-XX/session-NNNNNN.jsonl`, one JSON message per line. Returns the bytes written.
pub fn generate(dir: &Path, n: usize, seed: u64) -> io::Result<u64> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    for p in 0..16 {
        std::fs::create_dir_all(dir.join(format!("project-{p:02}")))?;
    }
    let calendar = active_days(seed);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bytes = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let calendar = &calendar;
                s.spawn(move || -> io::Result<u64> {
                    let mut written = 0;
                    let mut buf = Vec::new();
                    for i in (t..n).step_by(threads) {
                        buf.clear();
                        write_session(&mut buf, i, seed, calendar)?;
                        std::fs::write(dir.join(session_path(i)), &buf)?;
                        written += buf.len() as u64;
                    }
                    Ok(written)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a generator thread panicked"))
            .sum::<io::Result<u64>>()
    })?;
    std::fs::write(
        dir.join(COMPLETE),
        format!("{n} sessions, seed {seed:#x}\n"),
    )?;
    Ok(bytes)
}

fn session_path(i: usize) -> String {
    format!("project-{:02}/session-{i:06}.jsonl", i % 16)
}

/// The days with any activity: most weekdays, some weekends, and a few holidays off.
fn active_days(seed: u64) -> Vec<i64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut days = Vec::new();
    let mut holiday = 0;
    for d in FIRST_DAY..FIRST_DAY + SPAN_DAYS {
        if holiday == 0 && rng.f64() < 0.015 {
            holiday = rng.i64(3..15);
        }
        if holiday > 0 {
            holiday -= 1;
            continue;
        }
        let weekend = (d + 3).rem_euclid(7) >= 5; // 1970-01-01 was a Thursday
        if rng.f64() >= if weekend { 0.45 } else { 0.04 } {
            days.push(d);
        }
    }
    days
}

/// Session `i`: a start on an active day (sometimes late enough to run past midnight), then a
/// user/assistant exchange; assistant messages call tools.
fn write_session(out: &mut Vec<u8>, i: usize, seed: u64, calendar: &[i64]) -> io::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let day = calendar[rng.usize(..calendar.len())];
    let mut ts = day * DAY + rng.i64(7 * 3600..23 * 3600 + 45 * 60);
    let n = rng.usize(2..=16) + if rng.bool() { rng.usize(0..48) } else { 0 };
    for k in 0..n {
        let role = if k.is_multiple_of(2) {
            Role::User
        } else {
            Role::Assistant
        };
        let (len, tools) = match role {
            Role::User => (rng.u64(8..400), Vec::new()),
            _ => {
                let calls = [0, 0, 1, 1, 1, 2, 3][rng.usize(..7)];
                let tools = (0..calls)
                    .map(|_| pick_tool(&mut rng).to_string())
                    .collect();
                (rng.u64(40..3_000), tools)
            }
        };
        serde_json::to_writer(
            &mut *out,
            &Message {
                ts,
                role,
                len,
                tools,
            },
        )?;
        out.push(b'\n');
        ts += rng.i64(5..240);
    }
    Ok(())
}

/// A tool, by weight.
fn pick_tool(rng: &mut fastrand::Rng) -> &'static str {
    let mut r = rng.usize(..TOOLS.iter().map(|(_, w)| w).sum::<usize>());
    for &(tool, weight) in TOOLS {
        if r < weight {
            return tool;
        }
        r -= weight;
    }
    unreachable!("r is below the sum of the weights")
}

/// Session files with one message appended each; put back as they were on drop.
#[derive(Debug)]
pub struct Touched {
    /// Each file and its length before the append.
    files: Vec<(PathBuf, u64)>,
}

impl Touched {
    /// Appends one assistant message (a minute after the session's last one, calling `bash`)
    /// to each of `ids` under `root`.
    pub fn append(root: &Path, ids: &[String]) -> io::Result<Self> {
        let mut touched = Self { files: Vec::new() };
        for id in ids {
            let path = root.join(id);
            let text = std::fs::read_to_string(&path)?;
            let last_ts = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Message>(l).ok())
                .map(|m| m.ts)
                .max()
                .unwrap_or(FIRST_DAY * DAY);
            let line = Message {
                ts: last_ts + 60,
                role: Role::Assistant,
                len: 120,
                tools: vec!["bash".into()],
            };
            let mut f = OpenOptions::new().append(true).open(&path)?;
            touched.files.push((path, text.len() as u64));
            writeln!(f, "{}", serde_json::to_string(&line)?)?;
        }
        Ok(touched)
    }

    /// How many files were touched.
    pub fn len(&self) -> usize {
        self.files.len()
    }
}

impl Drop for Touched {
    fn drop(&mut self) {
        for (path, len) in &self.files {
            let restored = OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(*len));
            if let Err(e) = restored {
                eprintln!("could not restore {}: {e}", path.display());
            }
        }
    }
}

/// The totals computed from scratch: a plain loop over the files and their messages, without
/// the store, the checkpoint, or the scan's per-session contributions and `add`.
pub fn reference_totals(root: &Path) -> io::Result<Totals> {
    let mut t = Totals::default();
    for item in list_sessions(root)? {
        let text = std::fs::read_to_string(root.join(&item.id))?;
        t.sessions += 1;
        let mut days_seen = BTreeSet::new();
        let mut first_ts = None::<i64>;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(m) = serde_json::from_str::<Message>(line) else {
                t.malformed_lines += 1;
                continue;
            };
            let typed = if m.role == Role::User { m.len } else { 0 };
            let day = t.days.entry(m.ts.div_euclid(DAY)).or_default();
            day.counts.messages += 1;
            day.counts.tool_uses += m.tools.len() as u64;
            day.counts.chars_typed += typed;
            days_seen.insert(m.ts.div_euclid(DAY));
            first_ts = Some(first_ts.map_or(m.ts, |f| f.min(m.ts)));
            t.messages += 1;
            t.user_messages += u64::from(m.role == Role::User);
            t.chars_typed += typed;
            for tool in m.tools {
                *t.tool_uses.entry(tool).or_default() += 1;
            }
        }
        for d in days_seen {
            t.days.entry(d).or_default().sessions_active += 1;
        }
        if let Some(ts) = first_ts {
            t.days
                .entry(ts.div_euclid(DAY))
                .or_default()
                .sessions_started += 1;
        }
    }
    Ok(t)
}

/// What differs between two totals, in a line (for a failed check).
pub fn diff(a: &Totals, b: &Totals) -> String {
    let mut out = Vec::new();
    let scalars = [
        ("sessions", a.sessions, b.sessions),
        ("messages", a.messages, b.messages),
        ("user_messages", a.user_messages, b.user_messages),
        ("chars_typed", a.chars_typed, b.chars_typed),
        ("malformed_lines", a.malformed_lines, b.malformed_lines),
    ];
    for (name, x, y) in scalars {
        if x != y {
            out.push(format!("{name} {x} vs {y}"));
        }
    }
    if a.tool_uses != b.tool_uses {
        out.push(format!("tool_uses {:?} vs {:?}", a.tool_uses, b.tool_uses));
    }
    let days: BTreeMap<_, _> = a
        .days
        .iter()
        .filter(|(d, v)| b.days.get(d) != Some(v))
        .chain(b.days.iter().filter(|(d, _)| !a.days.contains_key(d)))
        .collect();
    if !days.is_empty() {
        out.push(format!(
            "{} days differ, first {:?}",
            days.len(),
            days.first_key_value()
        ));
    }
    out.join("; ")
}
