//! FP4 weights on the GPU: one Linear layer or a stack of experts of one shape.

use cudarc::driver::{CudaSlice, CudaStream, LaunchArgs, PushKernelArg};

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::l2::L2Ranges;
use crate::fp4::{Fp4Format, Fp4Matrix};

/// Packed FP4 weights on the device, in the `Fp4Matrix` layout, for `experts` matrices of
/// `[n, k]` stored back to back (`experts == 1` for a dense layer).
pub struct GpuFp4Weight {
    /// NVFP4 or MXFP4.
    pub format: Fp4Format,
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns), a multiple of 32.
    pub k: usize,
    /// Number of stacked matrices.
    pub experts: usize,
    /// Packed weights, every 32-bit word re-packed by [`repack_word`].
    pub(crate) packed: CudaSlice<u8>,
    pub(crate) scales: CudaSlice<u8>,
    pub(crate) global_scales: CudaSlice<f32>,
    /// Block-scale multipliers of the GEMM kernels: bf16 of `scale * 2^(126 - A)` per byte.
    pub(crate) mult_lut: CudaSlice<u16>,
    /// `2^A`, applied to the f32 sums (see [`scale_shift`]).
    pub(crate) post: f32,
}

/// Bit position of magnitude bit 0 and of the sign of each element pair in the low half of a
/// re-packed word (the pair's second element sits 16 bits higher). Must match
/// `e2m1x8_to_bf16` in fp4_gemm.cu.
const PAIR_BITS: [(u32, u32); 4] = [(6, 15), (0, 9), (3, 13), (10, 14)];

/// Re-packs one little-endian word of 8 E2M1 codes (element 2i in the low nibble of byte i)
/// into the device layout: element `2p + h` of pair `p` has its magnitude bits at
/// `PAIR_BITS[p].0 + 16h ..= +2` and its sign at `PAIR_BITS[p].1 + 16h`, so the kernels turn
/// a pair into a bf16x2 word with one or two shifts and masks.
pub(crate) fn repack_word(w: u32) -> u32 {
    let mut out = 0u32;
    for j in 0..8u32 {
        let code = (w >> (4 * j)) & 0xF;
        let (m0, sign) = PAIR_BITS[(j / 2) as usize];
        let off = 16 * (j % 2);
        out |= (code & 7) << (m0 + off);
        out |= (code >> 3) << (sign + off);
    }
    out
}

/// The device decode of one re-packed word (the formulas of `e2m1x8_to_bf16`), as the
/// bf16 bit patterns of `e2m1 * 2^-126` of elements 0..8. Used by the tests.
#[cfg(test)]
fn decode_repacked_word(q: u32) -> [u16; 8] {
    const PAIR: u32 = 0x81C0_81C0;
    const MAG: u32 = 0x01C0_01C0;
    const SIGN: u32 = 0x8000_8000;
    let p = [
        q & PAIR,
        (q << 6) & PAIR,
        ((q << 3) & MAG) | ((q << 2) & SIGN),
        ((q >> 4) & MAG) | ((q << 1) & SIGN),
    ];
    let mut out = [0u16; 8];
    for (i, v) in p.iter().enumerate() {
        out[2 * i] = (v & 0xFFFF) as u16;
        out[2 * i + 1] = (v >> 16) as u16;
    }
    out
}

/// The exponent `A` of the GEMM kernels' scale multipliers `scale * 2^(126 - A)`: the decoded
/// E2M1 value is `e2m1 * 2^-126`, so the bf16 product with the multiplier is
/// `e2m1 * scale * 2^-A` (exact: at most 6 significant bits), and the f32 sums are multiplied
/// by `2^A` at the end. NVFP4: A = 8 keeps every E4M3 multiplier (<= 448 * 2^118) and every
/// product (>= 0.5 * 2^-9 * 2^-8) inside bf16's normal range. MXFP4: A = 8 unless the largest
/// finite E8M0 scale byte present would overflow, then A grows with it.
pub(crate) fn scale_shift(format: Fp4Format, scales: &[u8]) -> i32 {
    match format {
        Fp4Format::Nvfp4 => 8,
        Fp4Format::Mxfp4 => {
            let max_e = scales
                .iter()
                .copied()
                .filter(|&c| c != 255)
                .max()
                .unwrap_or(0) as i32;
            // multiplier 2^(E - 127 + 126 - A) <= 2^125, so 6 * multiplier stays finite.
            8.max(max_e - 126)
        }
    }
}

/// bf16 bits of `scale * 2^(126 - shift)` for every scale byte (computed in f64: exact, as
/// E4M3 and E8M0 values times a power of two fit bf16 unless they leave its range).
pub(crate) fn mult_lut(format: Fp4Format, shift: i32) -> Vec<u16> {
    (0..=255u8)
        .map(|c| {
            let v = format.decode_scale(c) as f64 * 2f64.powi(126 - shift);
            half::bf16::from_f64(v).to_bits()
        })
        .collect()
}

impl GpuFp4Weight {
    /// Pushes the weight's four kernel arguments in the order the FP4 GEMM and MoE kernels take
    /// them (`wp, ws, gs, lut`: packed weights, scale bytes, global scales, scale multipliers).
    /// The dequantization and FP8 conversion kernels take the plain scale table instead.
    pub(crate) fn push_args<'a, 'b>(&'a self, b: &'b mut LaunchArgs<'a>) -> &'b mut LaunchArgs<'a> {
        b.arg(&self.packed)
            .arg(&self.scales)
            .arg(&self.global_scales)
            .arg(&self.mult_lut)
    }

    /// Uploads one matrix. `name` is used in errors.
    pub fn upload(gpu: &GpuContext, name: &str, m: &Fp4Matrix) -> Result<Self, CudaError> {
        Self::upload_experts(gpu, name, std::slice::from_ref(m))
    }

    /// Uploads a stack of matrices of one format and shape (MoE experts).
    pub fn upload_experts(
        gpu: &GpuContext,
        name: &str,
        ms: &[Fp4Matrix],
    ) -> Result<Self, CudaError> {
        let first = ms.first().ok_or_else(|| CudaError::Shape {
            what: name.to_string(),
            reason: "no matrices".into(),
        })?;
        for (e, m) in ms.iter().enumerate() {
            m.validate().map_err(|source| CudaError::Fp4 {
                name: format!("{name}[{e}]"),
                source,
            })?;
            if m.format != first.format || m.n != first.n || m.k != first.k {
                return Err(CudaError::Mismatch {
                    what: "upload_experts",
                    reason: format!(
                        "{name}[{e}] is {} [{}, {}], {name}[0] is {} [{}, {}]",
                        m.format, m.n, m.k, first.format, first.n, first.k
                    ),
                });
            }
        }
        check_shape(name, first.n, first.k)?;
        let packed: Vec<u8> = ms.iter().flat_map(|m| m.packed.iter().copied()).collect();
        let scales: Vec<u8> = ms.iter().flat_map(|m| m.scales.iter().copied()).collect();
        let gs: Vec<f32> = ms.iter().map(|m| m.global_scale).collect();
        Self::from_parts(
            gpu,
            first.format,
            first.n,
            first.k,
            ms.len(),
            &packed,
            &scales,
            &gs,
        )
    }

    /// Uploads raw buffers in the `Fp4Matrix` layout (benchmarks build them directly).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        gpu: &GpuContext,
        format: Fp4Format,
        n: usize,
        k: usize,
        experts: usize,
        packed: &[u8],
        scales: &[u8],
        global_scales: &[f32],
    ) -> Result<Self, CudaError> {
        check_shape("weight", n, k)?;
        let want = (
            n * k / 2 * experts,
            n * (k / format.block_size()) * experts,
            experts,
        );
        if (packed.len(), scales.len(), global_scales.len()) != want {
            return Err(CudaError::Mismatch {
                what: "GpuFp4Weight::from_parts",
                reason: format!(
                    "buffers of {}, {}, {} elements; [{n}, {k}] x {experts} needs {}, {}, {}",
                    packed.len(),
                    scales.len(),
                    global_scales.len(),
                    want.0,
                    want.1,
                    want.2
                ),
            });
        }
        let shift = scale_shift(format, scales);
        // Rows are whole words (k % 32 == 0), so re-packing word by word keeps every row and
        // every 16-byte load in place; only the bits inside a word move.
        let repacked: Vec<u8> = packed
            .chunks_exact(4)
            .flat_map(|c| repack_word(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
            .collect();
        let s = gpu.stream();
        Ok(GpuFp4Weight {
            format,
            n,
            k,
            experts,
            packed: s
                .clone_htod(&repacked)
                .map_err(drv("upload packed weights"))?,
            mult_lut: s
                .clone_htod(&mult_lut(format, shift))
                .map_err(drv("upload scale multipliers"))?,
            post: 2f32.powi(shift),
            scales: s.clone_htod(scales).map_err(drv("upload scales"))?,
            global_scales: s
                .clone_htod(global_scales)
                .map_err(drv("upload global scales"))?,
        })
    }

    /// Bytes of one expert's packed weights plus block scales (what a GEMV must read).
    pub fn bytes_per_matrix(&self) -> usize {
        self.n * self.k / 2 + self.n * (self.k / self.format.block_size())
    }

    /// Bytes of one row's packed weights plus block scales.
    pub fn bytes_per_row(&self) -> usize {
        self.k / 2 + self.k / self.format.block_size()
    }

    /// Adds rows `[row0, row0 + rows)` of the first matrix (clamped to `n`), packed weights and
    /// scales, to `r` for an L2 prefetch. Returns the bytes added (0 where `r` had too few
    /// free slots: nothing is added then).
    pub fn push_l2_rows(
        &self,
        stream: &CudaStream,
        r: &mut L2Ranges,
        row0: usize,
        rows: usize,
    ) -> usize {
        let rows = rows.min(self.n.saturating_sub(row0));
        let (wb, sb) = (self.k / 2, self.k / self.format.block_size());
        let mut tried = *r;
        if rows == 0
            || !tried.push(stream, &self.packed, row0 * wb, rows * wb)
            || !tried.push(stream, &self.scales, row0 * sb, rows * sb)
        {
            return 0;
        }
        *r = tried;
        rows * (wb + sb)
    }
}

fn check_shape(name: &str, n: usize, k: usize) -> Result<(), CudaError> {
    let bad = |reason: String| {
        Err(CudaError::Shape {
            what: name.to_string(),
            reason,
        })
    };
    if n == 0 || k == 0 {
        return bad(format!("[{n}, {k}] is empty"));
    }
    if k % 32 != 0 {
        // 16-byte loads of packed rows need rows aligned to 16 bytes.
        return bad(format!("k = {k} is not a multiple of 32"));
    }
    if n > i32::MAX as usize || k > i32::MAX as usize || n.checked_mul(k).is_none() {
        return bad(format!("[{n}, {k}] is too large"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2m1;

    /// Every code in every element slot decodes, through the device formulas, to
    /// `e2m1 * 2^-126` (as a bf16 subnormal), on random words (seeded, printed).
    #[test]
    fn repacked_words_decode_to_e2m1() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        eprintln!("seed {seed}");
        let mut x = seed;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = x as u32;
            let got = decode_repacked_word(repack_word(w));
            for (j, bits) in got.iter().enumerate() {
                let code = ((w >> (4 * j)) & 0xF) as u8;
                let v = f32::from_bits((*bits as u32) << 16) as f64 * 2f64.powi(126);
                let want = e2m1::decode(code) as f64;
                assert!(
                    v == want && (v != 0.0 || (bits >> 15) as u8 == code >> 3),
                    "word {w:#010x} element {j}: code {code:#x} decoded {v}, want {want}"
                );
            }
        }
    }

    #[test]
    fn multipliers_stay_finite_and_exact() {
        for format in [Fp4Format::Nvfp4, Fp4Format::Mxfp4] {
            let all: Vec<u8> = (0..=254).collect();
            let a = scale_shift(format, &all);
            let lut = mult_lut(format, a);
            for c in 0..=254u8 {
                let s = format.decode_scale(c) as f64;
                if !s.is_finite() {
                    continue;
                }
                let m = half::bf16::from_bits(lut[c as usize]).to_f64();
                assert!(m.is_finite(), "{format} code {c}: multiplier {m}");
                if s > 0.0 && m > 0.0 {
                    // a power-of-two shift of the scale, unless it fell below bf16's range
                    assert_eq!(m / s, 2f64.powi(126 - a), "{format} code {c}");
                }
            }
            assert!(format != Fp4Format::Nvfp4 || a == 8);
        }
        assert_eq!(scale_shift(Fp4Format::Mxfp4, &[127, 130, 255]), 8);
        assert_eq!(scale_shift(Fp4Format::Mxfp4, &[200]), 74);
    }
}
