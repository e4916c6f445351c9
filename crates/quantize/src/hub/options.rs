//! Hub settings and their resolution from the CLI and the environment, with the same variables and
//! defaults as Python's huggingface_hub (`constants.py`), so both tools share one cache and token.

use std::path::PathBuf;
use std::time::Duration;

/// Default hub endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Default revision (branch) when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// Where and how to talk to the hub. Build it with [`HubOptions::from_env`]; every field can be
/// overridden afterwards.
#[derive(Clone)]
pub struct HubOptions {
    /// Branch, tag or commit sha; `None` means `main`.
    pub revision: Option<String>,
    /// Access token (sent as `Authorization: Bearer`), needed for gated and private repos.
    pub token: Option<String>,
    /// Use only the local cache; never touch the network.
    pub offline: bool,
    /// Hub base URL without a trailing slash, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// The hub cache folder holding `models--ORG--NAME/` (HF_HUB_CACHE, default `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Show an indicatif bar (bytes, rate, ETA) on stderr while downloading.
    pub progress: bool,
    /// How many times a transient failure (network error, HTTP 429/5xx, cut transfer) is retried.
    pub max_retries: u32,
    /// First backoff delay; it doubles on each retry, capped at 8 s.
    pub retry_base_delay: Duration,
    /// Connect timeout and the longest silence accepted while reading a response.
    pub timeout: Duration,
}

impl std::fmt::Debug for HubOptions {
    // Hand-written so that the token never ends up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("revision", &self.revision)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("progress", &self.progress)
            .field("max_retries", &self.max_retries)
            .field("retry_base_delay", &self.retry_base_delay)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HubOptions {
    /// Settings from the CLI flags and the process environment.
    ///
    /// Precedence, as in huggingface_hub: token = `cli_token`, else `HF_TOKEN`, else the file
    /// `HF_TOKEN_PATH` (default `$HF_HOME/token`); endpoint = `HF_ENDPOINT`; cache =
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`; `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`,
    /// else `~/.cache/huggingface`; offline = `cli_offline` or `HF_HUB_OFFLINE` in
    /// {1, ON, YES, TRUE}; progress bars off with `HF_HUB_DISABLE_PROGRESS_BARS`.
    pub fn from_env(
        cli_token: Option<&str>,
        cli_revision: Option<&str>,
        cli_offline: bool,
    ) -> HubOptions {
        let lookup = |name: &str| std::env::var(name).ok();
        Self::from_lookup(&lookup, cli_token, cli_revision, cli_offline)
    }

    /// [`HubOptions::from_env`] with the variables read through `var` instead of the process
    /// environment (so tests need not mutate it). `HOME` is read through `var` as well.
    pub fn from_lookup(
        var: &dyn Fn(&str) -> Option<String>,
        cli_token: Option<&str>,
        cli_revision: Option<&str>,
        cli_offline: bool,
    ) -> HubOptions {
        // Empty variables count as unset, like huggingface_hub's `os.environ.get(...) or default`.
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());

        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache_root = get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home_dir(&get).join(".cache"));
            cache_root.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));

        let token = cli_token
            .map(str::to_string)
            .filter(|t| !t.trim().is_empty())
            .or_else(|| get("HF_TOKEN"))
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = get("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                // A missing or unreadable token file means "no token", as in huggingface_hub.
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());

        let endpoint = get("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim()
            .trim_end_matches('/')
            .to_string();

        let offline = cli_offline || get("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v));
        let progress = !get("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_true(&v));

        HubOptions {
            revision: cli_revision
                .map(str::to_string)
                .filter(|r| !r.trim().is_empty()),
            token,
            offline,
            endpoint,
            cache_dir,
            progress,
            max_retries: 5,
            retry_base_delay: Duration::from_millis(500),
            timeout: Duration::from_secs(30),
        }
    }

    /// The revision asked for, `main` by default.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }
}

/// huggingface_hub's `_is_true`: 1, ON, YES, TRUE in any case.
fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

fn home_dir(get: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    get("HOME")
        .or_else(|| get("USERPROFILE"))
        .map(PathBuf::from)
        // No home at all (a bare container): fall back to a relative folder rather than fail.
        .unwrap_or_else(|| PathBuf::from("."))
}
