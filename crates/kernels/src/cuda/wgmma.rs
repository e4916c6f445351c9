//! The warpgroup FP4 GEMM for 16 to thousands of tokens on Hopper (fp4_wgmma.cu): each block
//! holds 128 weight rows (two warpgroups of 64) and 16-256 tokens; the weights, decoded in
//! registers, are the A operand of `wgmma.mma_async`, the activations its B operand, straight
//! from the cp.async ring in the 128-byte-swizzled layout the instruction reads. K is split over
//! blocks (the tiled kernel's deterministic last-block reduction) where the products have too
//! few row and token blocks to fill the GPU.

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::bf16;

use super::context::{GpuContext, Tuning};
use super::error::CudaError;
use super::gemm::check_len;
use super::tiled::{launch_split_product, tiled_splits};
use super::weights::GpuFp4Weight;
use crate::fp4::Fp4Format;

/// Weight rows of one block (`WG_ROWS`: two warpgroups of 64).
const ROWS: usize = 128;
/// Threads of a block (two warpgroups).
const THREADS: u32 = 256;
/// K elements per pipeline stage.
const CHUNK: usize = 128;
/// Floats between the token rows of the epilogue's f32 tile (`WG_TILE_STRIDE`).
const TILE_STRIDE: usize = ROWS + 4;
/// The most tokens the runtime sends through the warpgroup kernels by default
/// (`Tuning::wgmma_max_tokens`). H100 (`bench/results/kernels-h100-wgmma.json`): at 64 tokens
/// they beat the FP8 path (which converts the weight and the activations on every call) on
/// every measured shape, 4096 x 14336 34.5 vs 65 us; at 256 tokens they are within a few
/// percent of it on the large shapes and slower on 2048 x 1536; at 2048 the FP8 tensor cores
/// win by 2x.
pub const WGMMA_MAX_TOKENS: usize = 128;

/// The fewest tokens the warpgroup kernels take in place of the tiled ones. H100
/// (`bench/results/kernels-h100-wgmma.json`, call 9): at 33 and 48 tokens they beat the tiled
/// kernels on every measured shape, 4096 x 14336 32.7 / 32.6 vs 53.2 / 51.4 us chained; at 32
/// tokens and fewer the bulk and decode kernels stay faster (16 tokens: 27.9 vs 18.6).
pub const WGMMA_MIN_TOKENS: usize = 33;

/// Whether a product of `m` tokens goes through the warpgroup kernels under `tuning`:
/// `wgmma_gemm` on, supported, [`WGMMA_MIN_TOKENS`] to `wgmma_max_tokens` tokens. The
/// automatic launcher ([`super::fp4_gemm`]) asks where it would take the tiled kernels, the
/// runtime for its prefill-sized products (from 64 tokens).
pub fn wgmma_preferred(tuning: &Tuning, gpu: &GpuContext, w: &GpuFp4Weight, m: usize) -> bool {
    tuning.wgmma_gemm
        && (WGMMA_MIN_TOKENS..=tuning.wgmma_max_tokens as usize).contains(&m)
        && wgmma_supported(gpu, w, m)
}

/// A launch shape of the warpgroup kernels: tokens per block and pipeline stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgmmaConfig {
    /// Tokens per block (the wgmma's N).
    pub tokens: usize,
    /// Stages of the cp.async ring (at least 3).
    pub stages: usize,
}

/// The shapes the kernels exist for (`fp4_wg_*_n{tokens}_s{stages}`): per token tile a deep
/// ring, which holds more weight bytes in flight per SM, and a shallow one, whose shared memory
/// lets two blocks share an SM where their registers do too (the 16- and 32-token tiles, under
/// 128 registers; the largest tile has room for three stages only).
pub const WGMMA_CONFIGS: [WgmmaConfig; 9] = [
    WgmmaConfig {
        tokens: 16,
        stages: 8,
    },
    WgmmaConfig {
        tokens: 16,
        stages: 4,
    },
    WgmmaConfig {
        tokens: 32,
        stages: 8,
    },
    WgmmaConfig {
        tokens: 32,
        stages: 4,
    },
    WgmmaConfig {
        tokens: 64,
        stages: 6,
    },
    WgmmaConfig {
        tokens: 64,
        stages: 4,
    },
    WgmmaConfig {
        tokens: 128,
        stages: 4,
    },
    WgmmaConfig {
        tokens: 128,
        stages: 3,
    },
    WgmmaConfig {
        tokens: 256,
        stages: 3,
    },
];

impl WgmmaConfig {
    /// The automatic shape for `m` tokens of a product with `row_blocks` row blocks and
    /// `chunks` K chunks on `sms` SMs: the smallest token tile that holds the tokens up to 128
    /// (beyond, 256 where that still gives every SM a block, else 128), or half of it where
    /// that launches at least 1.5x the blocks, K splits included, up to one per SM (few row
    /// blocks and short K: H100, `bench/results/kernels-h100-wgmma.json`, 2048 x 1536 at 64
    /// tokens 10.1 us with 32 tokens per block vs 12.5 with 64); each tile with its deep ring.
    pub fn auto(m: usize, row_blocks: usize, chunks: usize, sms: usize) -> Self {
        let fit = match m {
            0..=16 => 16,
            17..=32 => 32,
            33..=64 => 64,
            65..=128 => 128,
            _ if row_blocks * m.div_ceil(256) >= sms => 256,
            _ => 128,
        };
        // The deep ring of a token tile: its shape in WGMMA_CONFIGS with the most stages.
        let deep = |tokens: usize| {
            let stages = WGMMA_CONFIGS
                .iter()
                .filter(|c| c.tokens == tokens)
                .map(|c| c.stages)
                .max()
                .unwrap_or(3);
            WgmmaConfig { tokens, stages }
        };
        let blocks = |c: WgmmaConfig| {
            let (token_blocks, splits) = c.grid(row_blocks, m, chunks, sms);
            (row_blocks * token_blocks * splits as usize).min(sms)
        };
        let whole = deep(fit);
        if fit >= 64 {
            let half = deep(fit / 2);
            if 2 * blocks(half) >= 3 * blocks(whole) {
                return half;
            }
        }
        whole
    }

    /// Token blocks and K splits of a launch over `m` tokens, `row_blocks` row blocks and
    /// `chunks` K chunks on `sms` SMs ([`tiled_splits`]).
    fn grid(self, row_blocks: usize, m: usize, chunks: usize, sms: usize) -> (usize, u32) {
        let token_blocks = m.div_ceil(self.tokens);
        let cells = row_blocks * token_blocks;
        (
            token_blocks,
            tiled_splits(cells, chunks, sms, ROWS * self.tokens),
        )
    }

    /// Bytes of one stage: two 64-element slabs of `tokens` activation rows, the packed weights
    /// and the scale bytes of 128 rows (`wg_stage_bytes`).
    fn stage_bytes(self) -> usize {
        self.tokens * 256 + ROWS * 64 + ROWS * 8
    }

    /// Dynamic shared memory of a block: the stages (which the epilogue reuses for its padded
    /// f32 tile) and 1 KiB to align them to the swizzle's 1024-byte period.
    fn smem_bytes(self) -> u32 {
        let tile = self.tokens * TILE_STRIDE * 4;
        ((self.stages * self.stage_bytes()).max(tile) + 1024) as u32
    }

    /// The kernel of this shape for `format` (None: not one of [`WGMMA_CONFIGS`]).
    fn kernel_name(self, format: Fp4Format) -> Option<&'static str> {
        Some(match (format, self.tokens, self.stages) {
            (Fp4Format::Nvfp4, 16, 8) => "fp4_wg_nv_n16_s8",
            (Fp4Format::Mxfp4, 16, 8) => "fp4_wg_mx_n16_s8",
            (Fp4Format::Nvfp4, 16, 4) => "fp4_wg_nv_n16_s4",
            (Fp4Format::Mxfp4, 16, 4) => "fp4_wg_mx_n16_s4",
            (Fp4Format::Nvfp4, 32, 8) => "fp4_wg_nv_n32_s8",
            (Fp4Format::Mxfp4, 32, 8) => "fp4_wg_mx_n32_s8",
            (Fp4Format::Nvfp4, 32, 4) => "fp4_wg_nv_n32_s4",
            (Fp4Format::Mxfp4, 32, 4) => "fp4_wg_mx_n32_s4",
            (Fp4Format::Nvfp4, 64, 6) => "fp4_wg_nv_n64_s6",
            (Fp4Format::Mxfp4, 64, 6) => "fp4_wg_mx_n64_s6",
            (Fp4Format::Nvfp4, 64, 4) => "fp4_wg_nv_n64_s4",
            (Fp4Format::Mxfp4, 64, 4) => "fp4_wg_mx_n64_s4",
            (Fp4Format::Nvfp4, 128, 4) => "fp4_wg_nv_n128_s4",
            (Fp4Format::Mxfp4, 128, 4) => "fp4_wg_mx_n128_s4",
            (Fp4Format::Nvfp4, 128, 3) => "fp4_wg_nv_n128_s3",
            (Fp4Format::Mxfp4, 128, 3) => "fp4_wg_mx_n128_s3",
            (Fp4Format::Nvfp4, 256, 3) => "fp4_wg_nv_n256_s3",
            (Fp4Format::Mxfp4, 256, 3) => "fp4_wg_mx_n256_s3",
            _ => return None,
        })
    }
}

/// Whether the warpgroup kernels take `w` at `m` tokens: an sm_90 GPU (`wgmma` is
/// Hopper's), one matrix, K a non-zero multiple of 128.
pub fn wgmma_supported(gpu: &GpuContext, w: &GpuFp4Weight, m: usize) -> bool {
    gpu.compute_capability() == (9, 0) && w.experts == 1 && w.k % CHUNK == 0 && w.k > 0 && m > 0
}

/// `y[m, n] = x[m, k] · W[n, k]^T` through the warpgroup kernels (see [`wgmma_supported`]) in
/// the shape [`WgmmaConfig::auto`] picks; same contract as [`super::fp4_gemm`].
pub fn fp4_gemm_wgmma(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let cfg = WgmmaConfig::auto(m, w.n.div_ceil(ROWS), w.k / CHUNK, gpu.sm_count() as usize);
    fp4_gemm_wgmma_with(gpu, w, x, m, y, cfg)
}

/// [`fp4_gemm_wgmma`] in the shape `cfg` (one of [`WGMMA_CONFIGS`]).
pub fn fp4_gemm_wgmma_with(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
    cfg: WgmmaConfig,
) -> Result<(), CudaError> {
    let what = "fp4_gemm_wgmma";
    let name = match cfg.kernel_name(w.format) {
        Some(name) if wgmma_supported(gpu, w, m) => name,
        _ => {
            return Err(CudaError::Shape {
                what: what.into(),
                reason: format!(
                    "{} matrices of [{}, {}] at m = {m} in {cfg:?}: needs an sm_90 GPU, one \
                     matrix, K a multiple of {CHUNK} and one of the shapes of WGMMA_CONFIGS",
                    w.experts, w.n, w.k
                ),
            })
        }
    };
    check_len("fp4_gemm_wgmma: x", x.len(), m * w.k)?;
    check_len("fp4_gemm_wgmma: y", y.len(), m * w.n)?;
    let row_blocks = w.n.div_ceil(ROWS);
    let (token_blocks, splits) = cfg.grid(row_blocks, m, w.k / CHUNK, gpu.sm_count() as usize);
    let launch = LaunchConfig {
        grid_dim: (row_blocks as u32, splits, token_blocks as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: cfg.smem_bytes(),
    };
    let f = gpu.function(name)?;
    launch_split_product(gpu, &f, launch, w, (x, m, y), "launch fp4_gemm_wgmma")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Static shared memory of the kernels as ptxas reports it for sm_90a (`-v`): the 512-byte
    /// scale table, the warps' multiplier tables (8 x 16 x 3 x 16 bytes) and the split
    /// reduction's flag, aligned.
    const STATIC_SMEM: usize = 7168;

    #[test]
    fn shared_memory_fits_a_hopper_block_and_holds_the_tile() {
        for cfg in WGMMA_CONFIGS {
            // 227 KiB per block, less what the kernel declares statically.
            assert!(
                cfg.smem_bytes() as usize + STATIC_SMEM <= 227 * 1024,
                "{cfg:?}"
            );
            assert!(
                cfg.stages * cfg.stage_bytes() >= cfg.tokens * TILE_STRIDE * 4,
                "{cfg:?}"
            );
            assert!(cfg.stages >= 3, "{cfg:?}");
            // Each stage starts on the swizzle's 1024-byte period.
            assert_eq!(cfg.stage_bytes() % 1024, 0, "{cfg:?}");
            assert!(cfg.kernel_name(Fp4Format::Mxfp4).is_some());
        }
        let odd = WgmmaConfig {
            tokens: 48,
            stages: 4,
        };
        assert!(odd.kernel_name(Fp4Format::Nvfp4).is_none());
        // The shallow rings' shared memory lets two blocks share an SM (228 KiB, 1 KiB reserved
        // per block).
        for cfg in WGMMA_CONFIGS
            .iter()
            .filter(|c| c.stages == 4 && c.tokens <= 64)
        {
            assert!(
                2 * (cfg.smem_bytes() as usize + 512 + 1024) <= 228 * 1024,
                "{cfg:?}"
            );
        }
    }

    #[test]
    fn auto_shapes_cover_the_tokens_and_fill_the_gpu() {
        // (K, N) -> (row blocks, chunks)
        let tokens =
            |m, k: usize, n: usize| WgmmaConfig::auto(m, n.div_ceil(ROWS), k / CHUNK, 132).tokens;
        assert_eq!(tokens(1, 4096, 14336), 16);
        assert_eq!(tokens(17, 4096, 14336), 32);
        assert_eq!(tokens(64, 4096, 14336), 64);
        assert_eq!(tokens(100, 4096, 14336), 128);
        // 14336 x 4096 (32 row blocks): K splits fill the GPU at 64 and 128 tokens per block.
        assert_eq!(tokens(64, 14336, 4096), 64);
        assert_eq!(tokens(128, 14336, 4096), 128);
        assert_eq!(tokens(128, 4096, 4096), 128);
        // Few row blocks and short K: half the tile, twice the blocks (the H100 rows above).
        assert_eq!(tokens(64, 2048, 1536), 32);
        assert_eq!(tokens(128, 2048, 1536), 64);
        assert_eq!(tokens(64, 768, 2048), 32);
        assert_eq!(tokens(128, 768, 2048), 64);
        // 2048 tokens of 4096 x 14336: 112 row blocks x 8 token blocks of 256.
        assert_eq!(tokens(2048, 4096, 14336), 256);
        for m in [1, 16, 33, 200, 5000] {
            let cfg = WgmmaConfig::auto(m, 40, 16, 132);
            assert!(WGMMA_CONFIGS.contains(&cfg), "m {m}: {cfg:?}");
        }
    }

    #[test]
    fn the_output_tile_is_free_of_bank_conflicts() {
        // fp4_wgmma.cu's epilogue: lane (g, t) of warp w stores token 8j + 2t (+1), local row
        // 64 (w / 4) + 16 (w % 4) + g (+8) at token * TILE_STRIDE + row.
        for w in 0..8 {
            for (dt, dr) in [(0, 0), (1, 0), (0, 8), (1, 8)] {
                let mut banks: Vec<usize> = (0..32)
                    .map(|lane| {
                        let (g, t) = (lane / 4, lane % 4);
                        let row = 64 * (w / 4) + 16 * (w % 4) + g + dr;
                        ((2 * t + dt) * TILE_STRIDE + row) % 32
                    })
                    .collect();
                banks.sort_unstable();
                banks.dedup();
                assert_eq!(banks.len(), 32, "warp {w} dt={dt} dr={dr}");
            }
        }
    }

    #[test]
    fn the_weight_units_a_warp_reads_at_once_hit_distinct_bank_groups() {
        // Unit u of local row r sits at r * 64 + (u ^ ((r >> 1) & 3)) * 16; the 8 rows g of a
        // warp's quads (16-row aligned base) read the same u together.
        for base in [0usize, 16, 64, 112] {
            for u in 0..4 {
                let mut groups: Vec<usize> = (0..8)
                    .map(|g| {
                        let r = base + g;
                        ((r * 64 + ((u ^ ((r >> 1) & 3)) * 16)) / 16) % 8
                    })
                    .collect();
                groups.sort_unstable();
                groups.dedup();
                assert_eq!(groups.len(), 8, "base {base} unit {u}");
            }
        }
    }
}
