//! Crash-safe files for snapshots and checkpoints.
//!
//! Why: a snapshot on disk is what lets a restarted service answer at once instead of waiting
//! for a full scan, and a checkpoint is what lets the next scan be incremental. Both are only
//! worth having if they can be trusted: a process killed mid-write, a full disk, a bit flipped
//! on the way, a file copied from another store or written by another version of the program
//! must never be read back as a good value, and must never cost the good file already there.
//! So a file on disk is always either the old one or the new one, whole; anything else is
//! recognised, set aside (never deleted: it may help a post-mortem) and rebuilt by the next scan.
//!
//! # Files
//!
//! A [`FileStore`] owns `<root>/<name>/`, where `name` is one safe path component
//! ([`validate_name`]). It holds `snapshot.json` ([`FileKind::Snapshot`]) and
//! `checkpoint.json` ([`FileKind::Checkpoint`]). Each is one compact JSON object, the
//! *envelope*:
//!
//! ```json
//! {"format":1,"schema":3,"store":"sessions","kind":"snapshot","scan_id":42,
//!  "generated_at":"2025-01-02T03:04:05.123456789Z","checksum":"crc32:1c291ca3","payload":{…}}
//! ```
//!
//! - `format`: the envelope's own version, [`FORMAT_VERSION`]. A file of a newer format is
//!   reported as [`Loaded::Newer`] and left alone, and the store then refuses to write that kind
//!   ([`PersistError::ReadOnly`]): an older build running beside (or after a rollback from) a
//!   newer one must not destroy the newer one's data. The format is read through a view that
//!   needs nothing but a top-level `format` number, so a newer envelope may change every other
//!   field.
//! - `schema`: the caller's version of the payload type ([`FileStore::open`]); a file of another
//!   schema is set aside and rebuilt.
//! - `store`, `kind`: whose file this is, so a file copied from another store or renamed from
//!   the other kind is not taken for ours.
//! - `scan_id`, `generated_at` (RFC 3339, UTC, nanoseconds): the metadata of [`Stored`].
//! - `checksum`: `crc32:` and 8 lowercase hex digits, the CRC-32 of the header fields above (one
//!   per line, `format` to `generated_at`) followed by the exact bytes of the payload. Covering
//!   the header too means a flipped digit in `scan_id` or `generated_at` is caught like one in
//!   the payload.
//! - `payload`: the caller's value. It comes last, and is parsed only after the checksum matched.
//!
//! # Writing ([`FileStore::save`])
//!
//! 1. Refuse if this kind is read-only (a newer file was found) or the target is a symlink.
//! 2. Serialize the whole envelope into memory. A value that fails to serialize never touches
//!    the directory.
//! 3. Create a temp file with a unique name in the same directory
//!    (`.snapshot.json.XXXXXX.tmp`, `.checkpoint.json.XXXXXX.tmp`), write, fsync it.
//! 4. Rename it over the target (atomic on POSIX file systems), then fsync the directory so the
//!    rename itself survives a power cut.
//!
//! The target is never written in place: until the rename it is the old file, after it the new
//! one. Any error, the rename's included, removes the temp file; a crash leaves one behind, and
//! [`FileStore::open`] removes such leftovers (only names of exactly that shape).
//!
//! # Reading ([`FileStore::load`])
//!
//! The file is read into one buffer. In a file this format wrote, the header is everything
//! before the first `,"payload":` (a sequence no JSON string can hold) and the payload is the
//! rest up to the closing brace, so the small header is parsed on its own, the checksum is
//! computed over the payload bytes where they lie, and only then is the payload parsed, once,
//! into `T`. Loading costs one `serde_json::from_slice::<T>` of the payload plus reading the
//! file and a CRC (about 1.15× for 10 MB). Whatever that fast path does not accept gets the
//! full parse (the payload borrowed as a [`RawValue`], not copied), which reads the format
//! version of a newer envelope and says what is wrong with a damaged one: the outcome is the
//! same as if there were no fast path.
//!
//! - no file: [`Loaded::Missing`];
//! - a symlink, not a regular file, or an I/O error other than "not found":
//!   [`Loaded::Refused`], the file left where it is;
//! - a newer format: [`Loaded::Newer`], the file left untouched, the kind read-only;
//! - a file larger than the store may read ([`FileStore::with_max_load_bytes`], default
//!   [`DEFAULT_SNAPSHOT_MAX_BYTES`](crate::config::DEFAULT_SNAPSHOT_MAX_BYTES)) is not read: it
//!   is renamed to `<file>.too-large-<UTC timestamp>` and reported as [`Loaded::Quarantined`],
//!   so that no file can make start-up read gigabytes into memory, and nothing is lost;
//! - anything else that is not a good file of this store, kind and schema — truncated, bits
//!   flipped, not JSON, fields missing, another store, another schema, a payload that does not
//!   deserialize into `T` — is renamed to `<file>.corrupt-<UTC timestamp>` (with `-1`, `-2`, …
//!   if that name exists) and reported as [`Loaded::Quarantined`] with the reason.
//!
//! No input makes `load` panic. Everything here is synchronous `std::fs`: async callers run it
//! in `spawn_blocking`.

use std::borrow::Cow;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The envelope format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The longest store name, in bytes.
const MAX_NAME_BYTES: usize = 128;

/// What every name error ends with: what is accepted.
const NAME_RULE: &str = "a store name must be one path component: 1 to 128 bytes, no `/`, `\\`, NUL or control characters, not `.` or `..`";

/// The suffix of temp files (after the kind's prefix and the random part).
const TEMP_SUFFIX: &str = ".tmp";

/// The checksum field's prefix.
const CHECKSUM_PREFIX: &str = "crc32:";

/// Which file of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `snapshot.json`: the last good value.
    Snapshot,
    /// `checkpoint.json`: per-item state of an incremental scan.
    Checkpoint,
}

impl FileKind {
    /// Both kinds.
    const ALL: [FileKind; 2] = [FileKind::Snapshot, FileKind::Checkpoint];

    /// The file's name in the store's directory: `snapshot.json` or `checkpoint.json`.
    pub fn file_name(self) -> &'static str {
        match self {
            FileKind::Snapshot => "snapshot.json",
            FileKind::Checkpoint => "checkpoint.json",
        }
    }

    /// The `kind` field of the envelope.
    fn label(self) -> &'static str {
        match self {
            FileKind::Snapshot => "snapshot",
            FileKind::Checkpoint => "checkpoint",
        }
    }

    /// The prefix of this kind's temp files: a dot (hidden), the file name, a dot.
    fn temp_prefix(self) -> &'static str {
        match self {
            FileKind::Snapshot => ".snapshot.json.",
            FileKind::Checkpoint => ".checkpoint.json.",
        }
    }

    fn index(self) -> usize {
        match self {
            FileKind::Snapshot => 0,
            FileKind::Checkpoint => 1,
        }
    }
}

/// A value read back from disk, with the envelope's metadata.
#[derive(Debug)]
pub struct Stored<T> {
    /// The scan that produced it.
    pub scan_id: u64,
    /// When it was produced (wall time).
    pub generated_at: SystemTime,
    /// The value.
    pub value: T,
}

/// What [`FileStore::load`] found.
#[derive(Debug)]
pub enum Loaded<T> {
    /// No file.
    Missing,
    /// A good file.
    Found(Stored<T>),
    /// A damaged or foreign file, or one larger than the store may read, moved aside.
    Quarantined {
        /// Where it went.
        moved_to: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A file written by a newer format version: left untouched; the store is read-only.
    Newer {
        /// The file's format version.
        version: u32,
    },
    /// The file could not be used and was not moved (a symlink, or an I/O error).
    Refused {
        /// Why.
        reason: String,
    },
}

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// An I/O error, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The value could not be serialized.
    #[error("could not serialize: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The directory holds a file of a newer format version; this store never overwrites it.
    #[error("{path} was written by a newer version (format {version}); not overwriting it")]
    ReadOnly {
        /// The file.
        path: PathBuf,
        /// Its format version.
        version: u32,
    },
    /// The path is a symlink.
    #[error("{0} is a symlink; refusing to follow it")]
    Symlink(PathBuf),
    /// The store name is not one safe path component (the message says why and what is
    /// accepted).
    #[error("invalid store name: {0}")]
    Name(String),
}

/// Checks that `name` is one safe path component.
///
/// Accepted: 1 to 128 bytes, no `/`, `\`, NUL or other control characters, not `.` or `..`.
/// The error says what is wrong and what is accepted.
///
/// ```
/// use job_runtime::snapshot::persist::validate_name;
///
/// assert!(validate_name("sessions").is_ok());
/// let err = validate_name("../x").unwrap_err();
/// assert!(err.starts_with("`../x` contains `/`"));
/// ```
pub fn validate_name(name: &str) -> Result<(), String> {
    let shown = || name.escape_debug().to_string();
    let problem = if name.is_empty() {
        "the name is empty".to_owned()
    } else if name.len() > MAX_NAME_BYTES {
        let head: String = name.chars().take(32).collect();
        format!(
            "`{}…` is {} bytes long, more than {MAX_NAME_BYTES}",
            head.escape_debug(),
            name.len()
        )
    } else if name == "." || name == ".." {
        format!("`{name}` is not a name but a reference to a directory")
    } else if name.contains('/') {
        format!("`{}` contains `/`", shown())
    } else if name.contains('\\') {
        format!("`{}` contains `\\`", shown())
    } else if name.contains('\0') {
        format!("`{}` contains NUL", shown())
    } else if let Some(c) = name.chars().find(|c| c.is_control()) {
        format!(
            "`{}` contains a control character (U+{:04X})",
            shown(),
            u32::from(c)
        )
    } else {
        return Ok(());
    };
    Err(format!("{problem}; {NAME_RULE}"))
}

/// The files of one store, in `<root>/<name>/`.
///
/// ```
/// use job_runtime::snapshot::persist::{FileKind, FileStore, Loaded};
/// use std::time::SystemTime;
///
/// let root = tempfile::tempdir().unwrap();
/// let files = FileStore::open(root.path(), "sessions", 1).unwrap();
/// files.save(FileKind::Snapshot, 7, SystemTime::now(), &vec![1, 2, 3]).unwrap();
/// match files.load::<Vec<u32>>(FileKind::Snapshot) {
///     Loaded::Found(s) => assert_eq!((s.scan_id, s.value), (7, vec![1, 2, 3])),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    name: String,
    schema: u32,
    /// Per kind: 0 while writable, else the newer format version `load` found (never cleared,
    /// so that file is never overwritten by this store).
    newer: [AtomicU32; 2],
    /// The largest file `load` reads.
    max_load_bytes: u64,
}

impl FileStore {
    /// Opens (creating) `<root>/<name>/`, removing temp files left by a crash.
    ///
    /// `schema` is the caller's version of its payload type: files of another schema are set
    /// aside by [`load`](Self::load). Refuses an invalid name ([`validate_name`]) and a
    /// `<root>/<name>` that is a symlink. Only names of the exact shape of this module's temp
    /// files are removed; everything else in the directory is left alone.
    pub fn open(root: &Path, name: &str, schema: u32) -> Result<Self, PersistError> {
        validate_name(name).map_err(PersistError::Name)?;
        let dir = root.join(name);
        if is_symlink(&dir).map_err(|e| io_err(&dir, e))? {
            return Err(PersistError::Symlink(dir));
        }
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        // Between the check and the creation a symlink could have appeared; look again.
        if is_symlink(&dir).map_err(|e| io_err(&dir, e))? {
            return Err(PersistError::Symlink(dir));
        }
        remove_leftover_temps(&dir)?;
        Ok(Self {
            dir,
            name: name.to_owned(),
            schema,
            newer: [AtomicU32::new(0), AtomicU32::new(0)],
            max_load_bytes: crate::config::DEFAULT_SNAPSHOT_MAX_BYTES,
        })
    }

    /// Sets the largest file [`load`](Self::load) reads (at least 1 byte); a larger one is moved
    /// aside unread. Default: [`DEFAULT_SNAPSHOT_MAX_BYTES`](crate::config::DEFAULT_SNAPSHOT_MAX_BYTES).
    #[must_use]
    pub fn with_max_load_bytes(mut self, bytes: u64) -> Self {
        self.max_load_bytes = bytes.max(1);
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `kind`'s file.
    pub fn path(&self, kind: FileKind) -> PathBuf {
        self.dir.join(kind.file_name())
    }

    /// `Some(version)` once [`load`](Self::load) has found a file of a newer format for `kind`:
    /// [`save`](Self::save) then refuses to overwrite it, for the life of this `FileStore`.
    pub fn read_only(&self, kind: FileKind) -> Option<u32> {
        match self.newer[kind.index()].load(Ordering::Acquire) {
            0 => None,
            v => Some(v),
        }
    }

    /// Reads `kind`.
    ///
    /// See the [module docs](self) for what each outcome means; a damaged or foreign file is
    /// moved aside before this returns.
    pub fn load<T: DeserializeOwned>(&self, kind: FileKind) -> Loaded<T> {
        let path = self.path(kind);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Missing,
            Err(e) => {
                return Loaded::Refused {
                    reason: format!("{}: {e}", path.display()),
                };
            }
            Ok(m) if m.file_type().is_symlink() => {
                return Loaded::Refused {
                    reason: format!("{} is a symlink; not following it", path.display()),
                };
            }
            Ok(m) if !m.is_file() => {
                return Loaded::Refused {
                    reason: format!("{} is not a regular file", path.display()),
                };
            }
            Ok(_) => {}
        }
        let bytes = match read_at_most(&path, self.max_load_bytes) {
            Ok(Some(b)) => b,
            Ok(None) => {
                let reason = format!(
                    "{} is larger than the {} bytes a snapshot store reads at start-up (raise it with JOBRT_SNAPSHOT_MAX_BYTES or the store's max_load_bytes)",
                    path.display(),
                    self.max_load_bytes
                );
                return self.set_aside(&path, TOO_LARGE_TAG, reason);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Missing,
            Err(e) => {
                return Loaded::Refused {
                    reason: format!("{}: {e}", path.display()),
                };
            }
        };
        match self.decode::<T>(kind, &bytes) {
            Ok(stored) => Loaded::Found(stored),
            Err(Bad::Newer(version)) => {
                self.newer[kind.index()].store(version, Ordering::Release);
                Loaded::Newer { version }
            }
            Err(Bad::Damaged(reason)) => self.set_aside(&path, CORRUPT_TAG, reason),
        }
    }

    /// Moves the file at `path` aside (`<file><tag><timestamp>`) for `reason`.
    fn set_aside<T>(&self, path: &Path, tag: &str, reason: String) -> Loaded<T> {
        match move_aside(path, tag, SystemTime::now()) {
            Ok(moved_to) => {
                // Best effort: the rename is what matters, and it has happened.
                let _ = sync_dir(&self.dir);
                Loaded::Quarantined { moved_to, reason }
            }
            Err(e) => Loaded::Refused {
                reason: format!("{reason}; and it could not be moved aside: {e}"),
            },
        }
    }

    /// Writes `kind` atomically.
    ///
    /// On success the file holds this value. On an error the file is the one that was there
    /// before, whole, and no temp file is left — except an error from the last step, the fsync
    /// of the directory: the new file is then in place, but a power cut might undo the rename.
    /// See the [module docs](self) for the protocol.
    pub fn save<T: Serialize>(
        &self,
        kind: FileKind,
        scan_id: u64,
        generated_at: SystemTime,
        value: &T,
    ) -> Result<(), PersistError> {
        let path = self.path(kind);
        if let Some(version) = self.read_only(kind) {
            return Err(PersistError::ReadOnly { path, version });
        }
        if is_symlink(&path).map_err(|e| io_err(&path, e))? {
            return Err(PersistError::Symlink(path));
        }
        let bytes = self.encode(kind, scan_id, generated_at, value)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(kind.temp_prefix())
            .suffix(TEMP_SUFFIX)
            .tempfile_in(&self.dir)
            .map_err(|e| io_err(&self.dir, e))?;
        // On any error below, dropping `tmp` removes the temp file.
        tmp.write_all(&bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| io_err(tmp.path(), e))?;
        // `persist` renames over the target; on failure the returned file is dropped (removed).
        tmp.persist(&path).map_err(|e| io_err(&path, e.error))?;
        sync_dir(&self.dir).map_err(|e| io_err(&self.dir, e))
    }

    /// The whole file's bytes for `value`. Touches nothing on disk.
    fn encode<T: Serialize>(
        &self,
        kind: FileKind,
        scan_id: u64,
        generated_at: SystemTime,
        value: &T,
    ) -> Result<Vec<u8>, PersistError> {
        let payload = serde_json::value::to_raw_value(value)?;
        let generated_at = format_time(generated_at)?;
        let header = Header {
            format: FORMAT_VERSION,
            schema: self.schema,
            store: &self.name,
            kind: kind.label(),
            scan_id,
            generated_at: &generated_at,
        };
        let checksum = format!(
            "{CHECKSUM_PREFIX}{:08x}",
            header.checksum(payload.get().as_bytes())
        );
        let envelope = EnvelopeOut {
            format: header.format,
            schema: header.schema,
            store: header.store,
            kind: header.kind,
            scan_id,
            generated_at: &generated_at,
            checksum: &checksum,
            payload: &payload,
        };
        let mut out = Vec::with_capacity(payload.get().len() + 256);
        serde_json::to_writer(&mut out, &envelope)?;
        Ok(out)
    }

    /// Decodes and checks a whole file's bytes.
    fn decode<T: DeserializeOwned>(&self, kind: FileKind, bytes: &[u8]) -> Result<Stored<T>, Bad> {
        // Fast path: a file this format wrote is `<header>,"payload":<payload>}`, so the header
        // parses on its own and the payload is the rest: no pass over the payload before the
        // checksum. It only ever accepts: on any doubt the full parse decides, so the outcome
        // (and the reason given) is the same as if there were no fast path.
        if let Some((head, payload)) = split_envelope(bytes) {
            let head = [head, b"}"].concat();
            if let Ok(env) = serde_json::from_slice::<EnvelopeIn<'_>>(&head)
                && env.payload.is_none()
                && let Ok(stored) = self.verify(kind, env, Some(payload))
            {
                return Ok(stored);
            }
        }
        let (env, payload) = parse_envelope(kind, bytes)?;
        self.verify(kind, env, payload)
    }

    /// Checks a parsed envelope and its payload bytes, then parses the payload.
    fn verify<T: DeserializeOwned>(
        &self,
        kind: FileKind,
        env: EnvelopeIn<'_>,
        payload: Option<&[u8]>,
    ) -> Result<Stored<T>, Bad> {
        let format: u32 = field(env.format, "format")?;
        if format > FORMAT_VERSION {
            return Err(Bad::Newer(format));
        }
        if format != FORMAT_VERSION {
            return Err(Bad::Damaged(format!(
                "unknown format version {format} (this build reads {FORMAT_VERSION})"
            )));
        }
        let schema: u32 = field(env.schema, "schema")?;
        let store: Cow<'_, str> = field(env.store, "store")?;
        let file_kind: Cow<'_, str> = field(env.kind, "kind")?;
        let scan_id: u64 = field(env.scan_id, "scan_id")?;
        let generated_at: Cow<'_, str> = field(env.generated_at, "generated_at")?;
        let checksum: Cow<'_, str> = field(env.checksum, "checksum")?;
        let payload = payload.ok_or_else(|| Bad::Damaged("no `payload` field".into()))?;

        let expected = parse_checksum(&checksum).ok_or_else(|| {
            Bad::Damaged(format!(
                "malformed checksum `{}` (expected `crc32:` and 8 hex digits)",
                checksum.escape_debug()
            ))
        })?;
        let header = Header {
            format,
            schema,
            store: &store,
            kind: &file_kind,
            scan_id,
            generated_at: &generated_at,
        };
        let actual = header.checksum(payload);
        if actual != expected {
            return Err(Bad::Damaged(format!(
                "checksum mismatch: the file says {CHECKSUM_PREFIX}{expected:08x}, its content gives {CHECKSUM_PREFIX}{actual:08x} (damaged or edited)"
            )));
        }
        // The file is intact; now: is it ours?
        if *store != *self.name {
            return Err(Bad::Damaged(format!(
                "written by store `{}`, not `{}`",
                store.escape_debug(),
                self.name
            )));
        }
        if *file_kind != *kind.label() {
            return Err(Bad::Damaged(format!(
                "a `{}` file, not a {}",
                file_kind.escape_debug(),
                kind.label()
            )));
        }
        if schema != self.schema {
            return Err(Bad::Damaged(format!(
                "schema version {schema}, but this store reads schema {}",
                self.schema
            )));
        }
        let generated_at = humantime::parse_rfc3339(&generated_at).map_err(|e| {
            Bad::Damaged(format!(
                "bad `generated_at` `{}`: {e}",
                generated_at.escape_debug()
            ))
        })?;
        let value = serde_json::from_slice(payload).map_err(|e| {
            Bad::Damaged(format!(
                "the payload does not deserialize into the expected type: {e}"
            ))
        })?;
        Ok(Stored {
            scan_id,
            generated_at,
            value,
        })
    }
}

/// Why a file's bytes are not a good file.
#[derive(Debug)]
enum Bad {
    /// A newer format: leave it alone.
    Newer(u32),
    /// Anything else: set it aside, with this reason.
    Damaged(String),
}

/// The fields the checksum covers besides the payload.
struct Header<'a> {
    format: u32,
    schema: u32,
    store: &'a str,
    kind: &'a str,
    scan_id: u64,
    generated_at: &'a str,
}

impl Header<'_> {
    /// CRC-32 of the header fields, one per line, then the payload bytes.
    fn checksum(&self, payload: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(
            format!(
                "{}\n{}\n{}\n{}\n{}\n{}\n",
                self.format, self.schema, self.store, self.kind, self.scan_id, self.generated_at
            )
            .as_bytes(),
        );
        h.update(payload);
        h.finalize()
    }
}

/// The envelope as written. Field order is the file's order; `payload` last.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    format: u32,
    schema: u32,
    store: &'a str,
    kind: &'a str,
    scan_id: u64,
    generated_at: &'a str,
    checksum: &'a str,
    payload: &'a RawValue,
}

/// The envelope as read: every field raw and optional, unknown fields ignored, so that the
/// format version can be read from any envelope (a newer one may change the other fields), and
/// the payload is borrowed from the file's buffer, not copied.
#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[serde(borrow)]
    format: Option<&'a RawValue>,
    #[serde(borrow)]
    schema: Option<&'a RawValue>,
    #[serde(borrow)]
    store: Option<&'a RawValue>,
    #[serde(borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    scan_id: Option<&'a RawValue>,
    #[serde(borrow)]
    generated_at: Option<&'a RawValue>,
    #[serde(borrow)]
    checksum: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

/// The longest header the fast path looks at. Ours is at most about 1 KiB: a store name of
/// 128 bytes takes at most 768 escaped.
const MAX_HEADER_BYTES: usize = 4096;

/// Splits `<header>,"payload":<payload>}` at the first `,"payload":` within the first
/// [`MAX_HEADER_BYTES`]. That sequence cannot occur inside a JSON string (a quote there is
/// escaped), so in a file we wrote it is the payload's key. Whether the split is right is
/// settled by the header parsing alone and the checksum matching.
fn split_envelope(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    const KEY: &[u8] = b",\"payload\":";
    let body = bytes.strip_suffix(b"}")?;
    let window = &body[..body.len().min(MAX_HEADER_BYTES + KEY.len())];
    let at = window.windows(KEY.len()).position(|w| w == KEY)?;
    let payload = &body[at + KEY.len()..];
    // Whitespace around the value is not part of it (as a `RawValue` would have it).
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    if payload.first().is_none_or(ws) || payload.last().is_none_or(ws) {
        return None;
    }
    Some((&body[..at], payload))
}

/// The full parse of an envelope, the payload borrowed, not parsed.
fn parse_envelope<'a>(
    kind: FileKind,
    bytes: &'a [u8],
) -> Result<(EnvelopeIn<'a>, Option<&'a [u8]>), Bad> {
    let env: EnvelopeIn<'a> = serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        Bad::Damaged(match e.classify() {
            Category::Eof => format!("truncated: {e}"),
            Category::Syntax | Category::Io => format!("not valid JSON: {e}"),
            Category::Data => format!("not a {} envelope: {e}", kind.label()),
        })
    })?;
    let payload = env.payload.map(|p| p.get().as_bytes());
    Ok((env, payload))
}

/// One small header field, decoded from its raw JSON.
fn field<'a, U: Deserialize<'a>>(raw: Option<&'a RawValue>, name: &str) -> Result<U, Bad> {
    let raw = raw.ok_or_else(|| Bad::Damaged(format!("no `{name}` field")))?;
    serde_json::from_str(raw.get()).map_err(|e| Bad::Damaged(format!("bad `{name}` field: {e}")))
}

/// `crc32:` and exactly 8 hex digits.
fn parse_checksum(s: &str) -> Option<u32> {
    let hex = s.strip_prefix(CHECKSUM_PREFIX)?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// RFC 3339 with nanoseconds, or a serialization error for a time it cannot express (before
/// 1970 or after 9999), which `humantime` would panic on.
fn format_time(t: SystemTime) -> Result<String, serde_json::Error> {
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d <= LAST => Ok(humantime::format_rfc3339_nanos(t).to_string()),
        _ => Err(<serde_json::Error as serde::ser::Error>::custom(format!(
            "generated_at {t:?} is outside 1970..=9999, which RFC 3339 timestamps here cover"
        ))),
    }
}

/// `YYYYMMDDTHHMMSS.mmmZ` in UTC, for quarantined file names (clamped into 1970..=9999).
fn stamp(t: SystemTime) -> String {
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    let t = match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d <= LAST => t,
        Ok(_) => UNIX_EPOCH + LAST,
        Err(_) => UNIX_EPOCH,
    };
    humantime::format_rfc3339_millis(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// Renames `path` to `<path>.corrupt-<stamp>` (or `…-1`, `…-2`, … if taken); returns the new
/// path.
/// The name tag of a damaged file moved aside.
const CORRUPT_TAG: &str = ".corrupt-";
/// The name tag of a file moved aside unread, for its size.
const TOO_LARGE_TAG: &str = ".too-large-";

/// The whole file, or `None` if it holds more than `max` bytes (only `max + 1` are read to
/// find out, whatever its size).
fn read_at_most(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len > max {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

fn move_aside(path: &Path, tag: &str, now: SystemTime) -> io::Result<PathBuf> {
    let mut base = path.as_os_str().to_owned();
    base.push(tag);
    base.push(stamp(now));
    for n in 0..1000u32 {
        let mut candidate = base.clone();
        if n > 0 {
            candidate.push(format!("-{n}"));
        }
        let candidate = PathBuf::from(candidate);
        match fs::symlink_metadata(&candidate) {
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::rename(path, &candidate)?;
                return Ok(candidate);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "1000 quarantined files with this timestamp already exist",
    ))
}

/// Whether `name` is one of our temp files: `.<file name>.<random alphanumerics>.tmp`.
fn is_temp_name(name: &str) -> bool {
    FileKind::ALL.iter().any(|k| {
        name.strip_prefix(k.temp_prefix())
            .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
            .is_some_and(|rand| !rand.is_empty() && rand.bytes().all(|b| b.is_ascii_alphanumeric()))
    })
}

/// Removes the temp files an interrupted `save` left in `dir`, and nothing else.
fn remove_leftover_temps(dir: &Path) -> Result<(), PersistError> {
    let entries = fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_temp_name(&name) {
            continue;
        }
        // A directory of that name is not ours; a symlink is removed itself, never followed.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "removed a temp file left by an interrupted write")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, e)),
        }
    }
    Ok(())
}

/// Whether `path` exists and is a symlink (not following it).
fn is_symlink(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(m.file_type().is_symlink()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes a rename in `dir` durable. A no-op where directories cannot be opened (Windows).
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

fn io_err(path: &Path, source: io::Error) -> PersistError {
    PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let ok = [
            "a",
            "sessions",
            "my-store_2.v1",
            ".hidden",
            "...",
            "ünïcödé",
            &"x".repeat(128),
        ];
        for name in ok {
            assert_eq!(validate_name(name), Ok(()), "{name:?}");
        }
        let bad: [(&str, &str); 11] = [
            ("", "the name is empty"),
            (".", "`.` is not a name"),
            ("..", "`..` is not a name"),
            ("../x", "`../x` contains `/`"),
            ("a/b", "`a/b` contains `/`"),
            ("/", "`/` contains `/`"),
            ("a\\b", "contains `\\`"),
            ("a\0b", "contains NUL"),
            ("a\nb", "`a\\nb` contains a control character (U+000A)"),
            ("a\u{7f}", "control character (U+007F)"),
            (&"é".repeat(65), "is 130 bytes long, more than 128"),
        ];
        for (name, expected) in bad {
            let err = validate_name(name).unwrap_err();
            assert!(err.contains(expected), "{name:?}: {err}");
            assert!(err.ends_with(NAME_RULE), "{name:?}: {err}");
        }
        assert_eq!(
            validate_name("../x").unwrap_err(),
            "`../x` contains `/`; a store name must be one path component: 1 to 128 bytes, no `/`, `\\`, NUL or control characters, not `.` or `..`"
        );
    }

    fn store() -> (tempfile::TempDir, FileStore) {
        let root = tempfile::tempdir().unwrap();
        let files = FileStore::open(root.path(), "s", 3).unwrap();
        (root, files)
    }

    #[test]
    fn encode_decode_round_trip() {
        let (_root, files) = store();
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let value = (
            String::from("a \"quoted\" ünïcödé\n"),
            vec![1u64, u64::MAX],
            -1.5f64,
        );
        let bytes = files.encode(FileKind::Checkpoint, 42, at, &value).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.starts_with(r#"{"format":1,"schema":3,"store":"s","kind":"checkpoint","scan_id":42,"generated_at":"2023-11-14T22:13:20.123456789Z","checksum":"crc32:"#),
            "{text}"
        );
        assert!(!text.ends_with('\n'));
        let got: Stored<(String, Vec<u64>, f64)> =
            files.decode(FileKind::Checkpoint, &bytes).unwrap();
        assert_eq!((got.scan_id, got.generated_at, got.value), (42, at, value));
        // The same bytes are not a snapshot.
        match files.decode::<(String, Vec<u64>, f64)>(FileKind::Snapshot, &bytes) {
            Err(Bad::Damaged(r)) => assert!(r.contains("`checkpoint` file"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fast_and_full_parse_agree() {
        let root = tempfile::tempdir().unwrap();
        // A name that spells the split sequence: escaped in JSON, so it cannot match.
        let files = FileStore::open(root.path(), r#"a,"payload":b"#, 1).unwrap();
        let value = (vec![1u32, 2, 3], String::from(r#","payload":"#));
        let bytes = files
            .encode(FileKind::Snapshot, 9, UNIX_EPOCH, &value)
            .unwrap();
        let (head, payload) = split_envelope(&bytes).unwrap();
        assert!(head.starts_with(br#"{"format":1,"#) && head.ends_with(b"\""));
        assert_eq!(payload, serde_json::to_vec(&value).unwrap());
        let fast: Stored<(Vec<u32>, String)> = files.decode(FileKind::Snapshot, &bytes).unwrap();
        // The same envelope with its keys sorted (`payload` no longer last): the full parse.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let sorted = serde_json::to_vec(&v).unwrap();
        assert_ne!(sorted, bytes);
        assert!(!sorted.ends_with(b"]]}"));
        let full: Stored<(Vec<u32>, String)> = files.decode(FileKind::Snapshot, &sorted).unwrap();
        assert_eq!((fast.scan_id, &fast.value), (9, &value));
        assert_eq!((full.scan_id, &full.value), (9, &value));
        // A second payload key in front is not taken for the header's end.
        let twice = [&br#"{"payload":0,"#[..], &bytes[1..]].concat();
        match files.decode::<(Vec<u32>, String)>(FileKind::Snapshot, &twice) {
            Err(Bad::Damaged(r)) => assert!(r.contains("duplicate field `payload`"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn random_damage_never_panics_and_never_passes_as_another_value() {
        let (_root, files) = store();
        let value: Vec<(String, i64)> = (0..20).map(|i| (format!("k{i}\u{e9}"), -i)).collect();
        let good = files
            .encode(FileKind::Snapshot, 5, UNIX_EPOCH, &value)
            .unwrap();
        const NOISE: &[u8] = br#"{}[]",:0 \ue"#;
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..5000 {
            let mut bad = good.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(..bad.len());
                match rng.u8(..3) {
                    0 => bad[i] = rng.u8(..),
                    1 => drop(bad.remove(i)),
                    _ => bad.insert(i, NOISE[rng.usize(..NOISE.len())]),
                }
            }
            // Only whitespace added between tokens may pass (`good` has none), and it changes
            // nothing; anything else must be refused.
            if let Ok(got) = files.decode::<Vec<(String, i64)>>(FileKind::Snapshot, &bad) {
                let text = String::from_utf8_lossy(&bad);
                let ws = |b: &&u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
                assert!(bad.iter().filter(|b| !ws(b)).eq(&good), "{text}");
                assert_eq!((got.scan_id, got.generated_at), (5, UNIX_EPOCH));
                assert_eq!(got.value, value, "{text}");
            }
        }
    }

    #[test]
    fn times_outside_rfc3339_are_a_serialization_error() {
        let (_root, files) = store();
        for t in [
            UNIX_EPOCH - Duration::from_secs(1),
            UNIX_EPOCH + Duration::from_secs(253_402_300_800),
        ] {
            match files.encode(FileKind::Snapshot, 1, t, &1) {
                Err(PersistError::Serialize(e)) => assert!(e.to_string().contains("1970")),
                other => panic!("{other:?}"),
            }
        }
        assert!(files.encode(FileKind::Snapshot, 1, UNIX_EPOCH, &1).is_ok());
    }

    #[test]
    fn checksum_field() {
        assert_eq!(parse_checksum("crc32:0000abcd"), Some(0xabcd));
        assert_eq!(parse_checksum("crc32:FFFFFFFF"), Some(u32::MAX));
        for bad in [
            "",
            "crc32:",
            "crc32:abc",
            "crc32:0000abcde",
            "crc32:+000abcd",
            "md5:0000abcd",
            "crc32:0000abcg",
        ] {
            assert_eq!(parse_checksum(bad), None, "{bad}");
        }
    }

    #[test]
    fn newer_format_is_read_from_any_object_with_a_format() {
        let (_root, files) = store();
        for text in [
            r#"{"format":2}"#,
            r#"{"payload":[1,2,{"x":null}],"format":7,"scan_id":"not a number","extra":true}"#,
        ] {
            match files.decode::<u32>(FileKind::Snapshot, text.as_bytes()) {
                Err(Bad::Newer(v)) => assert!(v >= 2),
                other => panic!("{text}: {other:?}"),
            }
        }
        for (text, reason) in [
            (r#"{"format":0}"#, "unknown format version 0"),
            (r#"{"format":-1}"#, "bad `format` field"),
            (r#"{"format":"1"}"#, "bad `format` field"),
            (r#"{"schema":1}"#, "no `format` field"),
            (r#"[1]"#, "not a snapshot envelope"),
            (r#"{"format":1,"format":1}"#, "duplicate field"),
            (r#"{"format":1}  x"#, "not valid JSON"),
            (r#"{"format":1"#, "truncated"),
        ] {
            match files.decode::<u32>(FileKind::Snapshot, text.as_bytes()) {
                Err(Bad::Damaged(r)) => assert!(r.contains(reason), "{text}: {r}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn stamps_and_quarantine_names() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(stamp(t), "20231114T221320.123Z");
        assert_eq!(
            stamp(UNIX_EPOCH - Duration::from_secs(5)),
            "19700101T000000.000Z"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.json");
        let mut moved = Vec::new();
        for i in 0..3 {
            fs::write(&path, format!("{i}")).unwrap();
            moved.push(move_aside(&path, CORRUPT_TAG, t).unwrap());
        }
        let names: Vec<_> = moved
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "snapshot.json.corrupt-20231114T221320.123Z",
                "snapshot.json.corrupt-20231114T221320.123Z-1",
                "snapshot.json.corrupt-20231114T221320.123Z-2",
            ]
        );
        for (i, p) in moved.iter().enumerate() {
            assert_eq!(fs::read_to_string(p).unwrap(), format!("{i}"));
        }
        assert!(!path.exists());
    }

    #[test]
    fn temp_names() {
        for name in [".snapshot.json.a1B2c3.tmp", ".checkpoint.json.XYZ789.tmp"] {
            assert!(is_temp_name(name), "{name}");
        }
        for name in [
            ".snapshot.json.tmp",
            ".snapshot.json..tmp",
            "snapshot.json.a1B2c3.tmp",
            ".snapshot.json.a1-2.tmp",
            ".snapshot.json.a1B2c3.tmp.keep",
            ".other.json.a1B2c3.tmp",
            "snapshot.json.corrupt-20231114T221320.123Z",
            "snapshot.json",
        ] {
            assert!(!is_temp_name(name), "{name}");
        }
    }
}
