//! The stages of a probe chain: what each computes, which checks a chain must pass, which tiles
//! or units each block owns, and where each stage's bytes sit in shared memory.

use half::bf16;

use crate::fp4::Fp4Matrix;

/// Most 16-row tiles one block may own in a stage (`SP_MAX_TILES`).
pub const PROBE_MAX_TILES: usize = 8;
/// Bytes per 16-row tile and 128-element chunk: packed words and scale bytes.
pub(super) const TILE_CHUNK_W: usize = 1024;
pub(super) const TILE_CHUNK_S: usize = 128;

/// What a stage computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProbeKind {
    /// A one-token NVFP4 product (`n`, `k`, `gated`, `late`).
    #[default]
    Product,
    /// Decode attention's first half: q is the first `heads * 128` elements of the previous
    /// output; per split of 64 keys and per head, the scores' max and sum and the weighted
    /// values (head_dim 128), the split's keys and values of a `[kv_heads][context][128]` cache
    /// streamed into shared memory like weights.
    AttentionSplits {
        /// Query heads.
        heads: usize,
        /// Key/value heads (a divisor of `heads`).
        kv_heads: usize,
        /// Keys attended to, a multiple of 64, at most 2,048.
        context: usize,
    },
    /// Decode attention's second half: the splits of the previous stage (the same shape)
    /// merged into the `heads * 128` bf16 attention output.
    AttentionCombine {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// Keys attended to.
        context: usize,
    },
}

/// Bytes of one attention split's keys (or values) in shared memory.
const SPLIT_BYTES: usize = 64 * 128 * 2;
/// Words of one split's partial (`SP_PART`): max, sum, 128 weighted values.
const PART_WORDS: usize = 130;

/// One stage of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeStage {
    /// Output rows, a multiple of 16 (of 32 when gated).
    pub n: usize,
    /// Input elements, a multiple of 128; stage s > 0 reads the first `k` of stage s - 1's
    /// output.
    pub k: usize,
    /// Tiles (2j, 2j + 1) are the gate and up rows of outputs 16j .. 16j + 16, stored as
    /// silu(gate) * up: the output has n / 2 elements.
    pub gated: bool,
    /// The stage's weights are asked for only after its input is ready (an MoE expert stage,
    /// whose rows depend on the router), not during the previous stage.
    pub late: bool,
    /// What it computes.
    pub kind: ProbeKind,
}

impl ProbeStage {
    /// A one-token product `[n, k]`.
    pub fn product(n: usize, k: usize, gated: bool, late: bool) -> Self {
        ProbeStage {
            n,
            k,
            gated,
            late,
            kind: ProbeKind::Product,
        }
    }

    /// Decode attention of `heads` query heads over `context` keys, as two stages: the splits,
    /// then their combine (whose output, `heads * 128` elements, the next stage reads).
    pub fn attention(heads: usize, kv_heads: usize, context: usize) -> [Self; 2] {
        let n = heads * 128;
        [
            ProbeStage {
                n,
                k: n,
                gated: false,
                late: false,
                kind: ProbeKind::AttentionSplits {
                    heads,
                    kv_heads,
                    context,
                },
            },
            ProbeStage {
                n,
                k: 0,
                gated: false,
                late: false,
                kind: ProbeKind::AttentionCombine {
                    heads,
                    kv_heads,
                    context,
                },
            },
        ]
    }

    /// Elements of the stage's output that the next stage may read (the splits' partials are
    /// for the combine only).
    pub fn out_len(&self) -> usize {
        match self.kind {
            ProbeKind::AttentionSplits { .. } => 0,
            _ if self.gated => self.n / 2,
            _ => self.n,
        }
    }

    /// 32-bit words of the stage's output buffer.
    pub(super) fn out_words(&self) -> usize {
        match self.kind {
            ProbeKind::AttentionSplits { heads, context, .. } => {
                2 * PART_WORDS * heads * (context / 64)
            }
            _ => self.out_len(),
        }
    }

    /// Units the blocks share: splits (split, head), combine slices of 32 elements.
    fn units(&self) -> usize {
        match self.kind {
            ProbeKind::AttentionSplits { heads, context, .. } => heads * (context / 64),
            ProbeKind::AttentionCombine { .. } => self.n / 32,
            ProbeKind::Product => 0,
        }
    }
}

/// What a stage reads besides its input: a product's matrix, the splits' key/value cache
/// (`[kv_heads][context][128]` bf16 each), nothing for the combine.
#[derive(Clone, Copy, Debug)]
pub enum ProbeData<'a> {
    /// A product's NVFP4 matrix `[n, k]`.
    Weights(&'a Fp4Matrix),
    /// The attention splits' keys and values.
    KvCache {
        /// Keys.
        k: &'a [bf16],
        /// Values.
        v: &'a [bf16],
    },
    /// Nothing (the combine).
    None,
}

/// Tiles `[t0, t1)` of block `b` of `grid` (the kernel's `sp_tiles`).
fn block_tiles(st: &ProbeStage, b: usize, grid: usize) -> (usize, usize) {
    let tpu = if st.gated { 2 } else { 1 };
    let units = st.n / 16 / tpu;
    (b * units / grid * tpu, (b + 1) * units / grid * tpu)
}

/// Largest number of tiles (attention: units) any block owns in a stage.
fn max_tiles(st: &ProbeStage, grid: usize) -> usize {
    if st.kind != ProbeKind::Product {
        return st.units().div_ceil(grid);
    }
    (0..grid)
        .map(|b| {
            let (t0, t1) = block_tiles(st, b, grid);
            t1 - t0
        })
        .max()
        .unwrap_or(0)
}

/// Shared-memory placement of every stage's weights: stage s and s + 1 are in shared memory at
/// once (s + 1 streams while s computes), so each starts where the previous one ends, or at
/// the ring's start when it would run past `limit`. Returns (weight offset, scale offset) per
/// stage and the bytes used, or why the chain does not fit.
pub(super) fn place_stages(
    stages: &[ProbeStage],
    grid: usize,
    ring0: usize,
    limit: usize,
) -> Result<(Vec<(usize, usize)>, usize), String> {
    let mut out = Vec::with_capacity(stages.len());
    let mut prev: Option<(usize, usize)> = None; // previous stage's [start, end)
    let mut used = ring0;
    for (i, st) in stages.iter().enumerate() {
        let tiles = max_tiles(st, grid);
        let chunks = st.k / 128;
        let (wb, bytes) = match st.kind {
            ProbeKind::Product => (
                tiles * chunks * TILE_CHUNK_W,
                tiles * chunks * (TILE_CHUNK_W + TILE_CHUNK_S),
            ),
            ProbeKind::AttentionSplits { .. } => (0, tiles * 2 * SPLIT_BYTES),
            ProbeKind::AttentionCombine { .. } => (0, 0),
        };
        let mut start = prev.map_or(ring0, |p| p.1.next_multiple_of(128));
        if start + bytes > limit {
            start = ring0;
        }
        let end = start + bytes;
        if end > limit || prev.is_some_and(|p| start < p.1 && p.0 < end) {
            return Err(format!(
                "stages {} and {i} need {} + {bytes} bytes of shared memory per block; {} are \
                 free",
                i.saturating_sub(1),
                prev.map_or(0, |p| p.1 - p.0),
                limit - ring0
            ));
        }
        out.push((start, start + wb));
        used = used.max(end);
        prev = Some((start, end));
    }
    Ok((out, used))
}

/// Checks a chain's shapes (what the kernel assumes).
pub(super) fn check_stages(stages: &[ProbeStage], grid: usize) -> Result<(), String> {
    if stages.is_empty() || stages.len() >= 65535 {
        return Err(format!(
            "{} stages (1 to 65,534: the output tags count them)",
            stages.len()
        ));
    }
    for (i, st) in stages.iter().enumerate() {
        match st.kind {
            ProbeKind::AttentionSplits {
                heads,
                kv_heads,
                context,
            } => {
                if heads == 0
                    || kv_heads == 0
                    || heads % kv_heads != 0
                    || context == 0
                    || context % 64 != 0
                    || context > 2048
                    || st.n != heads * 128
                    || st.k != st.n
                {
                    return Err(format!(
                        "stage {i}: attention of {heads} heads over {kv_heads} KV heads and \
                         {context} keys (a multiple of 64, at most 2048)"
                    ));
                }
                let combine = ProbeKind::AttentionCombine {
                    heads,
                    kv_heads,
                    context,
                };
                if stages.get(i + 1).map(|n| (n.kind, n.n)) != Some((combine, st.n)) {
                    return Err(format!("stage {i}: attention splits without their combine"));
                }
                if max_tiles(st, grid) > PROBE_MAX_TILES / 2 {
                    return Err(format!(
                        "stage {i}: {} attention units per block over {grid} blocks (at most {})",
                        max_tiles(st, grid),
                        PROBE_MAX_TILES / 2
                    ));
                }
            }
            ProbeKind::AttentionCombine { .. } => {
                if i == 0 || !matches!(stages[i - 1].kind, ProbeKind::AttentionSplits { .. }) {
                    return Err(format!(
                        "stage {i}: a combine without attention splits before it"
                    ));
                }
                continue;
            }
            ProbeKind::Product => {}
        }
        let rows = if st.gated { 32 } else { 16 };
        if st.kind == ProbeKind::Product
            && (st.n == 0 || st.n % rows != 0 || st.k == 0 || st.k % 128 != 0)
        {
            return Err(format!(
                "stage {i}: [{}, {}] needs n a multiple of {rows} and k of 128",
                st.n, st.k
            ));
        }
        if max_tiles(st, grid) > PROBE_MAX_TILES {
            return Err(format!(
                "stage {i}: {} tiles per block over {grid} blocks (at most {PROBE_MAX_TILES})",
                max_tiles(st, grid)
            ));
        }
        if i > 0 && stages[i - 1].out_len() < st.k {
            return Err(format!(
                "stage {i} reads {} elements; stage {} writes {}",
                st.k,
                i - 1,
                stages[i - 1].out_len()
            ));
        }
    }
    Ok(())
}

/// The products of one Qwen3-30B-A3B decoder layer at one token as a probe chain: q/k/v
/// [2048 -> 5120], o_proj [4096 -> 2048], the eight chosen experts' gate/up as one gated
/// [2048 -> 2 x 6144] (late: its rows are known only after the router) and their down as one
/// [6144 -> 2048] (the eight experts' sums added, as the combine does). With `context`, the
/// decode attention of its 32 query and 4 KV heads over that many keys between q/k/v and
/// o_proj (q/k norms, RoPE and the cache write left out); without, no attention. The router and
/// the top-k are left out.
pub fn qwen3_moe_layer(context: Option<usize>) -> Vec<ProbeStage> {
    let st = ProbeStage::product;
    let mut v = vec![st(5120, 2048, false, false)];
    if let Some(c) = context {
        v.extend(ProbeStage::attention(32, 4, c));
    }
    v.extend([
        st(2048, 4096, false, false),
        st(12288, 2048, true, true),
        st(2048, 6144, false, false),
    ]);
    v
}

#[cfg(test)]
mod tests {
    use super::super::X_OFF;
    use super::*;

    #[test]
    fn the_qwen3_layer_fits_one_block_per_sm() {
        let layer: Vec<ProbeStage> = (0..4).flat_map(|_| qwen3_moe_layer(None)).collect();
        check_stages(&layer, 132).unwrap();
        // With attention over 512 keys: 256 split units, two per block (64 KiB of keys and
        // values), beside q/k/v's 55 KiB.
        let att: Vec<ProbeStage> = (0..4).flat_map(|_| qwen3_moe_layer(Some(512))).collect();
        check_stages(&att, 132).unwrap();
        assert_eq!(max_tiles(&att[1], 132), 2);
        let ring1 = (X_OFF + 2 * 6144 + 16).next_multiple_of(128);
        place_stages(&att, 132, ring1, 233_472 - 2048).unwrap();
        let ring0 = (X_OFF + 2 * 6144 + 16).next_multiple_of(128);
        let (offs, used) = place_stages(&layer, 132, ring0, 233_472 - 2048).unwrap();
        assert!(used <= 233_472 - 2048, "{used}");
        // Consecutive stages never overlap; gate/up (3 tile pairs per block at most) is 110,592
        // bytes of weights and scales.
        assert_eq!(max_tiles(&layer[2], 132), 6);
        for w in offs.windows(2) {
            assert_ne!(w[0].0, w[1].0);
        }
    }

    #[test]
    fn bad_chains_are_refused_with_the_stage() {
        let st = |n, k| ProbeStage::product(n, k, false, false);
        assert!(check_stages(&[st(100, 256)], 132)
            .unwrap_err()
            .contains("stage 0"));
        let e = check_stages(&[st(256, 256), st(64, 512)], 132).unwrap_err();
        assert!(e.contains("stage 1 reads 512"), "{e}");
        let e = check_stages(&[st(16 * 9 * 2, 256)], 2).unwrap_err();
        assert!(e.contains("9 tiles per block"), "{e}");
        let big = st(16 * 8 * 132, 8192);
        assert!(place_stages(&[big], 132, 0, 200_000).is_err());
        // Attention halves only as a pair, within the kernel's limits.
        let [splits, combine] = ProbeStage::attention(32, 4, 512);
        let e = check_stages(&[st(5120, 256), splits, st(2048, 4096)], 132).unwrap_err();
        assert!(e.contains("without their combine"), "{e}");
        let e = check_stages(&[st(5120, 256), combine], 132).unwrap_err();
        assert!(e.contains("without attention splits"), "{e}");
        let [long, _] = ProbeStage::attention(32, 4, 4096);
        let e = check_stages(&[st(5120, 256), long, combine], 132).unwrap_err();
        assert!(e.contains("at most 2048"), "{e}");
        check_stages(&[st(5120, 256), splits, combine, st(2048, 4096)], 132).unwrap();
    }

    #[test]
    fn tiles_cover_every_row_once() {
        for st in qwen3_moe_layer(None) {
            let mut next = 0;
            for b in 0..132 {
                let (t0, t1) = block_tiles(&st, b, 132);
                assert_eq!(t0, next);
                next = t1;
            }
            assert_eq!(next * 16, st.n);
        }
    }
}
