//! The fault test of the write protocol: a writer killed at any moment leaves every file either
//! the old one or the new one, whole.
//!
//! `killed_writers_leave_old_or_new_files` runs this very test binary again as a child process
//! (filtered down to `crash_child_writer`), which writes snapshots and checkpoints in a loop and
//! says on stdout which scan it starts and finishes writing. The parent kills it with SIGKILL
//! (what `Child::kill` sends on unix) after a random 1–30 ms, then opens the directory as a
//! restarted service would and loads both files. Each must be `Found`, checksum-verified, and
//! hold the scan the child last finished writing or the one it was writing when it died —
//! `Missing` only while no write of that kind has ever finished — and `open` must leave no temp
//! file behind. Never `Quarantined`: a kill must never produce a damaged file.
//!
//! A kill ends the process, not the machine: this checks that no partial file is ever visible
//! under the real name and that leftovers are cleaned up, not that the fsyncs make the data
//! durable across a power cut (which needs a VM or a fault-injecting file system).
//!
//! `JOBRT_CRASH_SEED` (a number) replays another sequence of delays, `JOBRT_CRASH_ROUNDS` runs
//! more (or fewer) kills than the default 200.

use std::collections::BTreeSet;
use std::env;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use job_runtime::snapshot::persist::{FileKind, FileStore, Loaded};
use serde::{Deserialize, Serialize};

/// Set (to the root directory) only in the child process.
const CHILD_DIR: &str = "JOBRT_CRASH_CHILD";
/// The round number, which makes the child's scan ids unique across rounds.
const CHILD_ROUND: &str = "JOBRT_CRASH_ROUND";
const STORE: &str = "crash";
const SCHEMA: u32 = 1;
const IDS_PER_ROUND: u64 = 1_000_000;
/// Items per payload, alternating: about 50 KB and 500 KB of JSON.
const SIZES: [u64; 2] = [3_200, 32_000];
/// The child's own limit, should the parent die without killing it.
const CHILD_MAX_RUN: Duration = Duration::from_secs(30);
const LINE_PREFIX: &str = "crash-child:";

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Payload {
    scan_id: u64,
    kind: String,
    items: Vec<u64>,
}

fn label(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Snapshot => "snapshot",
        FileKind::Checkpoint => "checkpoint",
    }
}

fn kind_of(label: &str) -> FileKind {
    match label {
        "snapshot" => FileKind::Snapshot,
        "checkpoint" => FileKind::Checkpoint,
        other => panic!("unknown kind {other}"),
    }
}

/// The payload the child writes for `scan_id`: its size alternates with the scan, and its
/// content is a function of the scan, so the parent can tell a mix of two writes apart.
fn payload(scan_id: u64, kind: FileKind) -> Payload {
    let n = SIZES[(scan_id % 2) as usize];
    Payload {
        scan_id,
        kind: label(kind).to_owned(),
        items: (0..n)
            .map(|i| scan_id.wrapping_mul(1_000_003).wrapping_add(i))
            .collect(),
    }
}

/// The child half of `killed_writers_leave_old_or_new_files`: writes until it is killed.
///
/// It does something only when the parent starts this binary with `JOBRT_CRASH_CHILD` set; in
/// a normal `cargo test` run it returns at once, so it passes trivially. It is a test only
/// because that is what the test binary can run on its own.
#[test]
fn crash_child_writer() {
    let Some(root) = env::var_os(CHILD_DIR) else {
        return;
    };
    let round: u64 = env::var(CHILD_ROUND)
        .expect("JOBRT_CRASH_ROUND")
        .parse()
        .expect("JOBRT_CRASH_ROUND is a number");
    let files = FileStore::open(Path::new(&root), STORE, SCHEMA).unwrap();
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| {
        writeln!(out, "{LINE_PREFIX} {line}").unwrap();
        out.flush().unwrap();
    };
    say("started".into());
    let started = Instant::now();
    for i in 1..IDS_PER_ROUND {
        let scan_id = round * IDS_PER_ROUND + i;
        for kind in [FileKind::Snapshot, FileKind::Checkpoint] {
            let value = payload(scan_id, kind);
            say(format!("writing {} {scan_id}", label(kind)));
            files
                .save(kind, scan_id, SystemTime::now(), &value)
                .unwrap();
            say(format!("wrote {} {scan_id}", label(kind)));
        }
        if started.elapsed() > CHILD_MAX_RUN {
            break;
        }
    }
}

/// Kills the child if the parent panics before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the file of one kind may hold after a kill.
#[derive(Debug, Default, Clone, Copy)]
struct Expect {
    /// The last scan whose write finished (in this round or before).
    done: Option<u64>,
    /// The scan being written when the child died.
    writing: Option<u64>,
}

fn temp_files(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

#[test]
fn killed_writers_leave_old_or_new_files() {
    if env::var_os(CHILD_DIR).is_some() {
        return; // In the child; the filter already excludes this test, but be sure.
    }
    let seed: u64 = env::var("JOBRT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    let rounds: u64 = env::var("JOBRT_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut rng = fastrand::Rng::with_seed(seed);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(STORE);
    let exe = env::current_exe().unwrap();
    let kinds = [FileKind::Snapshot, FileKind::Checkpoint];
    let mut on_disk: [Option<u64>; 2] = [None, None];
    let (mut mid_write, mut temps_seen, mut new_found, mut writes_done) = (0, 0, 0, 0);
    let started = Instant::now();

    for round in 0..rounds {
        let mut child = KillOnDrop(
            Command::new(&exe)
                .args([
                    "crash_child_writer",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                    "-q",
                ])
                .env(CHILD_DIR, root.path())
                .env(CHILD_ROUND, round.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let is_start = line == format!("{LINE_PREFIX} started");
                    lines.push(line);
                    if is_start {
                        break;
                    }
                }
                Err(e) => panic!("round {round}: the child did not start ({e}); said {lines:?}"),
            }
        }
        let delay = Duration::from_micros(rng.u64(1_000..=30_000));
        thread::sleep(delay);
        child.0.kill().unwrap();
        let status = child.0.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        let mut stderr = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(9),
                "round {round}: the child ended on its own ({status}): {stderr}"
            );
        }
        #[cfg(not(unix))]
        assert!(!status.success(), "round {round}: {status}: {stderr}");

        // What each file may hold: the last finished write, or the one under way.
        let mut expect = on_disk.map(|done| Expect {
            done,
            writing: None,
        });
        for line in &lines {
            let Some(rest) = line.strip_prefix(LINE_PREFIX) else {
                continue;
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [verb @ ("writing" | "wrote"), kind, id] = words[..] {
                let e = &mut expect[if kind_of(kind) == FileKind::Snapshot {
                    0
                } else {
                    1
                }];
                let id: u64 = id.parse().unwrap();
                if verb == "writing" {
                    e.writing = Some(id);
                } else {
                    assert_eq!(e.writing, Some(id), "round {round}: {lines:?}");
                    e.done = Some(id);
                    e.writing = None;
                    writes_done += 1;
                }
            }
        }
        if expect.iter().any(|e| e.writing.is_some()) {
            mid_write += 1;
        }
        if !temp_files(&dir).is_empty() {
            temps_seen += 1;
        }

        // Restart: open (which clears leftovers) and load.
        let files = FileStore::open(root.path(), STORE, SCHEMA).unwrap();
        assert_eq!(temp_files(&dir), BTreeSet::new(), "round {round}");
        for (k, kind) in kinds.into_iter().enumerate() {
            let e = expect[k];
            match files.load::<Payload>(kind) {
                Loaded::Found(s) => {
                    assert!(
                        Some(s.scan_id) == e.done || Some(s.scan_id) == e.writing,
                        "round {round}, {}: scan {} on disk, expected {e:?}",
                        label(kind),
                        s.scan_id
                    );
                    assert!(
                        s.value == payload(s.scan_id, kind),
                        "round {round}, {}: the payload of scan {} is not the one written",
                        label(kind),
                        s.scan_id
                    );
                    if Some(s.scan_id) != e.done {
                        new_found += 1;
                    }
                    on_disk[k] = Some(s.scan_id);
                }
                Loaded::Missing => assert_eq!(
                    e.done,
                    None,
                    "round {round}, {}: missing after a finished write",
                    label(kind)
                ),
                other => panic!(
                    "round {round} (delay {delay:?}), {}: {other:?}; expected {e:?}",
                    label(kind)
                ),
            }
        }
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".corrupt-"))
            .collect();
        assert!(names.is_empty(), "round {round}: {names:?}");
    }

    eprintln!(
        "crash test: {rounds} kills (seed {seed:#x}) in {:.1?}: {writes_done} writes finished, \
         {mid_write} kills during a write, {temps_seen} left a temp file, \
         {new_found} loads found the write that was under way",
        started.elapsed()
    );
    assert!(
        on_disk.iter().all(Option::is_some),
        "no write ever finished"
    );
    assert!(
        rounds < 20 || mid_write > 0,
        "no kill landed during a write: the test tests nothing"
    );
}
