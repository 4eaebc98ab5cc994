//! The snapshot and checkpoint files: round trips, and every kind of bad file a store may find
//! on disk — truncated, bit-flipped, not JSON, another store's, another schema's, a newer
//! format's, a symlink, leftovers of a crash — through the public `persist` API.
//!
//! The process-kill test of the write protocol is in `tests/crash.rs`.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use job_runtime::snapshot::persist::{FileKind, FileStore, Loaded, PersistError, Stored};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Page {
    title: String,
    counts: Vec<u64>,
    ratio: f64,
}

fn page(n: u64) -> Page {
    Page {
        title: format!("page \"{n}\" ü"),
        counts: (0..n % 7).map(|i| i * n).collect(),
        ratio: n as f64 / 4.0,
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::new(1_700_000_000 + secs, 123_456_789)
}

fn open(root: &Path) -> FileStore {
    FileStore::open(root, "pages", 1).unwrap()
}

fn found<T: Debug>(loaded: Loaded<T>) -> Stored<T> {
    match loaded {
        Loaded::Found(s) => s,
        other => panic!("expected Found, got {other:?}"),
    }
}

/// Asserts `Quarantined`, that the file was moved aside next to it with `content`, and returns
/// the reason.
fn quarantined<T: Debug>(loaded: Loaded<T>, path: &Path, content: &[u8]) -> String {
    match loaded {
        Loaded::Quarantined { moved_to, reason } => {
            assert!(!path.exists(), "{} still there", path.display());
            assert_eq!(moved_to.parent(), path.parent());
            let name = moved_to.file_name().unwrap().to_str().unwrap();
            let prefix = format!("{}.corrupt-", path.file_name().unwrap().to_str().unwrap());
            assert!(name.starts_with(&prefix), "{name}");
            assert_eq!(fs::read(&moved_to).unwrap(), content, "moved file differs");
            assert!(!reason.is_empty());
            reason
        }
        other => panic!("expected Quarantined, got {other:?}"),
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn remove_corrupt(dir: &Path) {
    for name in names(dir) {
        if name.contains(".corrupt-") {
            fs::remove_file(dir.join(name)).unwrap();
        }
    }
}

#[test]
fn round_trip_of_both_kinds() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    assert_eq!(files.dir(), root.path().join("pages"));
    assert!(matches!(
        files.load::<Page>(FileKind::Snapshot),
        Loaded::Missing
    ));
    assert!(matches!(
        files.load::<Vec<String>>(FileKind::Checkpoint),
        Loaded::Missing
    ));

    files.save(FileKind::Snapshot, 1, at(1), &page(5)).unwrap();
    let checkpoint = vec!["a".to_owned(), "b\n".to_owned()];
    files
        .save(FileKind::Checkpoint, 1, at(2), &checkpoint)
        .unwrap();
    let s = found(files.load::<Page>(FileKind::Snapshot));
    assert_eq!((s.scan_id, s.generated_at, s.value), (1, at(1), page(5)));
    let c = found(files.load::<Vec<String>>(FileKind::Checkpoint));
    assert_eq!((c.scan_id, c.generated_at, c.value), (1, at(2), checkpoint));

    // Overwrite, and read back from a fresh store (a restart).
    files.save(FileKind::Snapshot, 2, at(3), &page(6)).unwrap();
    let s = found(open(root.path()).load::<Page>(FileKind::Snapshot));
    assert_eq!((s.scan_id, s.generated_at, s.value), (2, at(3), page(6)));
    assert_eq!(
        names(files.dir()),
        BTreeSet::from(["checkpoint.json".to_owned(), "snapshot.json".to_owned()])
    );
    // Compact JSON with the envelope first and the payload last.
    let text = fs::read_to_string(files.path(FileKind::Snapshot)).unwrap();
    assert!(
        text.starts_with(r#"{"format":1,"schema":1,"store":"pages","kind":"snapshot","scan_id":2,"generated_at":"2023-11-14T22:13:23.123456789Z","checksum":"crc32:"#),
        "{text}"
    );
    assert!(text.ends_with(
        r#","payload":{"title":"page \"6\" ü","counts":[0,6,12,18,24,30],"ratio":1.5}}"#
    ));
}

#[test]
fn truncated_at_every_byte_is_quarantined_and_rebuilt() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    let path = files.path(FileKind::Snapshot);
    files.save(FileKind::Snapshot, 1, at(0), &page(10)).unwrap();
    let good = fs::read(&path).unwrap();
    assert!(good.len() > 150, "{}", good.len());
    for cut in 0..good.len() {
        fs::write(&path, &good[..cut]).unwrap();
        let reason = quarantined(files.load::<Page>(FileKind::Snapshot), &path, &good[..cut]);
        assert!(
            ["truncated", "checksum", "not valid JSON", "no `"]
                .iter()
                .any(|r| reason.contains(r)),
            "cut at {cut}: {reason}"
        );
        // The store goes on: the next save and load work.
        files
            .save(FileKind::Snapshot, cut as u64, at(1), &page(3))
            .unwrap();
        let s = found(files.load::<Page>(FileKind::Snapshot));
        assert_eq!((s.scan_id, s.value), (cut as u64, page(3)));
        remove_corrupt(files.dir());
    }
    assert_eq!(
        names(files.dir()),
        BTreeSet::from(["snapshot.json".to_owned()])
    );
}

#[test]
fn flipped_bits_are_quarantined() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    let path = files.path(FileKind::Snapshot);
    files.save(FileKind::Snapshot, 7, at(0), &page(20)).unwrap();
    let good = fs::read(&path).unwrap();
    // Every byte of the file, header included (the checksum covers the header fields too), with
    // its low bit flipped; and every 5th byte with its high bit set (not UTF-8 any more).
    let flips = (0..good.len())
        .map(|i| (i, 0x01))
        .chain((0..good.len()).step_by(5).map(|i| (i, 0x80)));
    for (i, mask) in flips {
        let mut bad = good.clone();
        bad[i] ^= mask;
        fs::write(&path, &bad).unwrap();
        quarantined(files.load::<Page>(FileKind::Snapshot), &path, &bad);
        remove_corrupt(files.dir());
    }
    fs::write(&path, &good).unwrap();
    assert_eq!(
        found(files.load::<Page>(FileKind::Snapshot)).value,
        page(20)
    );
}

#[test]
fn a_file_that_is_not_an_envelope_is_quarantined() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    let path = files.path(FileKind::Snapshot);
    let cases: [(&[u8], &str); 8] = [
        (b"", "truncated"),
        (b"hello", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"null", "not a snapshot envelope"),
        (b"[1, 2]", "not a snapshot envelope"),
        (b"{}", "no `format` field"),
        (br#"{"format":1,"payload":{}}"#, "no `schema` field"),
        (
            br#"{"title":"page","counts":[],"ratio":1.0}"#,
            "no `format` field",
        ),
    ];
    for (content, expected) in cases {
        fs::write(&path, content).unwrap();
        let reason = quarantined(files.load::<Page>(FileKind::Snapshot), &path, content);
        assert!(reason.contains(expected), "{content:?}: {reason}");
    }
}

#[test]
fn another_stores_file_is_quarantined() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    let other = FileStore::open(root.path(), "other", 1).unwrap();
    other.save(FileKind::Snapshot, 1, at(0), &page(1)).unwrap();
    let theirs = fs::read(other.path(FileKind::Snapshot)).unwrap();
    let path = files.path(FileKind::Snapshot);
    fs::write(&path, &theirs).unwrap();
    let reason = quarantined(files.load::<Page>(FileKind::Snapshot), &path, &theirs);
    assert_eq!(reason, "written by store `other`, not `pages`");
    // The other store's own file is untouched.
    assert_eq!(found(other.load::<Page>(FileKind::Snapshot)).value, page(1));
}

#[test]
fn a_checkpoint_in_the_snapshots_place_is_quarantined() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    files
        .save(FileKind::Checkpoint, 1, at(0), &page(1))
        .unwrap();
    let bytes = fs::read(files.path(FileKind::Checkpoint)).unwrap();
    let path = files.path(FileKind::Snapshot);
    fs::write(&path, &bytes).unwrap();
    let reason = quarantined(files.load::<Page>(FileKind::Snapshot), &path, &bytes);
    assert_eq!(reason, "a `checkpoint` file, not a snapshot");
}

#[test]
fn another_schema_version_is_quarantined() {
    let root = tempfile::tempdir().unwrap();
    let v2 = FileStore::open(root.path(), "pages", 2).unwrap();
    v2.save(FileKind::Snapshot, 1, at(0), &page(1)).unwrap();
    let path = v2.path(FileKind::Snapshot);
    let bytes = fs::read(&path).unwrap();
    let v1 = open(root.path());
    let reason = quarantined(v1.load::<Page>(FileKind::Snapshot), &path, &bytes);
    assert_eq!(reason, "schema version 2, but this store reads schema 1");
    // Rebuilt by the next save.
    v1.save(FileKind::Snapshot, 2, at(1), &page(2)).unwrap();
    assert_eq!(found(v1.load::<Page>(FileKind::Snapshot)).value, page(2));
}

#[test]
fn a_payload_of_another_type_is_quarantined() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    files
        .save(FileKind::Snapshot, 1, at(0), &"just a string")
        .unwrap();
    let path = files.path(FileKind::Snapshot);
    let bytes = fs::read(&path).unwrap();
    let reason = quarantined(files.load::<Page>(FileKind::Snapshot), &path, &bytes);
    assert!(
        reason.starts_with("the payload does not deserialize into the expected type"),
        "{reason}"
    );
}

#[test]
fn a_newer_format_is_left_alone_and_never_overwritten() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    let path = files.path(FileKind::Snapshot);
    // A newer envelope may change every field but `format`.
    let newer = br#"{"format":2,"scan_id":"0x2a","hash":{"blake3":"00"},"payload":"zstd:AAAA"}"#;
    fs::write(&path, newer).unwrap();
    match files.load::<Page>(FileKind::Snapshot) {
        Loaded::Newer { version } => assert_eq!(version, 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::read(&path).unwrap(), newer);
    assert_eq!(files.read_only(FileKind::Snapshot), Some(2));
    match files.save(FileKind::Snapshot, 9, at(0), &page(1)) {
        Err(PersistError::ReadOnly { path: p, version }) => {
            assert_eq!((p, version), (path.clone(), 2));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::read(&path).unwrap(), newer);
    assert!(matches!(
        files.load::<Page>(FileKind::Snapshot),
        Loaded::Newer { version: 2 }
    ));
    // The other kind is unaffected; nothing was set aside; no temp file.
    assert_eq!(files.read_only(FileKind::Checkpoint), None);
    files
        .save(FileKind::Checkpoint, 9, at(0), &page(1))
        .unwrap();
    assert_eq!(
        names(files.dir()),
        BTreeSet::from(["checkpoint.json".to_owned(), "snapshot.json".to_owned()])
    );
    // A restart that only saves (never loads) would overwrite: the state is per FileStore, and
    // set by `load`, which the snapshot store always calls first.
    let again = open(root.path());
    assert!(matches!(
        again.load::<Page>(FileKind::Snapshot),
        Loaded::Newer { version: 2 }
    ));
    assert!(again.save(FileKind::Snapshot, 10, at(0), &page(1)).is_err());
    assert_eq!(fs::read(&path).unwrap(), newer);
}

#[cfg(unix)]
#[test]
fn a_symlink_is_never_followed() {
    use std::os::unix::fs::symlink;

    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    let outside = root.path().join("precious.json");
    fs::write(&outside, b"precious").unwrap();
    let path = files.path(FileKind::Snapshot);
    symlink(&outside, &path).unwrap();

    match files.load::<Page>(FileKind::Snapshot) {
        Loaded::Refused { reason } => assert!(reason.contains("symlink"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match files.save(FileKind::Snapshot, 1, at(0), &page(1)) {
        Err(PersistError::Symlink(p)) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::read(&outside).unwrap(), b"precious");
    assert!(
        fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        names(files.dir()),
        BTreeSet::from(["snapshot.json".to_owned()])
    );

    // A store directory that is a symlink is refused too.
    let elsewhere = tempfile::tempdir().unwrap();
    symlink(elsewhere.path(), root.path().join("linked")).unwrap();
    match FileStore::open(root.path(), "linked", 1) {
        Err(PersistError::Symlink(p)) => assert_eq!(p, root.path().join("linked")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_path_that_is_not_a_file_is_refused_and_a_failed_write_leaves_no_temp_file() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    let path = files.path(FileKind::Snapshot);
    fs::create_dir(&path).unwrap();
    fs::write(path.join("inside"), b"x").unwrap();
    match files.load::<Page>(FileKind::Snapshot) {
        Loaded::Refused { reason } => assert!(reason.contains("not a regular file"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The rename over a non-empty directory fails: the temp file must not stay behind.
    match files.save(FileKind::Snapshot, 1, at(0), &page(1)) {
        Err(PersistError::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        names(files.dir()),
        BTreeSet::from(["snapshot.json".to_owned()])
    );
    assert_eq!(fs::read(path.join("inside")).unwrap(), b"x");
}

#[test]
fn open_removes_leftover_temp_files_and_nothing_else() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("pages");
    fs::create_dir(&dir).unwrap();
    let leftovers = [".snapshot.json.a1B2c3.tmp", ".checkpoint.json.XyZ789.tmp"];
    let kept = [
        "snapshot.json",
        "notes.txt",
        "snapshot.json.corrupt-20250101T000000.000Z",
        ".snapshot.json.tmp",
        "snapshot.json.a1B2c3.tmp",
        ".snapshot.json.a1B2c3.tmp.bak",
        ".other.json.a1B2c3.tmp",
    ];
    for name in leftovers.iter().chain(&kept) {
        fs::write(dir.join(name), name.as_bytes()).unwrap();
    }
    // A directory with a temp file's name is not ours to remove.
    fs::create_dir(dir.join(".checkpoint.json.D1r000.tmp")).unwrap();

    let files = open(root.path());
    let mut expected: BTreeSet<String> = kept.iter().map(|s| s.to_string()).collect();
    expected.insert(".checkpoint.json.D1r000.tmp".into());
    assert_eq!(names(files.dir()), expected);
    for name in kept {
        assert_eq!(fs::read(dir.join(name)).unwrap(), name.as_bytes());
    }
}

/// A value whose serialization fails partway.
#[derive(Debug)]
struct Unserializable;

impl Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = s.serialize_seq(None)?;
        seq.serialize_element(&1)?;
        Err(S::Error::custom("this value cannot be written"))
    }
}

#[test]
fn a_failed_serialization_leaves_the_old_file_whole() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    files.save(FileKind::Snapshot, 1, at(0), &page(4)).unwrap();
    let path = files.path(FileKind::Snapshot);
    let before = fs::read(&path).unwrap();
    match files.save(FileKind::Snapshot, 2, at(1), &Unserializable) {
        Err(e @ PersistError::Serialize(_)) => {
            assert!(
                e.to_string().contains("this value cannot be written"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A generated_at RFC 3339 cannot express fails the same way.
    assert!(matches!(
        files.save(
            FileKind::Snapshot,
            2,
            UNIX_EPOCH - Duration::from_secs(1),
            &page(1)
        ),
        Err(PersistError::Serialize(_))
    ));
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(
        names(files.dir()),
        BTreeSet::from(["snapshot.json".to_owned()])
    );
    assert_eq!(found(files.load::<Page>(FileKind::Snapshot)).value, page(4));
}

#[test]
fn bad_names_are_refused_before_anything_is_created() {
    let root = tempfile::tempdir().unwrap();
    let inner = root.path().join("inner");
    fs::create_dir(&inner).unwrap();
    for name in [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "a\\b",
        "a\0b",
        &"n".repeat(129),
    ] {
        match FileStore::open(&inner, name, 1) {
            Err(e @ PersistError::Name(_)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("a store name must be one path component"),
                    "{msg}"
                );
            }
            other => panic!("{name:?}: {other:?}"),
        }
    }
    assert!(names(&inner).is_empty());
    assert_eq!(names(root.path()), BTreeSet::from(["inner".to_owned()]));
    let e = FileStore::open(&inner, "../x", 1).unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid store name: `../x` contains `/`; a store name must be one path component: 1 to 128 bytes, no `/`, `\\`, NUL or control characters, not `.` or `..`"
    );
}

#[test]
fn quarantined_files_pile_up_without_clobbering_each_other() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    let path = files.path(FileKind::Snapshot);
    let mut moved: Vec<PathBuf> = Vec::new();
    for i in 0..5 {
        let content = format!("bad {i}");
        fs::write(&path, &content).unwrap();
        match files.load::<Page>(FileKind::Snapshot) {
            Loaded::Quarantined { moved_to, .. } => moved.push(moved_to),
            other => panic!("{other:?}"),
        }
    }
    for (i, p) in moved.iter().enumerate() {
        assert_eq!(fs::read_to_string(p).unwrap(), format!("bad {i}"));
    }
    assert_eq!(names(files.dir()).len(), 5);
}

/// A file larger than the store may read is not read: it is moved aside whole as
/// `<file>.too-large-<timestamp>` (nothing lost), for either kind; at the limit it loads.
#[test]
fn a_file_over_the_size_limit_is_moved_aside_unread() {
    let root = tempfile::tempdir().unwrap();
    let files = open(root.path());
    files.save(FileKind::Snapshot, 3, at(3), &page(40)).unwrap();
    files
        .save(FileKind::Checkpoint, 3, at(3), &vec![7u64; 100])
        .unwrap();
    for kind in [FileKind::Snapshot, FileKind::Checkpoint] {
        let path = files.path(kind);
        let content = fs::read(&path).unwrap();
        let len = content.len() as u64;

        // Exactly at the limit: read as usual.
        let at_limit = open(root.path()).with_max_load_bytes(len);
        match kind {
            FileKind::Snapshot => assert_eq!(found(at_limit.load::<Page>(kind)).scan_id, 3),
            FileKind::Checkpoint => assert_eq!(found(at_limit.load::<Vec<u64>>(kind)).scan_id, 3),
        }

        // One byte over: moved aside unread, the reason naming the limit and how to raise it.
        let small = open(root.path()).with_max_load_bytes(len - 1);
        match small.load::<serde::de::IgnoredAny>(kind) {
            Loaded::Quarantined { moved_to, reason } => {
                assert!(!path.exists(), "{} still there", path.display());
                let name = moved_to.file_name().unwrap().to_str().unwrap();
                let prefix = format!("{}.too-large-", kind.file_name());
                assert!(name.starts_with(&prefix), "{name}");
                assert_eq!(fs::read(&moved_to).unwrap(), content, "moved file differs");
                assert!(
                    reason.contains(&format!("{} bytes", len - 1))
                        && reason.contains("JOBRT_SNAPSHOT_MAX_BYTES"),
                    "{reason}"
                );
            }
            other => panic!("expected Quarantined, got {other:?}"),
        }
        assert!(matches!(
            small.load::<serde::de::IgnoredAny>(kind),
            Loaded::Missing
        ));
    }
}
