//! Shared by crates/quantize/tests/hostile.rs and crates/runtime/tests/hostile.rs (included with
//! `#[path]`): the bad-input corpus (cases.json) and running a binary on a case with a time limit.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The corpus folder, tests/bad-inputs.
pub fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/bad-inputs")
}

/// One entry of cases.json.
#[derive(Debug, Clone)]
pub struct Case {
    /// Folder relative to the corpus root.
    pub case: String,
    /// "mimo-quant" or "mimo-run".
    pub tool: String,
    /// Subcommand (convert, verify, bench).
    pub command: String,
    /// Substrings the output must contain.
    pub expect: Vec<String>,
    /// What is wrong with the input.
    pub what: String,
    /// A finding that makes this case fail today.
    pub known_issue: Option<String>,
}

impl Case {
    /// The case folder.
    pub fn dir(&self) -> PathBuf {
        corpus_root().join(&self.case)
    }
}

/// Every case of cases.json for `tool`.
pub fn cases(tool: &str) -> Vec<Case> {
    let path = corpus_root().join("cases.json");
    let text = std::fs::read_to_string(&path).expect("tests/bad-inputs/cases.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("cases.json is JSON");
    let s = |c: &serde_json::Value, k: &str| c[k].as_str().unwrap_or_default().to_string();
    v["cases"]
        .as_array()
        .expect("cases array")
        .iter()
        .map(|c| Case {
            case: s(c, "case"),
            tool: s(c, "tool"),
            command: s(c, "command"),
            expect: c["expect"]
                .as_array()
                .expect("expect array")
                .iter()
                .map(|e| e.as_str().unwrap_or_default().to_string())
                .collect(),
            what: s(c, "what"),
            known_issue: c["known_issue"].as_str().map(str::to_string),
        })
        .filter(|c| c.tool == tool)
        .collect()
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code; None when killed by a signal or by the time limit.
    pub code: Option<i32>,
    /// stderr then stdout.
    pub text: String,
    /// True when the time limit was reached and the process killed.
    pub timed_out: bool,
}

/// Runs `cmd` (stdin closed, backtraces off) and kills it after `limit`.
pub fn run_limited(mut cmd: Command, limit: Duration) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "0");
    let mut child = cmd.spawn().expect("spawn the binary");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let (status, timed_out) = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break (Some(st), false);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Outcome {
        code: status.and_then(|s| s.code()),
        text: format!("{stderr}{stdout}"),
        timed_out,
    }
}

/// Checks that a run on a bad input failed cleanly: no time-out, no signal, no panic (exit
/// code 101), a non-zero exit code and every expected substring in the output.
pub fn check_rejected(case: &Case, o: &Outcome) -> Result<(), String> {
    let head = format!(
        "{} ({}, {} {})",
        case.case, case.what, case.tool, case.command
    );
    if o.timed_out {
        return Err(format!("{head}: still running after the time limit (hang)"));
    }
    match o.code {
        None => return Err(format!("{head}: killed by a signal: {}", o.text)),
        Some(0) => return Err(format!("{head}: accepted (exit 0): {}", o.text)),
        Some(101) => return Err(format!("{head}: panicked: {}", o.text)),
        Some(_) => {}
    }
    if o.text.contains("panicked") {
        return Err(format!("{head}: panic text in the output: {}", o.text));
    }
    let missing: Vec<&String> = case
        .expect
        .iter()
        .filter(|e| !o.text.contains(e.as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{head}: output lacks {missing:?}; got: {}",
            o.text.trim()
        ));
    }
    Ok(())
}

/// Runs every case (of the known-issue ones when `known` is true, the others otherwise) with
/// `args` building the command line; panics listing every failure.
pub fn run_corpus(
    tool: &str,
    known: bool,
    mut build: impl FnMut(&Case) -> (Command, Option<PathBuf>),
) {
    let cases: Vec<Case> = cases(tool)
        .into_iter()
        .filter(|c| c.known_issue.is_some() == known)
        .collect();
    assert!(!cases.is_empty(), "no {tool} cases in cases.json");
    let mut failures = Vec::new();
    for c in &cases {
        let (cmd, output) = build(c);
        let o = run_limited(cmd, Duration::from_secs(30));
        if let Err(e) = check_rejected(c, &o) {
            failures.push(match &c.known_issue {
                Some(k) => format!("{e}\n    [known: {k}]"),
                None => e,
            });
        }
        if let Some(out) = output {
            if out.exists() {
                failures.push(format!(
                    "{}: output {} was left behind",
                    c.case,
                    out.display()
                ));
            }
            if let Some(parent) = out.parent() {
                let leftovers: Vec<String> = std::fs::read_dir(parent)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| n.contains("mimo-quant-tmp"))
                            .collect()
                    })
                    .unwrap_or_default();
                if !leftovers.is_empty() {
                    failures.push(format!("{}: temporary folders left: {leftovers:?}", c.case));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {tool} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} {tool} bad-input cases rejected as expected",
        cases.len()
    );
}
