//! The manifest-directory source: every `*.yaml`, `*.yml` and `*.json` file of a
//! directory, read as Kubernetes manifests (multi-document YAML, `kind: List`), and
//! watched so that adding, editing or deleting a file changes the data plane at once.
//!
//! Bad input never removes good state: an invalid document is skipped with a log line
//! naming the file, document and reason, and whatever that document defined before
//! stays in effect until it is fixed or deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher as _};
use tracing::{debug, info, warn};

use super::queue::EventSender;
use super::{Object, SourceEvent};
use crate::model::{Kind, ObjectRef};

/// How long to wait for more file events before reloading, so a burst of writes
/// becomes one reload.
const DEBOUNCE: Duration = Duration::from_millis(15);
/// Safety net: stat every file this often in case a watch event was lost.
const RESCAN_INTERVAL: Duration = Duration::from_secs(10);

/// One document of a file, after parsing.
#[derive(Debug, PartialEq)]
pub enum Document {
    Object {
        object: Object,
        origin: String,
    },
    /// A kind the model does not use (Deployment, ConfigMap...).
    Irrelevant {
        kind: String,
        origin: String,
    },
    /// Broken input. `object` is known when the document named one.
    Invalid {
        object: Option<ObjectRef>,
        origin: String,
        reason: String,
    },
}

/// Splits a file into YAML documents the way kubectl does (a line that is exactly
/// `---`), so a syntax error in one document cannot hide the others.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with("---") && line[3..].trim().is_empty() {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// Parses one file's text into documents. `name` is used in origins and logs.
pub fn parse_manifests(name: &str, text: &str) -> Vec<Document> {
    let mut out = Vec::new();
    // Editors on some systems start files with a byte order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, doc) in split_documents(text).into_iter().enumerate() {
        let origin = format!("{name}#{}", i + 1);
        if is_blank(doc) {
            continue; // empty document (only comments or blank)
        }
        let value: serde_json::Value = match parse_yaml(doc) {
            Ok(v) => v,
            Err(e) => {
                out.push(Document::Invalid {
                    object: None,
                    origin,
                    reason: format!("not valid YAML: {e}"),
                });
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        parse_value(value, origin, &mut out);
    }
    out
}

/// Whether a document holds nothing but blank lines and comments.
fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

/// What one document may expand to: far more than any manifest needs (a
/// `kind: List` of 10,000 services is ~1M nodes), far less than an alias bomb.
fn budget() -> serde_saphyr::Budget {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = 8_000_000;
    budget.max_nodes = 4_000_000;
    budget.max_total_scalar_bytes = MAX_FILE_BYTES as usize;
    budget.max_reader_input_bytes = Some(MAX_FILE_BYTES as usize);
    budget
}

/// One YAML (or JSON) document as a JSON value, within [`budget`]. Plain scalars
/// are typed by YAML 1.2's core schema, as the API server's YAML decoding does: `y`,
/// `on` or `no` stay strings, as do `0755` and `1_000`.
pub(crate) fn parse_yaml(doc: &str) -> Result<serde_json::Value, serde_saphyr::Error> {
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget());
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    serde_saphyr::from_str_with_options(doc, options)
}

fn parse_value(value: serde_json::Value, origin: String, out: &mut Vec<Document>) {
    let Some(map) = value.as_object() else {
        out.push(Document::Invalid {
            object: None,
            origin,
            reason: "document is not a mapping".into(),
        });
        return;
    };
    let field = |name: &str| map.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let Some(kind) = field("kind") else {
        out.push(Document::Invalid {
            object: None,
            origin,
            reason: "no kind".into(),
        });
        return;
    };
    let api_version = field("apiVersion").unwrap_or_default();
    if kind == "List" || (kind.ends_with("List") && map.contains_key("items")) {
        let items = map
            .get("items")
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        for (j, item) in items.into_iter().enumerate() {
            parse_value(item, format!("{origin} items[{j}]"), out);
        }
        return;
    }
    let (model_kind, expected_api) = match kind.as_str() {
        "Service" => (Kind::Service, "v1"),
        "EndpointSlice" => (Kind::EndpointSlice, "discovery.k8s.io/v1"),
        "Node" => (Kind::Node, "v1"),
        "ServiceCIDR" => (Kind::ServiceCidr, "networking.k8s.io/v1"),
        _ => {
            out.push(Document::Irrelevant { kind, origin });
            return;
        }
    };
    let object = object_ref_of(map, model_kind);
    let invalid = |reason: String| Document::Invalid {
        object: object.clone(),
        origin: origin.clone(),
        reason,
    };
    if object.is_none() {
        out.push(invalid("metadata.name is missing".into()));
        return;
    }
    if api_version != expected_api {
        out.push(invalid(format!(
            "apiVersion {api_version:?} is not {expected_api:?} for kind {kind}"
        )));
        return;
    }
    match decode(value, model_kind) {
        Ok(object) => out.push(Document::Object { object, origin }),
        Err(e) => out.push(invalid(format!("does not match the {kind} schema: {e}"))),
    }
}

/// The identity a document claims in its metadata, if it names itself.
fn object_ref_of(
    map: &serde_json::Map<String, serde_json::Value>,
    kind: Kind,
) -> Option<ObjectRef> {
    let metadata = map.get("metadata").and_then(|m| m.as_object());
    let meta_str = |name: &str| {
        metadata
            .and_then(|m| m.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    meta_str("name").map(|name| ObjectRef {
        kind,
        namespace: if matches!(kind, Kind::Node | Kind::ServiceCidr) {
            String::new()
        } else {
            meta_str("namespace").unwrap_or_else(|| "default".into())
        },
        name,
    })
}

/// A document as the typed object of its kind.
fn decode(value: serde_json::Value, kind: Kind) -> Result<Object, serde_json::Error> {
    match kind {
        Kind::Service => serde_json::from_value(value).map(|o| Object::Service(Box::new(o))),
        Kind::EndpointSlice => {
            serde_json::from_value(value).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        Kind::Node => serde_json::from_value(value).map(|o| Object::Node(Box::new(o))),
        Kind::ServiceCidr => {
            serde_json::from_value(value).map(|o| Object::ServiceCidr(Box::new(o)))
        }
    }
}

/// One file's definition of an object: a fingerprint of its content (objects
/// themselves are not kept: at 10,000 services they would double the agent's memory)
/// and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Definition {
    fingerprint: u64,
    origin: String,
}

/// A stable-within-the-process hash of an object's content.
fn fingerprint(object: &Object) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let json = match object {
        Object::Service(o) => serde_json::to_vec(o),
        Object::EndpointSlice(o) => serde_json::to_vec(o),
        Object::Node(o) => serde_json::to_vec(o),
        Object::ServiceCidr(o) => serde_json::to_vec(o),
    }
    .unwrap_or_default();
    let mut hasher = std::hash::DefaultHasher::new();
    json.hash(&mut hasher);
    hasher.finish()
}

/// What the directory currently defines, tracked per file so that a file edit or
/// deletion turns into exactly the object changes it implies.
#[derive(Default)]
pub struct ManifestState {
    /// Objects each file contributes (including kept last-good versions).
    files: HashMap<PathBuf, Vec<ObjectRef>>,
    /// Every definition of each object, by file; the first file (by path) wins.
    defs: HashMap<ObjectRef, BTreeMap<PathBuf, Definition>>,
}

impl ManifestState {
    /// Re-reads one file (absent = deleted) and returns the events it causes.
    pub fn reload(&mut self, path: &Path) -> Vec<SourceEvent> {
        match read_documents(path) {
            Ok(documents) => self.apply_documents(path, documents),
            Err(e) => {
                warn!(file = ?path, error = %e, "cannot read manifest file; keeping what it defined");
                Vec::new()
            }
        }
    }

    /// Applies a parsed file (what `reload` does after reading it).
    pub fn apply_documents(&mut self, path: &Path, documents: Vec<Document>) -> Vec<SourceEvent> {
        let mut file = FileUpdate {
            path,
            old_refs: self
                .files
                .get(path)
                .map(|refs| refs.iter().cloned().collect())
                .unwrap_or_default(),
            new_refs: Vec::new(),
            current: HashMap::new(),
            events: Vec::new(),
        };
        let mut keep_everything = false;
        for doc in documents {
            match doc {
                Document::Object { object, origin } => self.apply_object(&mut file, object, origin),
                Document::Irrelevant { kind, origin } => {
                    debug!(origin, kind, "ignoring object of a kind Ferry does not use");
                }
                Document::Invalid {
                    object,
                    origin,
                    reason,
                } => keep_everything |= file.reject(object, origin, &reason),
            }
        }
        if keep_everything {
            let old: Vec<ObjectRef> = file.old_refs.iter().cloned().collect();
            old.into_iter().for_each(|r| file.keep(r));
        }
        self.forget_missing(&mut file);
        if file.new_refs.is_empty() {
            self.files.remove(path);
        } else {
            self.files.insert(path.to_owned(), file.new_refs);
        }
        file.events
    }

    /// One valid object of the file: record its definition, emit it if it is (now)
    /// the effective one.
    fn apply_object(&mut self, file: &mut FileUpdate<'_>, object: Object, origin: String) {
        let r = object.object_ref();
        if file.new_refs.contains(&r) {
            warn!(origin, object = %r, "object defined twice in one file; the later one wins");
        }
        file.keep(r.clone());
        let before = self.effective(&r);
        let definition = Definition {
            fingerprint: fingerprint(&object),
            origin: origin.clone(),
        };
        let defs = self.defs.entry(r.clone()).or_default();
        defs.insert(file.path.to_owned(), definition);
        if defs.len() > 1 {
            warn!(object = %r, "object defined in several files; the first file by name wins");
        }
        file.current.insert(r.clone(), (object, origin));
        self.emit_if_changed(&r, before, file);
    }

    /// Objects the file defined before and no longer does: another file's definition
    /// takes over, or the object is deleted.
    fn forget_missing(&mut self, file: &mut FileUpdate<'_>) {
        let gone: Vec<ObjectRef> = file
            .old_refs
            .iter()
            .filter(|r| !file.new_refs.contains(r))
            .cloned()
            .collect();
        for r in gone {
            let before = self.effective(&r);
            if let Some(defs) = self.defs.get_mut(&r) {
                defs.remove(file.path);
                if defs.is_empty() {
                    self.defs.remove(&r);
                }
            }
            self.emit_if_changed(&r, before, file);
        }
    }

    /// The winning file and fingerprint of an object.
    fn effective(&self, r: &ObjectRef) -> Option<(PathBuf, u64)> {
        self.defs
            .get(r)
            .and_then(|d| d.iter().next())
            .map(|(path, def)| (path.clone(), def.fingerprint))
    }

    /// Emits what changed for `r` since its effective definition was `before`.
    fn emit_if_changed(
        &self,
        r: &ObjectRef,
        before: Option<(PathBuf, u64)>,
        file: &mut FileUpdate<'_>,
    ) {
        let events = &mut file.events;
        let after = self.effective(r);
        match (before, after) {
            (Some((_, old)), Some((_, new))) if old == new => {}
            (_, Some((winner, _))) => {
                let found = if winner == file.path {
                    file.current.remove(r)
                } else {
                    // Another file's definition takes over: read it back.
                    load_object(&winner, r)
                };
                match found {
                    Some((object, origin)) => events.push(SourceEvent::Apply { object, origin }),
                    None => {
                        warn!(object = %r, file = %winner.display(), "definition vanished while switching files")
                    }
                }
            }
            (Some(_), None) => events.push(SourceEvent::Delete(r.clone())),
            (None, None) => {}
        }
    }
}

/// One file being re-applied: what it defined before, what it defines now, and the
/// events that causes.
struct FileUpdate<'a> {
    path: &'a Path,
    old_refs: HashSet<ObjectRef>,
    new_refs: Vec<ObjectRef>,
    /// This file's objects, in case they become the effective definition.
    current: HashMap<ObjectRef, (Object, String)>,
    events: Vec<SourceEvent>,
}

impl FileUpdate<'_> {
    /// The file (still) defines `r`.
    fn keep(&mut self, r: ObjectRef) {
        if !self.new_refs.contains(&r) {
            self.new_refs.push(r);
        }
    }

    /// An invalid document: logged and counted; the last good version of the object it
    /// names stays. Returns true when it names no object, so nothing the file defined
    /// may be dropped.
    fn reject(&mut self, object: Option<ObjectRef>, origin: String, reason: &str) -> bool {
        let shown = object
            .as_ref()
            .map(|o| o.to_string())
            .unwrap_or_else(|| "unidentified object".into());
        warn!(
            origin,
            object = shown,
            reason,
            "skipping invalid document; what it defined before stays in effect"
        );
        self.events.push(SourceEvent::Rejected {
            kind: object.as_ref().map(|o| o.kind),
            origin,
        });
        match object {
            Some(r) if self.old_refs.contains(&r) => {
                self.keep(r);
                false
            }
            Some(_) => false,
            None => true,
        }
    }
}

/// Largest manifest file read (a bound on the memory one file can take; a file
/// still growing past it is skipped until it is rewritten smaller).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Reads and parses one file; a missing file has no documents.
fn read_documents(path: &Path) -> std::io::Result<Vec<Document>> {
    match read_manifest_file(path) {
        Ok(bytes) => Ok(parse_manifests(
            &path.display().to_string(),
            &String::from_utf8_lossy(&bytes),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// A manifest file's bytes, if it is a regular file of at most [`MAX_FILE_BYTES`]:
/// FIFOs, sockets and devices (also behind symlinks) are refused before they are
/// opened, and opened without blocking in case one is swapped in meanwhile, so no
/// file can stall the watcher or make it read forever.
fn read_manifest_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let regular = |meta: &std::fs::Metadata| -> std::io::Result<()> {
        if !meta.is_file() {
            return Err(std::io::Error::other(
                "not a regular file (FIFO, socket or device)",
            ));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(std::io::Error::other(format!(
                "larger than {} MiB",
                MAX_FILE_BYTES >> 20
            )));
        }
        Ok(())
    };
    regular(&std::fs::metadata(path)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    regular(&file.metadata()?)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other("grew past the size limit while read"));
    }
    Ok(bytes)
}

/// One object's definition in a file, read back.
fn load_object(path: &Path, r: &ObjectRef) -> Option<(Object, String)> {
    read_documents(path)
        .ok()?
        .into_iter()
        .rev()
        .find_map(|doc| match doc {
            Document::Object { object, origin } if object.object_ref() == *r => {
                Some((object, origin))
            }
            _ => None,
        })
}

/// Whether a path is a manifest file by its extension.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) && !path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Modification stamp used by the periodic rescan.
type Stamp = (Option<SystemTime>, u64);

fn list_manifests(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, Stamp>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if !is_manifest(&path) {
            continue;
        }
        // Entries that are not readable files are listed too, so loading them fails
        // once with a log line naming them (and again only when they change).
        let stamp = std::fs::metadata(&path)
            .map(|meta| (meta.modified().ok(), meta.len()))
            .unwrap_or((None, 0));
        out.insert(path, stamp);
    }
    Ok(out)
}

/// Starts watching `dir` on a thread of its own: sends everything the directory
/// defines, then [`SourceEvent::Synced`], then changes as files change. Fails only if
/// the directory cannot be read or watched at start.
pub fn spawn(dir: PathBuf, tx: EventSender) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use anyhow::Context as _;
    let stamps = list_manifests(&dir)
        .with_context(|| format!("cannot read manifest directory {}", dir.display()))?;
    let (raw_tx, raw_rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |event| {
        // The receiver only goes away when the agent shuts down.
        let _ = raw_tx.send(event);
    })
    .context("cannot create file watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;

    let mut state = ManifestState::default();
    // Stream the initial objects: the proxy loop folds them in while later files parse.
    let mut objects = 0usize;
    for path in stamps.keys() {
        for event in state.reload(path) {
            objects += usize::from(matches!(event, SourceEvent::Apply { .. }));
            if tx.send(event).is_err() {
                anyhow::bail!("agent stopped during start-up");
            }
        }
    }
    info!(dir = ?dir, files = stamps.len(), objects, "loaded manifests");
    tx.send(SourceEvent::Synced).ok();

    let watch = DirectoryWatch {
        dir,
        stamps,
        state,
        raw_rx,
        tx,
        watcher,
        present: true,
        unsettled: false,
    };
    std::thread::Builder::new()
        .name("manifests".into())
        .spawn(move || watch.run())
        .context("cannot start manifest watcher thread")
}

/// How long a missing file must stay missing, with its directory still there,
/// before it counts as deleted.
const DELETE_CONFIRM: Duration = Duration::from_millis(100);
/// While the directory is gone, or a changed file has not settled, how often to
/// look again.
const QUICK_RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// A file the rescan finds changed is read only once it has not been modified for
/// this long: one still being written is read when its writer closes it (or at a
/// later rescan), never half.
const SETTLE: Duration = Duration::from_secs(1);

/// The watcher thread's state: file change notifications in, source events out.
struct DirectoryWatch {
    dir: PathBuf,
    stamps: BTreeMap<PathBuf, Stamp>,
    state: ManifestState,
    raw_rx: Receiver<notify::Result<notify::Event>>,
    tx: EventSender,
    watcher: notify::RecommendedWatcher,
    /// Whether the directory exists. While it does not, that is a source outage:
    /// what it defined stays (as through an API server outage), nothing is deleted.
    present: bool,
    /// The last rescan found a changed file that had not settled yet.
    unsettled: bool,
}

impl DirectoryWatch {
    /// Until the agent hangs up: gathers changed paths (notifications, debounced, and a
    /// periodic rescan that catches what notifications miss) and reloads them.
    fn run(mut self) {
        let mut last_rescan = std::time::Instant::now();
        loop {
            let mut changed: HashSet<PathBuf> = HashSet::new();
            let mut dir_event = false;
            let interval = if self.present && !self.unsettled {
                RESCAN_INTERVAL
            } else {
                QUICK_RESCAN_INTERVAL
            };
            match self.raw_rx.recv_timeout(interval) {
                Ok(event) => dir_event |= collect_paths(&self.dir, event, &mut changed),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Debounce: gather the rest of a burst.
            while let Ok(event) = self.raw_rx.recv_timeout(DEBOUNCE) {
                dir_event |= collect_paths(&self.dir, event, &mut changed);
            }
            if dir_event || last_rescan.elapsed() >= interval {
                last_rescan = std::time::Instant::now();
                self.rescan(&mut changed);
            }
            let mut paths: Vec<PathBuf> = changed.into_iter().collect();
            paths.sort();
            if paths.iter().any(|p| !p.exists()) {
                // `rm -r` of the directory removes its files first: look again a
                // little later before taking a missing file for a deleted one.
                std::thread::sleep(DELETE_CONFIRM);
                if !self.dir.is_dir() {
                    self.lost();
                }
            }
            if !self.present {
                continue;
            }
            if !paths.iter().all(|path| self.reload(path)) {
                return;
            }
        }
    }

    /// Adds the files whose size or modification time changed (and then settled),
    /// appeared or vanished; notices the directory going away and coming back.
    fn rescan(&mut self, changed: &mut HashSet<PathBuf>) {
        let now = match list_manifests(&self.dir) {
            Ok(now) => now,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::NotFound || !self.dir.is_dir() {
                    self.lost();
                } else {
                    warn!(dir = ?self.dir, error = %e, "cannot rescan manifest directory");
                }
                return;
            }
        };
        if !self.present {
            self.back();
        }
        let settled = |stamp: &Stamp| {
            stamp
                .0
                .and_then(|modified| modified.elapsed().ok())
                .is_none_or(|age| age >= SETTLE)
        };
        self.unsettled = false;
        for (path, stamp) in &now {
            if self.stamps.get(path) == Some(stamp) {
                continue;
            }
            if settled(stamp) {
                changed.insert(path.clone());
            } else {
                self.unsettled = true;
            }
        }
        let gone = self.stamps.keys().filter(|p| !now.contains_key(*p));
        changed.extend(gone.cloned());
    }

    /// The directory is gone: keep everything until it is back.
    fn lost(&mut self) {
        if self.present {
            warn!(dir = ?self.dir, "manifest directory is gone; keeping what it defined until it is back (a source outage)");
            self.present = false;
        }
    }

    /// The directory is back: watch it again (the old watch went with it).
    fn back(&mut self) {
        info!(dir = ?self.dir, "manifest directory is back");
        self.present = true;
        let _ = self.watcher.unwatch(&self.dir);
        if let Err(e) = self.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
            warn!(dir = ?self.dir, error = %e, "cannot watch the manifest directory again; changes are found by the rescan only");
        }
    }

    /// Reloads one file and sends what changed; false once the agent has hung up.
    fn reload(&mut self, path: &Path) -> bool {
        debug!(file = ?path, "manifest file changed");
        match std::fs::metadata(path) {
            Ok(meta) => {
                self.stamps
                    .insert(path.to_owned(), (meta.modified().ok(), meta.len()));
            }
            Err(_) if !self.dir.is_dir() => {
                // Not deleted: the whole directory went away.
                self.lost();
                return true;
            }
            Err(_) => {
                self.stamps.remove(path);
            }
        }
        self.state
            .reload(path)
            .into_iter()
            .all(|event| self.tx.send(event).is_ok())
    }
}

/// Adds the manifest files an event says were written (closed after writing),
/// renamed or removed; writes still under way are left for the close. Returns
/// whether the event concerns the directory itself (removed, moved).
fn collect_paths(
    dir: &Path,
    event: notify::Result<notify::Event>,
    out: &mut HashSet<PathBuf>,
) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let event = match event {
        Ok(event) => event,
        Err(e) => {
            warn!(error = %e, "file watch error");
            return false;
        }
    };
    let complete = matches!(
        event.kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
            | EventKind::Any
            | EventKind::Other
    );
    let mut about_dir = false;
    for path in event.paths {
        if path == dir {
            about_dir = true;
        } else if complete && path.parent() == Some(dir) && is_manifest(&path) {
            out.insert(path);
        }
    }
    about_dir
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";

    fn kinds(docs: &[Document]) -> Vec<&'static str> {
        docs.iter()
            .map(|d| match d {
                Document::Object { .. } => "object",
                Document::Irrelevant { .. } => "irrelevant",
                Document::Invalid { .. } => "invalid",
            })
            .collect()
    }

    #[test]
    fn multi_document_with_a_broken_one_in_the_middle() {
        let text = format!(
            "{SVC}---\nkind: [unclosed\n---\n# only a comment\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n{}",
            SVC.replace("web", "api")
        );
        let docs = parse_manifests("f.yaml", &text);
        assert_eq!(kinds(&docs), ["object", "invalid", "irrelevant", "object"]);
        match &docs[1] {
            Document::Invalid { origin, object, .. } => {
                assert_eq!(origin, "f.yaml#2");
                assert!(object.is_none());
            }
            other => panic!("{other:?}"),
        }
        match &docs[3] {
            Document::Object { origin, .. } => assert_eq!(origin, "f.yaml#5"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lists_and_json() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"10.0.0.1"}},
            {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"a-1","labels":{"kubernetes.io/service-name":"a"}},"addressType":"IPv4","endpoints":[]}
        ]}"#;
        let docs = parse_manifests("l.json", json);
        assert_eq!(kinds(&docs), ["object", "object"]);
        match &docs[1] {
            Document::Object { origin, object } => {
                assert_eq!(origin, "l.json#1 items[1]");
                assert_eq!(object.object_ref().to_string(), "EndpointSlice default/a-1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn schema_errors_name_the_object() {
        let docs = parse_manifests(
            "f.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}",
        );
        match &docs[0] {
            Document::Invalid { object, reason, .. } => {
                assert_eq!(object.as_ref().unwrap().to_string(), "Service default/web");
                assert!(reason.contains("schema"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let docs = parse_manifests(
            "f.yaml",
            "apiVersion: v2\nkind: Service\nmetadata: {name: web}",
        );
        assert_eq!(kinds(&docs), ["invalid"]);
    }

    fn applies(events: &[SourceEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                SourceEvent::Apply { object, .. } => format!("apply {}", object.object_ref()),
                SourceEvent::Delete(r) => format!("delete {r}"),
                SourceEvent::Rejected { origin, .. } => format!("rejected {origin}"),
                SourceEvent::Synced => "synced".into(),
                SourceEvent::HostAddresses(_) => "host addresses".into(),
                SourceEvent::Question(_) => "question".into(),
            })
            .collect()
    }

    #[test]
    fn file_edits_become_object_changes() {
        let mut st = ManifestState::default();
        let path = Path::new("/m/a.yaml");
        let ev = st.apply_documents(path, parse_manifests("a", SVC));
        assert_eq!(applies(&ev), ["apply Service shop/web"]);
        // Same content: nothing.
        let ev = st.apply_documents(path, parse_manifests("a", SVC));
        assert!(ev.is_empty());
        // Edited: apply again.
        let ev = st.apply_documents(path, parse_manifests("a", &SVC.replace("80}", "81}")));
        assert_eq!(applies(&ev), ["apply Service shop/web"]);
        // Deleted file: delete.
        let ev = st.apply_documents(path, Vec::new());
        assert_eq!(applies(&ev), ["delete Service shop/web"]);
    }

    #[test]
    fn invalid_edit_keeps_last_good_version() {
        let mut st = ManifestState::default();
        let path = Path::new("/m/a.yaml");
        st.apply_documents(path, parse_manifests("a", SVC));
        // The document still names the object but no longer fits the schema.
        let broken = SVC.replace("{port: 80}", "{port: eighty}");
        let ev = st.apply_documents(path, parse_manifests("a", &broken));
        assert_eq!(applies(&ev), ["rejected a#1"]);
        // Totally unparseable file: nothing is deleted either.
        let ev = st.apply_documents(path, parse_manifests("a", "kind: [\n"));
        assert_eq!(applies(&ev), ["rejected a#1"]);
        // Fixed: the new version is applied.
        let ev = st.apply_documents(path, parse_manifests("a", &SVC.replace("80}", "82}")));
        assert_eq!(applies(&ev), ["apply Service shop/web"]);
    }

    #[test]
    fn duplicate_definitions_fall_back_to_the_other_file() {
        let dir = std::env::temp_dir().join(format!("ferry-manifests-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.yaml");
        let b = dir.join("b.yaml");
        let b_text = SVC.replace("80}", "81}");
        std::fs::write(&b, &b_text).unwrap();
        std::fs::write(&a, SVC).unwrap();
        let mut st = ManifestState::default();
        st.reload(&b);
        let ev = st.reload(&a);
        assert_eq!(
            applies(&ev),
            ["apply Service shop/web"],
            "a.yaml sorts first and wins"
        );
        std::fs::remove_file(&a).unwrap();
        let ev = st.reload(&a);
        assert_eq!(
            applies(&ev),
            ["apply Service shop/web"],
            "b.yaml's version takes over"
        );
        match &ev[0] {
            SourceEvent::Apply {
                object: Object::Service(svc),
                ..
            } => {
                assert_eq!(
                    svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
                    81
                );
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let b = b.as_path();
        let ev = st.apply_documents(b, Vec::new());
        assert_eq!(applies(&ev), ["delete Service shop/web"]);
    }

    #[test]
    fn watched_extensions() {
        assert!(is_manifest(Path::new("/d/x.yaml")));
        assert!(is_manifest(Path::new("/d/x.json")));
        assert!(!is_manifest(Path::new("/d/x.yaml.swp")));
        assert!(!is_manifest(Path::new("/d/.x.yaml")));
        assert!(!is_manifest(Path::new("/d/README.md")));
    }

    #[test]
    fn byte_order_mark_and_crlf_line_ends_are_accepted() {
        let text = format!("\u{feff}{SVC}---\n{}", SVC.replace("web", "api")).replace('\n', "\r\n");
        let docs = parse_manifests("f.yaml", &text);
        assert_eq!(kinds(&docs), ["object", "object"], "{docs:?}");
    }

    #[test]
    fn an_alias_bomb_is_refused_not_expanded() {
        let mut bomb = String::from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: b}\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
        );
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let docs = parse_manifests("bomb.yaml", &bomb);
        assert_eq!(kinds(&docs), ["invalid"], "{docs:?}");
    }

    /// A scratch directory for file-type tests, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = Scratch::new("file-kinds");
        let path = |name: &str| dir.0.join(name);
        std::fs::write(path("ok.yaml"), SVC).unwrap();
        assert_eq!(
            read_manifest_file(&path("ok.yaml")).unwrap(),
            SVC.as_bytes()
        );
        // A FIFO would block a reader until someone writes to it.
        nix::unistd::mkfifo(&path("fifo.yaml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink("/dev/zero", path("zero.yaml")).unwrap();
        std::os::unix::fs::symlink(path("loop.yaml"), path("loop.yaml")).unwrap();
        // Sparse: refused by its size, without reading it.
        let big = std::fs::File::create(path("big.yaml")).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        for name in ["fifo.yaml", "zero.yaml", "loop.yaml", "big.yaml"] {
            assert!(read_manifest_file(&path(name)).is_err(), "{name}");
        }
        let listed = list_manifests(&dir.0).unwrap();
        assert_eq!(
            listed.len(),
            5,
            "all listed, so each is reported: {listed:?}"
        );
    }

    #[test]
    fn only_finished_writes_renames_and_removals_are_reloaded() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind,
            RenameMode,
        };
        let dir = Path::new("/m");
        let paths = |kind: EventKind, path: &str| {
            let mut out = HashSet::new();
            let event = notify::Event::new(kind).add_path(PathBuf::from(path));
            let about_dir = collect_paths(dir, Ok(event), &mut out);
            (out.len(), about_dir)
        };
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(paths(written, "/m/a.yaml"), (1, false));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(paths(renamed, "/m/a.yaml"), (1, false));
        assert_eq!(
            paths(EventKind::Remove(RemoveKind::File), "/m/a.yaml"),
            (1, false)
        );
        let writing = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(
            paths(writing, "/m/a.yaml"),
            (0, false),
            "still being written"
        );
        assert_eq!(
            paths(EventKind::Create(CreateKind::File), "/m/a.yaml"),
            (0, false)
        );
        assert_eq!(paths(written, "/m/a.txt"), (0, false), "not a manifest");
        assert_eq!(
            paths(EventKind::Remove(RemoveKind::Folder), "/m"),
            (0, true)
        );
    }
}
