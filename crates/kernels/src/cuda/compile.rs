//! NVRTC compilation of the embedded kernel sources: the sources, the per-process PTX cache and
//! the on-disk one ([`ptx_cache_dir`]), and loading a source's module into a context.

use std::collections::HashMap;
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::error::{drv, CudaError};
use super::trace::{trace_defines, trace_requested};

/// Kernel sources embedded in the binary: (file name, text). The tiled kernels
/// (fp4_tiled.cu), the bulk-copy kernels (fp4_bulk.cu) and the warpgroup kernels
/// (fp4_wgmma.cu) are one compilation unit with fp4_gemm.cu, whose decode they use; so are the
/// folded-norm BF16 product (bf16_gemv.cu).
pub(crate) const FP4_GEMM_SRC: (&str, &str) = (
    "fp4_gemm.cu",
    concat!(
        include_str!("../../cuda/fp4_gemm.cu"),
        "\n#line 1 \"fp4_tiled.cu\"\n",
        include_str!("../../cuda/fp4_tiled.cu"),
        "\n#line 1 \"fp4_bulk.cu\"\n",
        include_str!("../../cuda/fp4_bulk.cu"),
        "\n#line 1 \"bf16_gemv.cu\"\n",
        include_str!("../../cuda/bf16_gemv.cu"),
        "\n#line 1 \"fp4_wgmma.cu\"\n",
        include_str!("../../cuda/fp4_wgmma.cu")
    ),
);
/// The stage-chain probe (cuda/probe/): fp4_gemm.cu's and fp4_bulk.cu's device functions without
/// their kernels (`MIMO_HELPERS_ONLY`), then stage_probe.cu. A program of its own, compiled on
/// the probe's first use, so that the kernels every process compiles do not grow with it.
pub(crate) const STAGE_PROBE_SRC: (&str, &str) = (
    "stage_probe.cu",
    concat!(
        "#define MIMO_HELPERS_ONLY\n#line 1 \"fp4_gemm.cu\"\n",
        include_str!("../../cuda/fp4_gemm.cu"),
        "\n#line 1 \"fp4_bulk.cu\"\n",
        include_str!("../../cuda/fp4_bulk.cu"),
        "\n#line 1 \"stage_probe.cu\"\n",
        include_str!("../../cuda/stage_probe.cu")
    ),
);
/// Definitions every source shares (typedefs, bf16 conversions, mma, pdl_enter): put in front
/// of each source by [`compile_source`].
pub const COMMON_HEADER: &str = include_str!("../../cuda/common.cuh");
/// MoE routing / activation / combine kernels.
pub(crate) const MOE_SRC: (&str, &str) = ("moe.cu", include_str!("../../cuda/moe.cu"));

/// PTX per (file, architecture), compiled once per process.
fn ptx_cache() -> &'static Mutex<HashMap<(&'static str, String), String>> {
    static CACHE: OnceLock<Mutex<HashMap<(&'static str, String), String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether the NVRTC library can be loaded (it is looked up at run time).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one embedded source for `arch` (e.g. "sm_90a") with NVRTC, [`COMMON_HEADER`] in
/// front of it, or returns the PTX compiled earlier in this process or kept on disk by an
/// earlier one ([`ptx_cache_dir`]). Traced (decode timeline, trace.rs) where the process
/// started with `MIMO_TRACE=1`.
pub fn compile_source(file: &'static str, src: &str, arch: &str) -> Result<String, CudaError> {
    compile_source_from(file, src, arch).map(|(text, _)| text)
}

/// [`compile_source`], also saying where the text came from: the disk entry it was read from
/// (None where it was compiled here or came from this process's memory).
fn compile_source_from(
    file: &'static str,
    src: &str,
    arch: &str,
) -> Result<(String, Option<PathBuf>), CudaError> {
    let key = (file, arch.to_string());
    if let Some(p) = ptx_cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok((p, None));
    }
    let traced = trace_requested();
    let path = disk_cache_path(file, src, arch, traced);
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        if let Ok(mut c) = ptx_cache().lock() {
            c.insert(key, text.clone());
        }
        return Ok((text, path));
    }
    let text = compile_and_keep(file, src, arch, traced, path.as_deref())?;
    Ok((text, None))
}

/// Compiles `file` and keeps its PTX for later: in this process's memory, and at `path` (a
/// disk cache entry) where given.
fn compile_and_keep(
    file: &'static str,
    src: &str,
    arch: &str,
    traced: bool,
    path: Option<&Path>,
) -> Result<String, CudaError> {
    let text = compile_with(file, src, arch, traced)?;
    if let Some(p) = path {
        store_ptx(p, &entry_prefix(file, arch), &text);
    }
    if let Ok(mut c) = ptx_cache().lock() {
        c.insert((file, arch.to_string()), text.clone());
    }
    Ok(text)
}

/// Compiles (or finds, as [`compile_source`]) and loads one source into `ctx`. PTX read from
/// the disk cache that the driver refuses (a damaged file, or one made for another driver on a
/// shared home folder) is removed and compiled again.
pub fn load_source(
    ctx: &Arc<CudaContext>,
    file: &'static str,
    src: &str,
    arch: &str,
) -> Result<Arc<CudaModule>, CudaError> {
    let (text, from) = compile_source_from(file, src, arch)?;
    match ctx.load_module(Ptx::from_src(text)) {
        Ok(m) => Ok(m),
        Err(e) => {
            let Some(path) = from else {
                return Err(drv("load module")(e));
            };
            let _ = std::fs::remove_file(&path);
            let text = compile_and_keep(file, src, arch, trace_requested(), Some(&path))?;
            ctx.load_module(Ptx::from_src(text))
                .map_err(drv("load module"))
        }
    }
}

/// The folder that keeps NVRTC's PTX across processes: `MIMO_PTX_CACHE` where it is set (empty
/// or `0`: none), else `mimo-quant/ptx` under `XDG_CACHE_HOME` or `~/.cache`. Compiling the
/// kernels takes a minute or more (the driver then caches its own translation of the same PTX),
/// so every `mimo-run` after the first starts in moments; entries are named by everything the
/// PTX depends on (`ptx_cache_name`), so a changed kernel or flag never reads a stale one.
pub fn ptx_cache_dir() -> Option<PathBuf> {
    cache_dir_from(
        std::env::var_os("MIMO_PTX_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// [`ptx_cache_dir`] from the three variables' values.
fn cache_dir_from(
    explicit: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    if let Some(dir) = explicit {
        return (!dir.is_empty() && dir != "0").then(|| PathBuf::from(dir));
    }
    let nonempty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = nonempty(xdg).or_else(|| nonempty(home).map(|h| h.join(".cache")))?;
    Some(base.join("mimo-quant").join("ptx"))
}

/// The cache entry of one compilation, or None without a cache folder or without NVRTC.
fn disk_cache_path(file: &str, src: &str, arch: &str, traced: bool) -> Option<PathBuf> {
    let dir = ptx_cache_dir()?;
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the call writes two ints. A failed call
    // leaves (0, 0), which only names other entries.
    let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    let options = nvrtc_options(file, arch, traced);
    Some(dir.join(ptx_cache_name(file, arch, (major, minor), &options, src)))
}

/// A PTX cache entry's file name: the file and architecture, then a hash of everything the PTX
/// depends on (NVRTC's version, the options, the common header and the source). The hash is
/// std's SipHash with fixed keys: the same in every process of one build (another build may
/// name the same PTX otherwise, which costs one compilation).
fn ptx_cache_name(
    file: &str,
    arch: &str,
    nvrtc: (i32, i32),
    options: &[String],
    src: &str,
) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    nvrtc.hash(&mut h);
    options.hash(&mut h);
    COMMON_HEADER.hash(&mut h);
    src.hash(&mut h);
    format!("{}{:016x}.ptx", entry_prefix(file, arch), h.finish())
}

/// The part of an entry's name shared by every version of one file for one architecture.
fn entry_prefix(file: &str, arch: &str) -> String {
    format!("{file}-{arch}-")
}

/// Entries kept per file and architecture: the newest few (builds, traced and plain variants),
/// so that the folder does not grow with every changed kernel.
const KEEP_PER_FILE: usize = 4;

/// Writes a cache entry through a temporary name and a rename, so that a reader never sees a
/// part of one, then leaves only the [`KEEP_PER_FILE`] newest entries named `prefix...` (its
/// file and architecture, [`entry_prefix`]). A cache that cannot be written is only a slower
/// next start.
fn store_ptx(path: &Path, prefix: &str, text: &str) {
    // A name of this call's own (threads of one process may store the same entry at once).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let ok = path
        .parent()
        .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        && std::fs::write(&tmp, text).is_ok()
        && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
        return;
    }
    if let Some(dir) = path.parent() {
        prune(dir, prefix, KEEP_PER_FILE);
    }
}

/// Removes all but the `keep` most recently modified `.ptx` entries of `dir` whose names start
/// with `prefix` (errors ignored: another process may be pruning too).
fn prune(dir: &Path, prefix: &str, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(prefix) && n.ends_with(".ptx")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    // Newest first; equal times by name, so the choice is the same in every process.
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    for (_, p) in found.into_iter().skip(keep) {
        let _ = std::fs::remove_file(p);
    }
}

/// [`compile_source`] as `MIMO_TRACE=1` compiles it, whatever this process's environment, and
/// not cached (the compile tests of the traced kernels).
pub fn compile_source_traced(
    file: &'static str,
    src: &str,
    arch: &str,
) -> Result<String, CudaError> {
    compile_with(file, src, arch, true)
}

/// NVRTC's options for `file`: the architecture, C++17, tracing defines with `traced`, then
/// `MIMO_NVRTC_FLAGS`.
fn nvrtc_options(file: &str, arch: &str, traced: bool) -> Vec<String> {
    let mut options = vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()];
    if traced {
        options.extend(trace_defines(file));
    }
    options.extend(extra_nvrtc_flags());
    options
}

/// One NVRTC compilation of `file` (tracing defines with `traced`, then `MIMO_NVRTC_FLAGS`).
fn compile_with(
    file: &'static str,
    src: &str,
    arch: &str,
    traced: bool,
) -> Result<String, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoDevice(
            "the NVRTC library (libnvrtc) was not found".into(),
        ));
    }
    let options = nvrtc_options(file, arch, traced);
    let opts = CompileOptions {
        options,
        name: Some(file.to_string()),
        ..Default::default()
    };
    // `#line` keeps the compiler's messages pointing at the source file's own lines.
    let full = format!("{COMMON_HEADER}\n#line 1 \"{file}\"\n{src}");
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(full, opts).map_err(|e| CudaError::Compile {
        file,
        log: compile_log(&e),
    })?;
    Ok(ptx.to_src())
}

/// Extra NVRTC options from `MIMO_NVRTC_FLAGS` (whitespace-separated, e.g.
/// `-DMIMO_X_UPFRONT_MAX_TM=2`): kernel variants for A/B measurements from one binary. Read once
/// per process, like the PTX cache it feeds.
fn extra_nvrtc_flags() -> Vec<String> {
    static FLAGS: OnceLock<Vec<String>> = OnceLock::new();
    FLAGS
        .get_or_init(|| {
            std::env::var("MIMO_NVRTC_FLAGS")
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        })
        .clone()
}

fn compile_log(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PTX cache names an entry by everything the PTX depends on: another source, option or
    /// NVRTC version gives another name; the same inputs the same name.
    #[test]
    fn ptx_cache_names_follow_their_inputs() {
        let opts = vec!["--gpu-architecture=sm_90a".to_string()];
        let name = |v, o: &[String], src| ptx_cache_name("fp4_gemm.cu", "sm_90a", v, o, src);
        let base = name((13, 0), &opts, "kernel a");
        assert_eq!(base, name((13, 0), &opts, "kernel a"));
        assert!(base.starts_with("fp4_gemm.cu-sm_90a-") && base.ends_with(".ptx"));
        assert_ne!(base, name((13, 0), &opts, "kernel b"));
        assert_ne!(base, name((13, 5), &opts, "kernel a"));
        let more = vec![opts[0].clone(), "-DMIMO_TRACE".to_string()];
        assert_ne!(base, name((13, 0), &more, "kernel a"));
    }

    /// An entry is written whole under its name (through a temporary file), and a directory
    /// that cannot be made leaves nothing behind.
    #[test]
    fn ptx_cache_entries_are_written_whole() {
        let dir = std::env::temp_dir().join(format!("mimo-ptx-store-test-{}", std::process::id()));
        let path = dir.join("x.ptx");
        store_ptx(&path, "x-", "// ptx");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "// ptx");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "only the entry itself");
        // A file where the directory should be: nothing written, no error.
        let blocked = dir.join("x.ptx").join("y.ptx");
        store_ptx(&blocked, "y-", "// ptx");
        assert!(!blocked.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The cache folder: `MIMO_PTX_CACHE` wins (empty or `0` turns it off), else
    /// `XDG_CACHE_HOME`, else `~/.cache`; nothing without any of them.
    #[test]
    fn cache_folder_follows_the_environment() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            cache_dir_from(os("/tmp/c"), os("/x"), os("/h")),
            Some(PathBuf::from("/tmp/c"))
        );
        assert_eq!(cache_dir_from(os("0"), os("/x"), os("/h")), None);
        assert_eq!(cache_dir_from(os(""), os("/x"), os("/h")), None);
        assert_eq!(
            cache_dir_from(None, os("/x"), os("/h")),
            Some(PathBuf::from("/x/mimo-quant/ptx"))
        );
        assert_eq!(
            cache_dir_from(None, os(""), os("/h")),
            Some(PathBuf::from("/h/.cache/mimo-quant/ptx"))
        );
        assert_eq!(cache_dir_from(None, None, None), None);
    }

    /// Storing an entry leaves only the newest [`KEEP_PER_FILE`] of its file and architecture,
    /// and never touches another file's entries.
    #[test]
    fn stored_entries_are_pruned_per_file() {
        let dir = std::env::temp_dir().join(format!("mimo-ptx-prune-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(1000);
        let entry = |file: &str, i: u64| dir.join(format!("{file}-sm_90a-{i:016x}.ptx"));
        for i in 0..6u64 {
            for file in ["a.cu", "b.cu"] {
                std::fs::write(entry(file, i), "old").unwrap();
                let f = std::fs::File::options()
                    .write(true)
                    .open(entry(file, i))
                    .unwrap();
                f.set_modified(t0 + std::time::Duration::from_secs(i))
                    .unwrap();
            }
        }
        store_ptx(&entry("a.cu", 99), &entry_prefix("a.cu", "sm_90a"), "new");
        let names = |file: &str| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(file))
                .collect();
            v.sort();
            v
        };
        // The new entry and the three newest old ones of a.cu; b.cu untouched.
        let want: Vec<String> = [3u64, 4, 5, 99]
            .iter()
            .map(|&i| format!("a.cu-sm_90a-{i:016x}.ptx"))
            .collect();
        assert_eq!(names("a.cu"), want);
        assert_eq!(names("b.cu").len(), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
