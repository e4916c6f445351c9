//! Calibration data: the embedded set (calibration/mimo-calib.jsonl, written for this project),
//! recipes (JSON: which sets, how many samples, sequence length, seed), and user files given by
//! `--calib FILE` (.txt: the whole text; .jsonl: one object per line with a "text" field, and an
//! optional "set"; .json: a recipe). Text is tokenized sample by sample, concatenated with a
//! blank line between samples, and cut into sequences of `seq_len` tokens. A recipe with a
//! `generate` object (the embedded `self` recipe) replaces each sample by the model's own
//! continuation of its first words ([`super::selfgen`]).

use std::path::{Path, PathBuf};

use mimo_runtime::tokenizer::{TextTokenizer, TokenizerError};

use super::selfgen::{Continuer, SelfGenError, SelfGenerate};

/// The embedded calibration set (jsonl).
pub const EMBEDDED_SET: &str = include_str!("../../../../calibration/mimo-calib.jsonl");
/// The embedded default recipe (JSON).
pub const DEFAULT_RECIPE: &str = include_str!("../../../../calibration/default.json");
/// The embedded self-generated recipe (JSON): `--calib self`.
pub const SELF_RECIPE: &str = include_str!("../../../../calibration/self.json");
/// Name of the embedded set in recipes.
pub const EMBEDDED_SET_NAME: &str = "mimo-calib.jsonl";

/// Errors of loading calibration data. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// the file
        path: PathBuf,
        /// the OS error
        source: std::io::Error,
    },
    /// A jsonl line is not an object with a string "text".
    #[error("{path}:{line}: {reason}")]
    BadLine {
        /// the file
        path: PathBuf,
        /// 1-based line number
        line: usize,
        /// what is wrong
        reason: String,
    },
    /// The recipe JSON is malformed or has an invalid value.
    #[error("{path}: bad recipe: {reason}")]
    BadRecipe {
        /// the recipe file
        path: PathBuf,
        /// what is wrong
        reason: String,
    },
    /// The file extension is not .txt, .jsonl or .json.
    #[error("{path}: unknown calibration file type (expected .txt, .jsonl or a .json recipe)")]
    UnknownKind {
        /// the file
        path: PathBuf,
    },
    /// The file lies in a `heldout` folder, kept for evaluation only.
    #[error("{path}: refusing to calibrate on held-out evaluation text (a 'heldout' folder)")]
    HeldOut {
        /// the file
        path: PathBuf,
    },
    /// No text remained after selection.
    #[error("{path}: no calibration text (after selecting sets {sets:?})")]
    Empty {
        /// the source
        path: PathBuf,
        /// the sets asked for
        sets: Vec<String>,
    },
    /// Tokenization failed.
    #[error("tokenizing calibration text: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// The recipe asks for self-generated text but no model was given to generate it.
    #[error("{path}: the recipe generates text with the model, and no model was given")]
    NeedsModel {
        /// the recipe
        path: PathBuf,
    },
    /// Generating the model's own calibration text failed.
    #[error(transparent)]
    Generate(#[from] SelfGenError),
}

/// One calibration sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Its set ("prose", "code", ...; "user" for files without one).
    pub set: String,
    /// The text.
    pub text: String,
}

/// How to draw calibration sequences.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The jsonl/txt file, relative to the recipe's folder; "mimo-calib.jsonl" is the embedded set.
    pub data: String,
    /// Sets to draw from (empty: all).
    #[serde(default)]
    pub sets: Vec<String>,
    /// Number of samples to draw (at most the number available).
    pub samples: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Shuffle seed (and the seed of the generated text's sampler).
    #[serde(default)]
    pub seed: u64,
    /// Replace each sample by the model's own continuation of its first words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<SelfGenerate>,
}

/// Tokenized calibration sequences and where they came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibData {
    /// What `--calib` named.
    pub source: String,
    /// The recipe applied.
    pub recipe: Recipe,
    /// Samples used, per set, in set-name order.
    pub samples_per_set: std::collections::BTreeMap<String, usize>,
    /// Total tokens.
    pub tokens: usize,
    /// The sequences.
    #[serde(skip)]
    pub sequences: Vec<Vec<u32>>,
    /// The samples the sequences were cut from, in order (the model's own text for a
    /// generating recipe).
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

fn is_heldout(path: &Path) -> bool {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    p.components().any(|c| c.as_os_str() == "heldout")
}

/// Writes samples as jsonl (`{"set": ..., "text": ...}` per line: what [`parse_jsonl`] reads).
pub fn samples_jsonl(samples: &[Sample]) -> String {
    samples
        .iter()
        .map(|s| serde_json::json!({"set": s.set, "text": s.text}).to_string() + "\n")
        .collect()
}

/// Parses jsonl samples (`{"text": ..., "set": ...}` per line; blank lines skipped).
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<Sample>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| DataError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let t = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad("expected an object with a string \"text\"".into()))?;
        let set = v.get("set").and_then(|s| s.as_str()).unwrap_or("user");
        out.push(Sample {
            set: set.to_string(),
            text: t.to_string(),
        });
    }
    Ok(out)
}

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn samples_of_file(path: &Path) -> Result<Vec<Sample>, DataError> {
    if is_heldout(path) {
        return Err(DataError::HeldOut {
            path: path.to_path_buf(),
        });
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => parse_jsonl(&read(path)?, path),
        Some("txt") => Ok(vec![Sample {
            set: "user".into(),
            text: read(path)?,
        }]),
        _ => Err(DataError::UnknownKind {
            path: path.to_path_buf(),
        }),
    }
}

/// Parses and checks a recipe.
pub fn parse_recipe(text: &str, path: &Path) -> Result<Recipe, DataError> {
    let bad = |reason: String| DataError::BadRecipe {
        path: path.to_path_buf(),
        reason,
    };
    let r: Recipe = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    if r.samples == 0 {
        return Err(bad("samples must be at least 1".into()));
    }
    if !(16..=1 << 20).contains(&r.seq_len) {
        return Err(bad(format!(
            "seq_len {} must be in 16..=1048576",
            r.seq_len
        )));
    }
    if let Some(g) = &r.generate {
        g.check().map_err(bad)?;
    }
    Ok(r)
}

/// splitmix64: a fixed, dependency-free generator for the seeded shuffle (and the generated
/// text's per-sample seeds).
pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Selects `recipe.samples` samples: filter by set, seeded Fisher-Yates shuffle within each set,
/// then round-robin over the sets (in name order) so every set is represented.
pub fn select(samples: Vec<Sample>, recipe: &Recipe) -> Vec<Sample> {
    let mut by_set: std::collections::BTreeMap<String, Vec<Sample>> = Default::default();
    for s in samples {
        if recipe.sets.is_empty() || recipe.sets.contains(&s.set) {
            by_set.entry(s.set.clone()).or_default().push(s);
        }
    }
    let mut state = recipe.seed;
    for v in by_set.values_mut() {
        for i in (1..v.len()).rev() {
            let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
    let mut queues: Vec<std::vec::IntoIter<Sample>> =
        by_set.into_values().map(|v| v.into_iter()).collect();
    let mut out = Vec::new();
    while out.len() < recipe.samples {
        let before = out.len();
        for q in queues.iter_mut() {
            if out.len() == recipe.samples {
                break;
            }
            if let Some(s) = q.next() {
                out.push(s);
            }
        }
        if out.len() == before {
            break;
        }
    }
    out
}

/// Resolves `spec` ("default", "self", a recipe .json, or a .txt/.jsonl file with
/// `default_recipe`'s count, length and seed) and tokenizes it into sequences. A recipe that
/// generates its text (`self`, or a `generate` object) needs `continuer`, the model's writer.
pub fn load_sequences(
    spec: &str,
    tok: &TextTokenizer,
    continuer: Option<&mut dyn Continuer>,
) -> Result<CalibData, DataError> {
    let embedded = Path::new(EMBEDDED_SET_NAME);
    let default_recipe = parse_recipe(DEFAULT_RECIPE, Path::new("<embedded default.json>"))?;
    // The embedded recipes, both over the embedded set.
    let builtin = match spec {
        "default" => Some(("default", DEFAULT_RECIPE)),
        "self" => Some(("self", SELF_RECIPE)),
        _ => None,
    };
    let (recipe, samples, origin) = if let Some((name, text)) = builtin {
        let r = parse_recipe(text, Path::new(&format!("<embedded {name}.json>")))?;
        let s = parse_jsonl(EMBEDDED_SET, embedded)?;
        (r, s, PathBuf::from(format!("<embedded {name} recipe>")))
    } else {
        let path = Path::new(spec);
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            if is_heldout(path) {
                return Err(DataError::HeldOut {
                    path: path.to_path_buf(),
                });
            }
            let r = parse_recipe(&read(path)?, path)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let data = dir.join(&r.data);
            let s = if r.data == EMBEDDED_SET_NAME && !data.is_file() {
                parse_jsonl(EMBEDDED_SET, embedded)?
            } else {
                samples_of_file(&data)?
            };
            (r, s, path.to_path_buf())
        } else {
            let s = samples_of_file(path)?;
            let r = Recipe {
                data: spec.to_string(),
                sets: Vec::new(),
                samples: s.len().max(1),
                generate: None,
                ..default_recipe
            };
            (r, s, path.to_path_buf())
        }
    };
    let mut chosen = select(samples, &recipe);
    if let Some(g) = &recipe.generate {
        let c = continuer.ok_or_else(|| DataError::NeedsModel {
            path: origin.clone(),
        })?;
        chosen = c.continue_samples(tok, &chosen, g, recipe.seed)?;
    }
    let mut samples_per_set = std::collections::BTreeMap::new();
    let mut ids: Vec<u32> = Vec::new();
    for s in &chosen {
        *samples_per_set.entry(s.set.clone()).or_insert(0usize) += 1;
        let mut text = s.text.clone();
        text.push_str("\n\n");
        ids.extend(tok.encode(&text, false)?);
    }
    if ids.is_empty() {
        return Err(DataError::Empty {
            path: origin,
            sets: recipe.sets.clone(),
        });
    }
    // Fixed-length sequences; a last piece shorter than a quarter sequence is dropped (too little
    // context to be representative), unless it is all there is.
    let mut sequences: Vec<Vec<u32>> = ids.chunks(recipe.seq_len).map(<[u32]>::to_vec).collect();
    if sequences.len() > 1
        && sequences
            .last()
            .is_some_and(|s| s.len() < recipe.seq_len / 4)
    {
        sequences.pop();
    }
    let tokens = sequences.iter().map(Vec::len).sum();
    Ok(CalibData {
        source: spec.to_string(),
        recipe,
        samples_per_set,
        tokens,
        sequences,
        samples: chosen,
    })
}
