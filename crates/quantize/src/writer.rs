//! Writing the output folder: shard planning, safetensors shards with a running sha256 (written
//! with `O_DIRECT` where the filesystem allows it, module `direct`, else buffered with early
//! writeback), the index, side files (tokenizer, generation config, remote code), and atomicity
//! (everything goes into a temporary sibling folder renamed into place at the end; dropped
//! unfinished, it is deleted).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use mimo_runtime::checkpoint::{header_bytes, HeaderEntry, INDEX_FILE, SINGLE_FILE};
use sha2::{Digest, Sha256};

use crate::manifest::FileHash;

#[cfg(unix)]
mod direct;

/// Why the output cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The output exists and --force was not given.
    #[error("{0}: output already exists (use --force to replace it)")]
    Exists(PathBuf),
    /// The output path has no parent folder or file name.
    #[error("{0}: not a usable output folder path")]
    BadPath(PathBuf),
    /// A file operation failed (the OS error is the source, printed once by `{:#}`).
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Data handed to a shard does not match its header entry (a bug, reported instead of writing a corrupt file).
    #[error("{path}: tensor '{tensor}' has {actual} bytes, its header entry says {expected}")]
    SizeMismatch {
        path: PathBuf,
        tensor: String,
        expected: u64,
        actual: u64,
    },
}

/// Maps an I/O error on `path` to [`WriteError::Io`] naming it (for `map_err`).
pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary sibling (`path` with `.tmp` appended), fsynced
/// and then renamed, so that a reader never sees a half-written file; the temporary file is
/// removed when a step fails.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    let tmp = PathBuf::from(name);
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A temporary sibling of the final output folder, removed on drop unless committed.
#[derive(Debug)]
pub struct TempOutput {
    tmp: PathBuf,
    target: PathBuf,
    force: bool,
    done: bool,
    removed: Vec<String>,
    adopted: Option<PathBuf>,
}

/// True when `pid` is a live process; without /proc (not Linux) every pid counts as live, so
/// nothing is removed.
fn pid_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// Removes `.<name>.mimo-quant-tmp-<pid>` folders in `parent` whose pid is not a live process
/// (left by a run killed with SIGKILL) and a `.<name>.old` (left by a kill between the two
/// renames of `commit`). With `adopt`, the most recently modified dead temporary folder is kept
/// and returned instead (for `convert --resume`). Best effort: a folder that cannot be removed
/// is reported and kept.
fn remove_stale(parent: &Path, name: &str, adopt: bool) -> (Vec<String>, Option<PathBuf>) {
    let prefix = format!(".{name}.mimo-quant-tmp-");
    let old = format!(".{name}.old");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return (Vec::new(), None);
    };
    let mut notes = Vec::new();
    // (is a dead temp folder, path)
    let mut stale: Vec<(bool, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let dead_tmp = n
                .strip_prefix(&prefix)
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| pid != std::process::id() && !pid_alive(pid));
            // file_type does not follow links: only real folders, never a link's target.
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            (is_dir && (dead_tmp || n == old)).then(|| (dead_tmp, e.path()))
        })
        .collect();
    stale.sort_by(|a, b| a.1.cmp(&b.1));
    let mut adopted = None;
    if adopt {
        let newest = stale
            .iter()
            .enumerate()
            .filter(|(_, (dead_tmp, _))| *dead_tmp)
            .max_by_key(|(_, (_, p))| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
            })
            .map(|(i, _)| i);
        adopted = newest.map(|i| stale.remove(i).1);
    }
    for (_, p) in stale {
        match std::fs::remove_dir_all(&p) {
            Ok(()) => notes.push(format!(
                "removed {} (left by an interrupted run)",
                p.display()
            )),
            Err(e) => notes.push(format!(
                "cannot remove {} (left by an interrupted run): {e}",
                p.display()
            )),
        }
    }
    (notes, adopted)
}

impl TempOutput {
    /// Creates `.<name>.mimo-quant-tmp-<pid>` next to `target`; refuses an existing `target`
    /// unless `force`. Temporary folders of killed runs are removed.
    pub fn create(target: &Path, force: bool) -> Result<TempOutput, WriteError> {
        Self::create_or_adopt(target, force, false)
    }

    /// [`TempOutput::create`], but with `adopt` the newest temporary folder of a killed run (if
    /// any) is renamed to this run's name and kept with its content, for `convert --resume`;
    /// [`TempOutput::adopted`] then says where it came from. The caller decides what in it may
    /// be reused.
    pub fn create_or_adopt(
        target: &Path,
        force: bool,
        adopt: bool,
    ) -> Result<TempOutput, WriteError> {
        if target.exists() && !force {
            return Err(WriteError::Exists(target.to_path_buf()));
        }
        let name = target
            .file_name()
            .ok_or_else(|| WriteError::BadPath(target.to_path_buf()))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        let name = name.to_string_lossy();
        let (removed, adopted) = remove_stale(&parent, &name, adopt);
        let tmp = parent.join(format!(".{}.mimo-quant-tmp-{}", name, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        match &adopted {
            Some(from) => std::fs::rename(from, &tmp).map_err(io(from))?,
            None => std::fs::create_dir(&tmp).map_err(io(&tmp))?,
        }
        Ok(TempOutput {
            tmp,
            target: target.to_path_buf(),
            force,
            done: false,
            removed,
            adopted,
        })
    }

    /// The killed run's temporary folder that [`TempOutput::create_or_adopt`] took over, if any.
    pub fn adopted(&self) -> Option<&Path> {
        self.adopted.as_deref()
    }

    /// Leftovers of killed runs removed by [`TempOutput::create`], each with a note, for the
    /// caller to report.
    pub fn removed_leftovers(&self) -> &[String] {
        &self.removed
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the temporary folder to the target (replacing an existing one with --force).
    pub fn commit(mut self) -> Result<(), WriteError> {
        if self.target.exists() {
            if !self.force {
                return Err(WriteError::Exists(self.target.clone()));
            }
            // Move the old output aside first so the final rename is a single step.
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.target, &old).map_err(io(&self.target))?;
            std::fs::rename(&self.tmp, &self.target).map_err(io(&self.tmp))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.target).map_err(io(&self.tmp))?;
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Splits items of the given byte sizes, in order, into shards of at most `max` bytes (an item
/// larger than `max` gets a shard of its own). Returns index ranges.
pub fn plan_shards(sizes: &[u64], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut cur) = (0usize, 0u64);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && cur + s > max {
            out.push(start..i);
            start = i;
            cur = 0;
        }
        cur += s;
    }
    if start < sizes.len() || out.is_empty() {
        out.push(start..sizes.len());
    }
    out
}

/// File name of shard `i` (0-based) of `n`.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Bytes written between two requests to start writing the shard back to disk.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Starts the disk write of a shard while it is still being written: a thread that calls
/// `fdatasync` on the file whenever the writer has added [`WRITEBACK_EVERY`] bytes. Without it
/// the kernel keeps the whole shard as dirty pages (its background threshold is a share of RAM)
/// and the final `fsync` waits for the disk to take all of it (measured: 1.9 s of a 4.1 s
/// conversion of a 2 GB source here); with it the disk works while the converter computes, and
/// the final `fsync` only waits for the last part. The final `fsync` is unchanged, so what is
/// guaranteed on disk at the rename is unchanged.
struct Writeback {
    wake: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Writeback {
    fn start(file: &File) -> std::io::Result<Writeback> {
        let file = file.try_clone()?;
        let (wake, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("shard-writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Requests that came while the last sync ran are covered by this one.
                    while rx.try_recv().is_ok() {}
                    file.sync_data()?;
                }
                Ok(())
            })?;
        Ok(Writeback { wake, thread })
    }

    /// Stops the thread; the first error of its syncs, if any.
    fn stop(self) -> std::io::Result<()> {
        drop(self.wake);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writeback thread panicked")))
    }
}

/// Where a shard's bytes go: direct writes where the filesystem takes them, else buffered
/// writes with early writeback.
enum Sink {
    /// `O_DIRECT` through an I/O thread (see [`direct`]).
    #[cfg(unix)]
    Direct(direct::DirectFile),
    /// Buffered writes.
    Buffered {
        out: BufWriter<File>,
        writeback: Option<Writeback>,
        /// Bytes written when the last writeback was requested.
        requested_at: u64,
    },
}

impl Sink {
    /// A direct sink for `path` when `direct` and the filesystem allow it, else a buffered one.
    fn create(path: &Path, direct: bool) -> std::io::Result<Sink> {
        #[cfg(unix)]
        if direct {
            if let Some(d) = direct::DirectFile::create(path) {
                return Ok(Sink::Direct(d));
            }
        }
        let _ = direct;
        let f = File::create(path)?;
        // Early writeback is an optimisation: without a second handle or a thread the shard is
        // still written and synced at the end.
        let writeback = Writeback::start(&f).ok();
        Ok(Sink::Buffered {
            out: BufWriter::with_capacity(8 << 20, f),
            writeback,
            requested_at: 0,
        })
    }

    /// Appends `data`; `total` is the byte count after it.
    fn write(&mut self, data: &[u8], total: u64) -> std::io::Result<()> {
        match self {
            #[cfg(unix)]
            Sink::Direct(d) => d.write(data),
            Sink::Buffered {
                out,
                writeback,
                requested_at,
            } => {
                out.write_all(data)?;
                if total - *requested_at >= WRITEBACK_EVERY {
                    if let Some(wb) = writeback {
                        // A closed channel means the thread stopped on an error; `finish`
                        // reports it.
                        let _ = wb.wake.send(());
                    }
                    *requested_at = total;
                }
                Ok(())
            }
        }
    }

    /// Writes what is left, waits for it, and syncs the file (`len` bytes long).
    fn finish(self, len: u64) -> std::io::Result<()> {
        let file = match self {
            #[cfg(unix)]
            Sink::Direct(d) => d.finish(len)?,
            Sink::Buffered { out, writeback, .. } => {
                let file = out.into_inner().map_err(|e| e.into_error())?;
                if let Some(wb) = writeback {
                    wb.stop()?;
                }
                file
            }
        };
        file.sync_all()
    }
}

/// A safetensors file being written: header first, then each tensor's bytes in header order.
/// It is written as `.<name>.partial` and renamed to its name only once complete and synced, so a
/// file under a shard's name is never a partial one.
pub struct ShardWriter {
    path: PathBuf,
    partial: PathBuf,
    sink: Sink,
    hash: Sha256,
    bytes: u64,
    entries: Vec<HeaderEntry>,
    next: usize,
}

impl ShardWriter {
    /// Creates `path` and writes the header for `entries`.
    pub fn create(path: &Path, entries: Vec<HeaderEntry>) -> Result<ShardWriter, WriteError> {
        Self::create_with(path, entries, true)
    }

    /// [`ShardWriter::create`]; `direct` false forces buffered writes (tests of both sinks).
    fn create_with(
        path: &Path,
        entries: Vec<HeaderEntry>,
        direct: bool,
    ) -> Result<ShardWriter, WriteError> {
        let name = path
            .file_name()
            .ok_or_else(|| WriteError::BadPath(path.to_path_buf()))?;
        let partial = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let sink = Sink::create(&partial, direct).map_err(io(&partial))?;
        let mut w = ShardWriter {
            path: path.to_path_buf(),
            partial,
            sink,
            hash: Sha256::new(),
            bytes: 0,
            entries,
            next: 0,
        };
        let header = header_bytes(&w.entries, &[("format".into(), "pt".into())]);
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, data: &[u8]) -> Result<(), WriteError> {
        self.bytes += data.len() as u64;
        self.sink
            .write(data, self.bytes)
            .map_err(io(&self.partial))?;
        self.hash.update(data);
        Ok(())
    }

    /// Writes the next tensor's bytes (must match the next header entry).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), WriteError> {
        let e = self.entries.get(self.next).cloned();
        match e {
            Some(e) if e.name == name && e.byte_len() == data.len() as u64 => {}
            e => {
                return Err(WriteError::SizeMismatch {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    expected: e.map(|e| e.byte_len()).unwrap_or(0),
                    actual: data.len() as u64,
                })
            }
        }
        self.next += 1;
        self.put(data)
    }

    /// Flushes, syncs, renames the file to its name and returns its hash.
    pub fn finish(self) -> Result<FileHash, WriteError> {
        if self.next != self.entries.len() {
            let missing = self.entries[self.next].clone();
            return Err(WriteError::SizeMismatch {
                path: self.path.clone(),
                expected: missing.byte_len(),
                tensor: missing.name,
                actual: 0,
            });
        }
        self.sink.finish(self.bytes).map_err(io(&self.partial))?;
        std::fs::rename(&self.partial, &self.path).map_err(io(&self.path))?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(FileHash {
            name,
            bytes: self.bytes,
            sha256: hex::encode(self.hash.finalize()),
        })
    }
}

/// Writes `model.safetensors.index.json` for the given shards.
pub fn write_index(dir: &Path, shards: &[(String, Vec<HeaderEntry>)]) -> Result<(), WriteError> {
    let mut map = serde_json::Map::new();
    let mut total = 0u64;
    for (file, entries) in shards {
        for e in entries {
            total += e.byte_len();
            map.insert(e.name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
    write_json(&dir.join(INDEX_FILE), &index)
}

/// Writes pretty JSON with a trailing newline.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), WriteError> {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    std::fs::write(path, text).map_err(io(path))
}

/// Side files copied as they are: tokenizer, generation config, chat template, remote code.
pub fn is_side_file(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "LICENSE",
        "README.md",
    ];
    NAMES.contains(&name) || name.ends_with(".py") || name.ends_with(".tiktoken")
}

/// Copies the side files of `src` into `dst`; returns their names, sorted, and a warning for
/// each one skipped. Only regular files are copied, and a symlink only when it resolves inside
/// `src` or into a hub cache's `blobs/` folder (a snapshot is made of such links): a link to a
/// file elsewhere (a key, a token) must not end up in an output that gets published.
pub fn copy_side_files(src: &Path, dst: &Path) -> Result<(Vec<String>, Vec<String>), WriteError> {
    let mut names = Vec::new();
    let mut warnings = Vec::new();
    let src_real = std::fs::canonicalize(src).map_err(io(src))?;
    for ent in std::fs::read_dir(src).map_err(io(src))? {
        let ent = ent.map_err(io(src))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if !is_side_file(&name) {
            continue;
        }
        let path = ent.path();
        let kind = ent.file_type().map_err(io(&path))?;
        if kind.is_symlink() {
            let resolved = std::fs::canonicalize(&path).ok();
            let allowed = resolved.as_ref().is_some_and(|r| {
                r.is_file() && (r.starts_with(&src_real) || in_hub_blobs(&src_real, r))
            });
            if !allowed {
                warnings.push(format!(
                    "{}: not copied: a symlink to {}, outside the source folder",
                    path.display(),
                    resolved
                        .map(|r| r.display().to_string())
                        .unwrap_or_else(|| "nothing".into())
                ));
                continue;
            }
        } else if !kind.is_file() {
            continue;
        }
        let to = dst.join(&name);
        std::fs::copy(&path, &to).map_err(io(&to))?;
        names.push(name);
    }
    names.sort();
    warnings.sort();
    Ok((names, warnings))
}

/// True when `src` is a hub snapshot (`<repo>/snapshots/<commit>`) and `target` lies in that
/// repo's `blobs/` folder.
fn in_hub_blobs(src: &Path, target: &Path) -> bool {
    let snapshots = src.parent();
    match snapshots.and_then(|s| s.parent()) {
        Some(repo) if snapshots.and_then(|s| s.file_name()) == Some("snapshots".as_ref()) => {
            target.starts_with(repo.join("blobs"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_synced_leaves_the_file_and_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        write_synced(&p, b"one\n").unwrap();
        write_synced(&p, b"two\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two\n");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.jsonl")]);
        // A folder in the way of the rename: the error names the target, nothing is left behind.
        let dir = d.path().join("sub");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("x"), b"").unwrap();
        let e = write_synced(&dir, b"z").unwrap_err();
        assert!(e.to_string().contains("sub"), "{e}");
        assert!(!d.path().join("sub.tmp").exists());
    }

    #[test]
    fn shards_split_in_order() {
        assert_eq!(plan_shards(&[3, 3, 3], 6), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&[10, 1], 5), vec![0..1, 1..2]);
        assert_eq!(plan_shards(&[1, 1], 100), vec![0..2]);
        assert_eq!(plan_shards(&[], 100), vec![0..0]);
        assert_eq!(shard_name(0, 1), "model.safetensors");
        assert_eq!(shard_name(1, 3), "model-00002-of-00003.safetensors");
    }

    #[test]
    fn temp_output_is_removed_unless_committed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out");
        let t = TempOutput::create(&target, false).unwrap();
        let tmp = t.path().to_path_buf();
        std::fs::write(tmp.join("x"), "1").unwrap();
        drop(t);
        assert!(!tmp.exists() && !target.exists());
        let t = TempOutput::create(&target, false).unwrap();
        std::fs::write(t.path().join("x"), "1").unwrap();
        t.commit().unwrap();
        assert!(target.join("x").exists());
        assert!(matches!(
            TempOutput::create(&target, false),
            Err(WriteError::Exists(_))
        ));
        let t = TempOutput::create(&target, true).unwrap();
        std::fs::write(t.path().join("y"), "2").unwrap();
        t.commit().unwrap();
        assert!(target.join("y").exists() && !target.join("x").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    /// Leftovers of killed runs (issue 10, F5): a temp folder of a dead pid and `.out.old` are
    /// removed; a live pid's folder (our parent's) and other names are kept.
    #[test]
    fn stale_leftovers_are_removed_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        // Pid 0 is never a /proc entry; the parent's pid is alive while we run.
        let dead = d.path().join(".out.mimo-quant-tmp-0");
        let live = d.path().join(format!(
            ".out.mimo-quant-tmp-{}",
            std::os::unix::process::parent_id()
        ));
        let old = d.path().join(".out.old");
        let other = d.path().join(".other.mimo-quant-tmp-0");
        for p in [&dead, &live, &old, &other] {
            std::fs::create_dir(p).unwrap();
            std::fs::write(p.join("x"), "1").unwrap();
        }
        let t = TempOutput::create(&d.path().join("out"), false).unwrap();
        assert_eq!(
            t.removed_leftovers().len(),
            2,
            "{:?}",
            t.removed_leftovers()
        );
        assert!(t.removed_leftovers()[0].contains(".out.mimo-quant-tmp-0"));
        assert!(!dead.exists() && !old.exists());
        assert!(live.exists() && other.exists());
    }

    /// `--resume`: the newest dead temp folder is renamed to this run's and keeps its content;
    /// older ones and `.out.old` are removed.
    #[test]
    fn adopt_takes_over_the_newest_dead_temp_folder() {
        let d = tempfile::tempdir().unwrap();
        let older = d.path().join(".out.mimo-quant-tmp-0");
        std::fs::create_dir(&older).unwrap();
        std::fs::write(older.join("a"), "old").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A pid far above pid_max is never alive.
        let newer = d.path().join(".out.mimo-quant-tmp-4294967295");
        std::fs::create_dir(&newer).unwrap();
        std::fs::write(newer.join("a"), "new").unwrap();
        let t = TempOutput::create_or_adopt(&d.path().join("out"), false, true).unwrap();
        assert_eq!(t.adopted(), Some(newer.as_path()));
        assert_eq!(std::fs::read_to_string(t.path().join("a")).unwrap(), "new");
        assert!(!older.exists() && !newer.exists());
        assert_eq!(
            t.removed_leftovers().len(),
            1,
            "{:?}",
            t.removed_leftovers()
        );
        drop(t);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        // Nothing to adopt: a fresh empty folder.
        let t = TempOutput::create_or_adopt(&d.path().join("out"), false, true).unwrap();
        assert!(t.adopted().is_none());
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }

    /// Shards larger than the writeback interval and several direct-write blocks, through
    /// both sinks (direct, and buffered with early writeback), with lengths that are not
    /// multiples of the alignment: the file holds exactly the bytes written, with the hash the
    /// writer reports, and no padding.
    #[test]
    fn shards_hold_the_written_bytes_through_both_sinks() {
        let d = tempfile::tempdir().unwrap();
        let n = (WRITEBACK_EVERY as usize * 5) / 2 + 4097;
        let mut state = 1u32;
        let data: Vec<Vec<u8>> = [n, 13, n + 1]
            .iter()
            .map(|&len| {
                (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (state >> 24) as u8
                    })
                    .collect()
            })
            .collect();
        let entries: Vec<HeaderEntry> = data
            .iter()
            .enumerate()
            .map(|(i, t)| HeaderEntry {
                name: format!("t{i}"),
                dtype: mimo_runtime::checkpoint::DType::U8,
                shape: vec![t.len()],
            })
            .collect();
        let mut hashes = Vec::new();
        for direct in [true, false] {
            let path = d.path().join(format!("{direct}.safetensors"));
            let mut w = ShardWriter::create_with(&path, entries.clone(), direct).unwrap();
            match &w.sink {
                Sink::Buffered { writeback, .. } => {
                    assert!(!direct);
                    assert!(writeback.is_some());
                }
                #[cfg(unix)]
                Sink::Direct(_) => assert!(direct),
            }
            for (i, t) in data.iter().enumerate() {
                w.write_tensor(&format!("t{i}"), t).unwrap();
            }
            if let Sink::Buffered { requested_at, .. } = &w.sink {
                assert!(*requested_at >= 5 * WRITEBACK_EVERY, "{requested_at}");
            }
            let h = w.finish().unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let total: usize = data.iter().map(Vec::len).sum();
            let body = &bytes[bytes.len() - total..];
            assert!(body == data.concat(), "direct {direct}");
            assert_eq!(h, crate::manifest::sha256_file(&path).unwrap());
            assert_eq!(h.bytes, bytes.len() as u64);
            hashes.push(h.sha256);
        }
        assert_eq!(hashes[0], hashes[1]);
    }

    /// A shard is written under a hidden `.partial` name and appears under its own name only
    /// when finished.
    #[test]
    fn shard_appears_under_its_name_only_when_finished() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("model.safetensors");
        let e = HeaderEntry {
            name: "t".into(),
            dtype: mimo_runtime::checkpoint::DType::BF16,
            shape: vec![2],
        };
        let mut w = ShardWriter::create(&path, vec![e]).unwrap();
        w.write_tensor("t", &[1, 2, 3, 4]).unwrap();
        assert!(!path.exists());
        assert!(d.path().join(".model.safetensors.partial").exists());
        let h = w.finish().unwrap();
        assert!(path.exists() && !d.path().join(".model.safetensors.partial").exists());
        assert_eq!(h, crate::manifest::sha256_file(&path).unwrap());
    }
}
