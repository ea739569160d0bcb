//! The audit log: one JSON line for everything done to a replica.
//!
//! Replica commits, bootstraps, promotions, pauses, resumes, resyncs,
//! divergence and failed runs each become one line (time, instance, table,
//! destination, source snapshot ids, replica metadata location, files and
//! bytes copied, duration, outcome, error) in `audit_log`, readable through
//! `GET /v1/replication/audit`.
//!
//! Replication never waits for the disk: [`AuditLog::record`] hands the event
//! to a writer thread through a bounded queue and returns; if the queue is
//! full (a disk far slower than replication) the event is dropped, counted,
//! and logged. Each line is written with one `write` on a file opened for
//! appending, so a process killed at any moment leaves whole lines only. The
//! file is rotated by size: `audit.log` becomes `audit.log.1`, the oldest
//! beyond `audit_log_keep` is deleted.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use serde::Serialize;
use serde_json::Value;

use crate::config::AuditConfig;
use crate::state::{LaneKey, Millis, now_ms, rfc3339};

/// Events waiting for the writer before new ones are dropped.
const QUEUE: usize = 65_536;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A replica commit (one source commit replayed).
    Commit,
    /// A replica was made (registered with history, or created).
    Bootstrap,
    /// A replica was promoted to a table of its own.
    Promote,
    /// An existing table with snapshots of its own was adopted as a replica
    /// (failback), as an operator chose.
    Failback,
    /// An operator paused a lane.
    Pause,
    /// An operator resumed a lane.
    Resume,
    /// An operator asked for a full check.
    Resync,
    /// The replica was found written around icerelay; the lane stopped.
    Divergence,
    /// A lane run failed (it is retried).
    Failure,
}

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When (RFC 3339, milliseconds, UTC).
    pub time: String,
    /// Which icerelay (host and process id).
    pub instance: String,
    /// What happened.
    pub action: Action,
    /// The source table.
    pub table: String,
    /// The destination.
    pub destination: String,
    /// The replica table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Source snapshot ids the action carried (a commit's, a bootstrap's).
    pub source_snapshots: Vec<i64>,
    /// The replica's metadata after the action.
    pub replica_metadata_location: Option<String>,
    /// Files copied for it.
    pub files_copied: u64,
    /// Bytes copied for it.
    pub bytes_copied: u64,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// `ok` or `error`.
    pub outcome: &'static str,
    /// What failed (redacted like every icerelay error: never a credential).
    pub error: Option<String>,
    /// Action-specific facts (a promotion's recovery point, say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

impl Event {
    /// A successful `action` on `lane`, now, with nothing copied.
    pub fn ok(action: Action, lane: &LaneKey) -> Self {
        Self {
            time: rfc3339(now_ms()),
            instance: instance().to_owned(),
            action,
            table: lane.table.to_string(),
            destination: lane.destination.clone(),
            replica: None,
            source_snapshots: Vec::new(),
            replica_metadata_location: None,
            files_copied: 0,
            bytes_copied: 0,
            duration_ms: 0,
            outcome: "ok",
            error: None,
            detail: None,
        }
    }

    /// A failed `action` on `lane`.
    pub fn failed(action: Action, lane: &LaneKey, error: String) -> Self {
        Self { outcome: "error", error: Some(error), ..Self::ok(action, lane) }
    }

    /// The time since `started`.
    pub fn took(mut self, started: std::time::Instant) -> Self {
        self.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self
    }
}

/// This process, as audit lines name it: `host:pid`.
fn instance() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{host}:{}", std::process::id())
    })
}

/// Why the audit log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file or its directory cannot be opened.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The audit log's writing end.
#[derive(Debug)]
pub struct AuditLog {
    queue: SyncSender<Event>,
    config: AuditConfig,
    dropped: Arc<AtomicU64>,
}

impl AuditLog {
    /// Opens (creating) the file and starts the writer thread.
    pub fn open(config: &AuditConfig) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io { path: config.path.display().to_string(), source };
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = open_append(&config.path).map_err(io)?;
        let (queue, events) = sync_channel(QUEUE);
        let writer = Writer { file, config: config.clone() };
        std::thread::Builder::new().name("icerelay-audit".into()).spawn(move || writer.run(&events)).map_err(io)?;
        Ok(Self { queue, config: config.clone(), dropped: Arc::new(AtomicU64::new(0)) })
    }

    /// Queues `event` for writing; never waits.
    pub fn record(&self, event: Event) {
        match self.queue.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(event)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::error!(dropped, table = %event.table, action = ?event.action, path = %self.config.path.display(), "the audit log's disk is too slow; audit lines were dropped");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!(path = %self.config.path.display(), "the audit log writer stopped; audit lines are lost");
            }
        }
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Reads lines back, oldest first: those for `table` (if given) at or
    /// after `since`, at most `limit`. Blocking: call from a blocking task.
    pub fn read(&self, query: &Query) -> Result<Page, AuditError> {
        read(&self.config, query)
    }
}

/// What to read back.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only this source table (`namespace.table`).
    pub table: Option<String>,
    /// Only lines at or after this time.
    pub since: Option<Millis>,
    /// Lines at exactly `since` to pass over (the previous page had them).
    pub skip: usize,
    /// At most this many.
    pub limit: usize,
}

/// Lines read back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Page {
    /// The lines, oldest first, as written.
    pub entries: Vec<Value>,
    /// The time of the next matching line, when `limit` cut the answer short.
    pub next_since: Option<String>,
    /// With `next_since`: how many lines at that time this page already has
    /// (pass it as `skip`, so that lines sharing a millisecond come once).
    pub next_skip: Option<usize>,
}

struct Writer {
    file: File,
    config: AuditConfig,
}

impl Writer {
    fn run(mut self, events: &Receiver<Event>) {
        while let Ok(event) = events.recv() {
            let mut line = match serde_json::to_vec(&event) {
                Ok(line) => line,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode an audit line");
                    continue;
                }
            };
            line.push(b'\n');
            if let Err(e) = self.write(&line) {
                tracing::error!(error = %e, path = %self.config.path.display(), "cannot write the audit log");
            }
        }
    }

    /// One `write` per line, so that no kill leaves half a line; then rotate
    /// if the file has grown past the bound.
    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        let written = self.file.write(line)?;
        if written < line.len() {
            // Only a full disk gets here: finish the line rather than leave it torn.
            self.file.write_all(&line[written..])?;
        }
        if self.file.metadata()?.len() >= self.config.max_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let path = &self.config.path;
        let keep = self.config.keep;
        if keep == 0 {
            std::fs::remove_file(path)?;
        } else {
            let _ = std::fs::remove_file(rotated(path, keep));
            for n in (1..keep).rev() {
                let from = rotated(path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(path, n + 1))?;
                }
            }
            std::fs::rename(path, rotated(path, 1))?;
        }
        self.file = open_append(path)?;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The `n`th rotated file: `audit.log.1` is the newest.
fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn read(config: &AuditConfig, query: &Query) -> Result<Page, AuditError> {
    let mut files: Vec<PathBuf> = (1..=config.keep).rev().map(|n| rotated(&config.path, n)).collect();
    files.push(config.path.clone());
    let mut page = Page::default();
    let mut skipped = 0;
    for path in files {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(AuditError::Io { path: path.display().to_string(), source }),
        };
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            // A line being written right now may be incomplete: skip it.
            let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
            let time = entry.get("time").and_then(Value::as_str).unwrap_or_default();
            let at = parse_time(time);
            if query.since.is_some_and(|since| at.is_none_or(|t| t < since)) {
                continue;
            }
            if query.table.as_deref().is_some_and(|t| entry.get("table").and_then(Value::as_str) != Some(t)) {
                continue;
            }
            if query.since.is_some() && at == query.since && skipped < query.skip {
                skipped += 1;
                continue;
            }
            if page.entries.len() == query.limit {
                let same_time = page.entries.iter().filter(|e| e.get("time").and_then(Value::as_str) == Some(time));
                let earlier = if at == query.since { query.skip } else { 0 };
                page.next_skip = Some(earlier + same_time.count());
                page.next_since = Some(time.to_owned());
                return Ok(page);
            }
            page.entries.push(entry);
        }
    }
    Ok(page)
}

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn parse_time(text: &str) -> Option<Millis> {
    let at = humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).ok()?;
    at.duration_since(std::time::UNIX_EPOCH).ok().and_then(|d| i64::try_from(d.as_millis()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Namespace, TableIdent};

    fn lane(name: &str) -> LaneKey {
        LaneKey::new(TableIdent::new(Namespace::from_dotted("db"), name), "dr")
    }

    fn wait_for_lines(path: &Path, n: usize) {
        for _ in 0..500 {
            let count = std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0);
            if count >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the writer did not write {n} lines");
    }

    #[test]
    fn lines_are_written_read_back_filtered_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig { path: dir.path().join("audit.log"), max_bytes: 500, keep: 2 };
        let log = AuditLog::open(&config).unwrap();
        for i in 0..10 {
            let mut event = Event::ok(Action::Commit, &lane(if i % 2 == 0 { "a" } else { "b" }));
            event.source_snapshots = vec![i];
            log.record(event);
        }
        // ~250 bytes a line, 500 bytes a file, two rotated files kept: the
        // oldest lines are gone, the rest read back in order.
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(rotated(&config.path, 1).exists() && rotated(&config.path, 2).exists());
        assert!(!rotated(&config.path, 3).exists());
        let all = log.read(&Query { limit: 100, ..Query::default() }).unwrap();
        let ids: Vec<i64> = all.entries.iter().map(|e| e["source_snapshots"][0].as_i64().unwrap()).collect();
        assert!(ids.len() < 10 && ids.len() >= 2, "{ids:?}");
        assert!(ids.windows(2).all(|w| w[0] + 1 == w[1]) && *ids.last().unwrap() == 9, "{ids:?}");
        let only_a = log.read(&Query { table: Some("db.a".into()), limit: 100, ..Query::default() }).unwrap();
        assert!(only_a.entries.iter().all(|e| e["table"] == "db.a") && !only_a.entries.is_empty());
        let two = log.read(&Query { limit: 2, ..Query::default() }).unwrap();
        assert_eq!(two.entries.len(), 2);
        assert!(two.next_since.is_some());
        let future = log.read(&Query { since: Some(now_ms() + 60_000), limit: 100, ..Query::default() }).unwrap();
        assert!(future.entries.is_empty());
    }

    #[test]
    fn pages_return_every_line_once_even_when_lines_share_a_millisecond() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig { path: dir.path().join("audit.log"), max_bytes: 1 << 20, keep: 1 };
        let log = AuditLog::open(&config).unwrap();
        for i in 0..7 {
            let mut event = Event::ok(Action::Commit, &lane("a"));
            event.time = "2026-12-04T10:00:00.000Z".into();
            event.source_snapshots = vec![i];
            log.record(event);
        }
        wait_for_lines(&config.path, 7);
        let mut seen = Vec::new();
        let mut query = Query { limit: 3, ..Query::default() };
        for _ in 0..5 {
            let page = log.read(&query).unwrap();
            seen.extend(page.entries.iter().map(|e| e["source_snapshots"][0].as_i64().unwrap()));
            let Some(next) = page.next_since else { break };
            query.since = parse_time(&next);
            query.skip = page.next_skip.unwrap();
        }
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_last_line_is_skipped_when_reading() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig { path: dir.path().join("audit.log"), max_bytes: 1 << 20, keep: 1 };
        let log = AuditLog::open(&config).unwrap();
        log.record(Event::failed(Action::Failure, &lane("a"), "boom".into()));
        wait_for_lines(&config.path, 1);
        std::fs::OpenOptions::new().append(true).open(&config.path).unwrap().write_all(b"{\"time\":\"20").unwrap();
        let page = log.read(&Query { limit: 10, ..Query::default() }).unwrap();
        assert_eq!(page.entries.len(), 1);
        assert_eq!(page.entries[0]["outcome"], "error");
        assert_eq!(page.entries[0]["error"], "boom");
        assert!(parse_time(page.entries[0]["time"].as_str().unwrap()).is_some());
    }
}
