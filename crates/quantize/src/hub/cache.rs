//! The huggingface_hub cache layout, so a repo downloaded by either tool is reused by the other:
//!
//! ```text
//! <cache>/models--ORG--NAME/
//!     blobs/<etag>                     file contents (etag = git sha1, or sha256 for LFS files)
//!     blobs/<etag>.incomplete          a download in progress, resumed from its length
//!     refs/<revision>                  the commit sha a branch or tag pointed to
//!     snapshots/<commit>/<file>        relative symlink to ../../blobs/<etag>
//! ```
//! (huggingface_hub `file_download.py`: `_hf_hub_download_to_cache_dir`, `_create_symlink`,
//! `_cache_commit_hash_for_specific_revision`; the `.incomplete` suffix is theirs too.)

use std::path::{Path, PathBuf};

use super::error::HubError;

/// Whether `s` is a full commit sha (huggingface_hub's `REGEX_COMMIT_HASH`).
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// True for an LFS etag: the blob's sha256 in lower-case hex (a git etag is 40 hex digits).
pub(crate) fn is_sha256_etag(etag: &str) -> bool {
    etag.len() == 64
        && etag
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The sha256 of `file`, a file of the hub snapshot folder `snapshot_dir`
/// (`<repo>/snapshots/<commit>`), when it is a symlink to an LFS blob of the same repo
/// (`<repo>/blobs/<sha256>`): the blob's name. Blobs named by a sha256 enter `blobs/` only after
/// the downloaded bytes hashed to that name (see `download.rs`), so the converter need not read
/// them again to hash them. `None` for anything else: a plain file, a git blob (named by its
/// sha1), a link that leads elsewhere, a folder that is not a snapshot.
pub fn lfs_blob_sha256(snapshot_dir: &Path, file: &Path) -> Option<String> {
    let meta = std::fs::symlink_metadata(file).ok()?;
    if !meta.file_type().is_symlink() {
        return None;
    }
    let snapshots = snapshot_dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let blobs = std::fs::canonicalize(snapshots.parent()?.join("blobs")).ok()?;
    let target = std::fs::canonicalize(file).ok()?;
    let name = target.file_name()?.to_str()?;
    (target.parent()? == blobs && is_sha256_etag(name) && target.is_file())
        .then(|| name.to_string())
}

/// One repo's folder inside the hub cache.
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    /// The folder of `repo` (its hf-hub `folder_name`, e.g. `models--ORG--NAME`) under `cache_dir`.
    pub(crate) fn new(cache_dir: &Path, repo: &hf_hub::Repo) -> Self {
        RepoCache {
            root: cache_dir.join(repo.folder_name()),
        }
    }

    #[cfg(test)]
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub(crate) fn incomplete_path(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub(crate) fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// `snapshots/<commit>/<file>`, with the repo's `/` separators as path components.
    pub(crate) fn pointer_path(&self, commit: &str, file: &str) -> PathBuf {
        let mut p = self.snapshot_dir(commit);
        p.extend(file.split('/'));
        p
    }

    fn ref_path(&self, revision: &str) -> PathBuf {
        let mut p = self.root.join("refs");
        // A revision like `refs/pr/1` becomes nested folders, as in huggingface_hub.
        p.extend(revision.split('/'));
        p
    }

    /// The commit a branch or tag pointed to at the last download, if recorded.
    pub(crate) fn read_ref(&self, revision: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.ref_path(revision)).ok()?;
        let s = s.trim();
        is_commit_hash(s).then(|| s.to_string())
    }

    /// Records `revision -> commit` (not for a revision that is itself the commit).
    pub(crate) fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit {
            return Ok(());
        }
        if self.read_ref(revision).as_deref() == Some(commit) {
            return Ok(());
        }
        let path = self.ref_path(revision);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
        }
        // Write then rename, so a reader never sees a half-written sha.
        let tmp = path.with_extension("tmp-mimo");
        std::fs::write(&tmp, commit).map_err(|e| HubError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| HubError::io(&path, e))
    }

    /// The commit to use for `revision` without network: the revision itself when it is a sha
    /// with a snapshot, else the recorded ref. `Err` says what is missing.
    pub(crate) fn resolve_offline(&self, revision: &str) -> Result<String, String> {
        if is_commit_hash(revision) {
            if self.snapshot_dir(revision).is_dir() {
                return Ok(revision.to_string());
            }
            return Err(format!(
                "snapshot {}",
                self.snapshot_dir(revision).display()
            ));
        }
        match self.read_ref(revision) {
            Some(c) if self.snapshot_dir(&c).is_dir() => Ok(c),
            Some(c) => Err(format!("snapshot {}", self.snapshot_dir(&c).display())),
            None => Err(format!(
                "{} (the repo was never downloaded at this revision)",
                self.ref_path(revision).display()
            )),
        }
    }

    /// The snapshot file when it is there and its blob too (a dangling link counts as missing).
    pub(crate) fn cached_file(&self, commit: &str, file: &str) -> Option<PathBuf> {
        let p = self.pointer_path(commit, file);
        // `metadata` follows the symlink, so this also checks the blob.
        std::fs::metadata(&p).ok()?.is_file().then_some(p)
    }

    /// Every file of a snapshot, as repo paths with `/`, sorted.
    pub(crate) fn list_snapshot(&self, commit: &str) -> Vec<String> {
        let mut out = Vec::new();
        let base = self.snapshot_dir(commit);
        let mut stack = vec![base.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in rd.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&base) {
                    let parts: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    out.push(parts.join("/"));
                }
            }
        }
        out.sort();
        out
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative symlink (a copy where
    /// symlinks are unsupported), replacing whatever was there.
    pub(crate) fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf, HubError> {
        let pointer = self.pointer_path(commit, file);
        let dir = pointer.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| HubError::io(&dir, e))?;
        if std::fs::symlink_metadata(&pointer).is_ok() {
            std::fs::remove_file(&pointer).map_err(|e| HubError::io(&pointer, e))?;
        }
        // From snapshots/<commit>/<a>/<b>/file up to the repo folder: 2 + (depth of file) levels.
        let depth = 2 + file.matches('/').count();
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        make_link(&target, &self.blob_path(etag), &pointer)?;
        Ok(pointer)
    }
}

#[cfg(unix)]
fn make_link(relative_target: &Path, _blob: &Path, pointer: &Path) -> Result<(), HubError> {
    std::os::unix::fs::symlink(relative_target, pointer).map_err(|e| HubError::io(pointer, e))
}

#[cfg(not(unix))]
fn make_link(_relative_target: &Path, blob: &Path, pointer: &Path) -> Result<(), HubError> {
    // huggingface_hub copies too when symlinks are not available (Windows without developer mode).
    std::fs::copy(blob, pointer)
        .map(|_| ())
        .map_err(|e| HubError::io(pointer, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a snapshot link into the same repo's `blobs/` with a sha256 name gives a hash.
    #[cfg(unix)]
    #[test]
    fn lfs_blob_hash_only_for_snapshot_links_to_sha256_blobs() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--o--n");
        let snap = repo.join("snapshots/c0");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        let sha = "0f".repeat(32);
        let sha1 = "1e".repeat(20);
        for name in [&sha, &sha1] {
            std::fs::write(repo.join("blobs").join(name), b"x").unwrap();
        }
        std::fs::write(tmp.path().join(&sha), b"x").unwrap();
        symlink(
            Path::new("../../blobs").join(&sha),
            snap.join("a.safetensors"),
        )
        .unwrap();
        symlink(Path::new("../../blobs").join(&sha1), snap.join("b.json")).unwrap();
        symlink(tmp.path().join(&sha), snap.join("c.safetensors")).unwrap();
        std::fs::write(snap.join("d.safetensors"), b"x").unwrap();
        assert_eq!(
            lfs_blob_sha256(&snap, &snap.join("a.safetensors")),
            Some(sha.clone())
        );
        assert_eq!(lfs_blob_sha256(&snap, &snap.join("b.json")), None);
        assert_eq!(lfs_blob_sha256(&snap, &snap.join("c.safetensors")), None);
        assert_eq!(lfs_blob_sha256(&snap, &snap.join("d.safetensors")), None);
        // The same link in a folder that is not `snapshots/<commit>`.
        let other = tmp.path().join("x/y");
        std::fs::create_dir_all(&other).unwrap();
        symlink(repo.join("blobs").join(&sha), other.join("a.safetensors")).unwrap();
        assert_eq!(lfs_blob_sha256(&other, &other.join("a.safetensors")), None);
    }

    #[test]
    fn layout_names_match_huggingface_hub() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = hf_hub::Repo::model("Org/Name".to_string());
        let c = RepoCache::new(tmp.path(), &repo);
        assert_eq!(c.root(), tmp.path().join("models--Org--Name"));
        let ds = RepoCache::new(tmp.path(), &hf_hub::Repo::dataset("a/b".to_string()));
        assert_eq!(ds.root(), tmp.path().join("datasets--a--b"));
        assert_eq!(
            c.pointer_path("c0", "sub/f.json"),
            tmp.path().join("models--Org--Name/snapshots/c0/sub/f.json")
        );
    }

    #[test]
    fn refs_links_and_offline_resolution() {
        let tmp = tempfile::tempdir().unwrap();
        let c = RepoCache::new(tmp.path(), &hf_hub::Repo::model("o/n".to_string()));
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert!(c.resolve_offline("main").is_err());
        assert!(c.resolve_offline(sha).is_err());
        std::fs::create_dir_all(c.blob_path("e1").parent().unwrap()).unwrap();
        std::fs::write(c.blob_path("e1"), b"hello").unwrap();
        let p = c.link(sha, "d/x.txt", "e1").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        #[cfg(unix)]
        assert_eq!(
            std::fs::read_link(&p).unwrap(),
            Path::new("../../../blobs/e1")
        );
        c.write_ref("refs/pr/1", sha).unwrap();
        c.write_ref(sha, sha).unwrap();
        assert!(!c.root().join("refs").join(sha).exists());
        assert_eq!(c.read_ref("refs/pr/1").as_deref(), Some(sha));
        assert_eq!(c.resolve_offline("refs/pr/1").unwrap(), sha);
        assert_eq!(c.resolve_offline(sha).unwrap(), sha);
        assert_eq!(c.list_snapshot(sha), vec!["d/x.txt"]);
        assert!(c.cached_file(sha, "d/x.txt").is_some());
        std::fs::remove_file(c.blob_path("e1")).unwrap();
        assert!(c.cached_file(sha, "d/x.txt").is_none(), "dangling link");
        assert!(!is_commit_hash("main"));
        assert!(!is_commit_hash(&sha.to_uppercase()));
    }
}
