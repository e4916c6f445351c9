//! The nucleus (top-p) threshold rule of the GPU sampler, as a CPU reference.
//!
//! The CUDA decode step (crates/runtime/cuda/ops.cu: `topp_histogram`, `topp_threshold`, then
//! `argmax_next`) computes exactly this, bit for bit, so the GPU tests compare against it.
//!
//! The rule, for one row of bf16 logits at temperature `T` (`inv_t = 1 / T` in f32, as in
//! `cuda::sampling_words`) and `top_p < 1`:
//!
//! 1. Every logit gets an order-preserving 16-bit key ([`logit_key`]): a larger logit has a
//!    larger key, equal logits the same key. NaN counts as -inf; -0 as +0.
//! 2. Each key's mass is `count * floor(w * 2^32)` with `w = exp((value - vmax) * inv_t)`
//!    ([`det_exp`], in f64), `vmax` the value of the highest key present; the highest key gets
//!    `w = 1` exactly, and `w < 2^-32` (the exponent below -23) counts 0. The masses are
//!    integers, so every summation order gives the same sum `S` (no float atomics needed).
//! 3. The threshold is the highest key whose running mass from the top (that key included)
//!    reaches `top_p * S` (compared in f64, exactly: the running sums stay below 2^53).
//!
//! The nucleus is every token whose key is at least the threshold: tokens of equal logit value
//! are all in or all out. The host `generate::Sampler` ranks single tokens and breaks ties by
//! id, so the two differ only where ties straddle the boundary (the GPU keeps the whole tie).
//! Masses are quantized to 2^-32 of the top token's mass, so boundary decisions agree with the
//! exact real-number rule to about 1e-9 relative; tokens below `2^-32` of the top token's
//! weight never enter a nucleus of `top_p < 1`.
//!
//! Temperature 0 (greedy) and `top_p >= 1` keep every token: threshold 0.

use super::GenerateError;

/// Keys (and histogram bins per row): one per bf16 bit pattern.
pub const KEYS: usize = 1 << 16;

/// The largest vocabulary the rule takes: its mass sums must stay below 2^53 (exact in f64).
pub const MAX_VOCAB: usize = 1 << 21;

/// Fixed-point scale of a key's weight: `floor(w * 2^32)`.
const MASS_ONE: f64 = 4294967296.0;

/// Exponents below this give a weight under 2^-32: mass 0 without evaluating the exponential.
const MIN_EXPONENT: f64 = -23.0;

/// Order-preserving key of a bf16 logit given by its bits: for values `a < b`,
/// `logit_key(a) < logit_key(b)`; equal values share a key (-0 maps to +0's key); NaN maps to
/// the key of -inf.
pub fn logit_key(bits: u16) -> u16 {
    let bits = if bits & 0x7FFF > 0x7F80 {
        0xFF80 // NaN -> -inf
    } else if bits == 0x8000 {
        0 // -0 -> +0
    } else {
        bits
    };
    if bits & 0x8000 != 0 {
        !bits
    } else {
        bits | 0x8000
    }
}

/// The logit value of a key (the inverse of [`logit_key`] on canonical values).
pub fn key_value(key: u16) -> f32 {
    let bits = if key & 0x8000 != 0 {
        key & 0x7FFF
    } else {
        !key
    };
    half::bf16::from_bits(bits).to_f32()
}

/// `exp(x)` for `x` in [-23, 0] from correctly rounded f64 operations only (multiply, divide,
/// fused multiply-add, round-half-even), so the GPU's copy of it gives the same bits:
/// `x = n ln2 + r` (Cody-Waite), a degree-12 Taylor series of `e^r` in Horner form, times
/// `2^n`. Relative error below 1e-15 on that range.
pub fn det_exp(x: f64) -> f64 {
    let log2e = f64::from_bits(0x3FF7_1547_652B_82FE);
    let ln2_hi = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    let ln2_lo = f64::from_bits(0x3DEA_39EF_3579_3C76);
    let n = (x * log2e).round_ties_even();
    let r = (-n).mul_add(ln2_hi, x);
    let r = (-n).mul_add(ln2_lo, r);
    let mut p = 1.0f64;
    for k in (1..=12).rev() {
        p = (r / k as f64).mul_add(p, 1.0);
    }
    // 2^n exactly (n >= -34 on the domain).
    p * f64::from_bits(((1023 + n as i64) as u64) << 52)
}

/// The mass of `count` tokens of key `key` in a row whose highest key is `kmax`, at inverse
/// temperature `inv_t` (see the module doc).
pub fn key_mass(key: u16, count: u32, kmax: u16, inv_t: f32) -> u64 {
    if count == 0 {
        return 0;
    }
    if key == kmax {
        return (count as u64) << 32;
    }
    let d = (key_value(key) as f64 - key_value(kmax) as f64) * inv_t as f64;
    if d.is_nan() || d < MIN_EXPONENT {
        return 0; // also -inf logits below a finite maximum, and anything below +inf
    }
    count as u64 * (det_exp(d) * MASS_ONE) as u64
}

/// The `inv_t` the device sampler uses for a temperature (0: greedy).
pub fn inverse_temperature(temperature: f32) -> f32 {
    if temperature > 0.0 {
        1.0 / temperature
    } else {
        0.0
    }
}

/// The threshold key of a row from its key histogram (`hist[key]` = tokens with that key,
/// `KEYS` entries): tokens with a key `>= ` the result form the nucleus. 0 (every token) for
/// `inv_t == 0`, `top_p >= 1`, an empty row or a row of only -inf/NaN.
pub fn threshold_from_histogram(hist: &[u32], inv_t: f32, top_p: f32) -> u16 {
    let Some(kmax) = (0..hist.len().min(KEYS)).rev().find(|&k| hist[k] != 0) else {
        return 0;
    };
    let kmax = kmax as u16;
    if !(top_p < 1.0 && inv_t > 0.0) || key_value(kmax) == f32::NEG_INFINITY {
        return 0;
    }
    let masses: Vec<u64> = (0..=kmax)
        .map(|k| key_mass(k, hist[k as usize], kmax, inv_t))
        .collect();
    let total: u64 = masses.iter().sum();
    let target = total as f64 * top_p as f64;
    let mut running = 0u64;
    for k in (0..=kmax).rev() {
        running += masses[k as usize];
        if running as f64 >= target {
            return k;
        }
    }
    0
}

/// The threshold key of one row of bf16 logits (given by their bits) at `temperature` and
/// `top_p` (see the module doc). Errors for a row longer than [`MAX_VOCAB`].
pub fn threshold_key(logits: &[u16], temperature: f32, top_p: f32) -> Result<u16, GenerateError> {
    if logits.len() > MAX_VOCAB {
        return Err(GenerateError::Params(format!(
            "a vocabulary of {} for nucleus sampling (at most {MAX_VOCAB})",
            logits.len()
        )));
    }
    let mut hist = vec![0u32; KEYS];
    for &b in logits {
        hist[logit_key(b) as usize] += 1;
    }
    Ok(threshold_from_histogram(
        &hist,
        inverse_temperature(temperature),
        top_p,
    ))
}

/// Whether token `id` of a row is in the nucleus of threshold `thr`.
pub fn in_nucleus(logits: &[u16], id: usize, thr: u16) -> bool {
    logits.get(id).is_some_and(|&b| logit_key(b) >= thr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn bits(x: f32) -> u16 {
        half::bf16::from_f32(x).to_bits()
    }

    fn key(x: f32) -> u16 {
        logit_key(bits(x))
    }

    #[test]
    fn keys_preserve_order_and_merge_equal_values() {
        let mut xs: Vec<f32> = (0..=u16::MAX)
            .map(|b| half::bf16::from_bits(b).to_f32())
            .filter(|x| !x.is_nan())
            .collect();
        xs.sort_by(f32::total_cmp);
        for w in xs.windows(2) {
            let (a, b) = (key(w[0]), key(w[1]));
            if w[0] == w[1] {
                assert_eq!(a, b, "{} and {}", w[0], w[1]);
            } else {
                assert!(a < b, "{} -> {a:#x}, {} -> {b:#x}", w[0], w[1]);
            }
            assert_eq!(key_value(a), w[0]);
        }
        assert_eq!(key(-0.0), key(0.0));
        assert_eq!(logit_key(0x7FC1), key(f32::NEG_INFINITY), "NaN is -inf");
        assert_eq!(logit_key(0xFFC0), key(f32::NEG_INFINITY), "-NaN is -inf");
        assert_eq!(key_value(key(f32::INFINITY)), f32::INFINITY);
        assert_eq!(key_value(key(-3.5)), -3.5);
    }

    #[test]
    fn det_exp_is_exp_on_its_domain() {
        let mut g = ChaCha8Rng::seed_from_u64(1);
        let mut worst = 0.0f64;
        for i in 0..20000 {
            let x = if i < 100 {
                -(i as f64) * 0.23
            } else {
                -23.0 * g.random::<f64>()
            };
            let (got, want) = (det_exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-15, "relative error {worst:e}");
        assert_eq!(det_exp(0.0), 1.0);
    }

    /// The threshold by the sorted definition over single tokens with f64 weights
    /// `exp((l - max) / T)`: the smallest logit value `v` such that the tokens with logit
    /// `>= v` hold at least top_p of the mass, returned as its key.
    fn sorted_threshold(logits: &[u16], t: f32, top_p: f32) -> (u16, Vec<(f32, f64)>) {
        let vals: Vec<f32> = logits.iter().map(|&b| key_value(logit_key(b))).collect();
        let max = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = inverse_temperature(t) as f64;
        let mut w: Vec<(f32, f64)> = vals
            .iter()
            .map(|&v| {
                let e = if v == max {
                    1.0
                } else {
                    ((v as f64 - max as f64) * inv_t).exp()
                };
                (v, e)
            })
            .collect();
        w.sort_by(|a, b| b.0.total_cmp(&a.0));
        let total: f64 = w.iter().map(|x| x.1).sum();
        let mut acc = 0.0;
        for i in 0..w.len() {
            acc += w[i].1;
            let last_of_value = i + 1 == w.len() || w[i + 1].0 != w[i].0;
            if last_of_value && acc >= top_p as f64 * total {
                return (key(w[i].0), w);
            }
        }
        (0, w)
    }

    #[test]
    fn hand_made_cases() {
        let row = |xs: &[f32]| xs.iter().map(|&x| bits(x)).collect::<Vec<u16>>();
        // Tiny top_p: only the top key.
        let l = row(&[1.0, 3.0, 2.0, 3.0, -1.0]);
        assert_eq!(threshold_key(&l, 1.0, 1e-6).unwrap(), key(3.0));
        // Ties at the boundary are all in: mass of the two 3.0 tokens is 2/(2 + e^-1 + ...);
        // asking for a bit more than one of them keeps both (and nothing below).
        let t = threshold_key(&l, 1.0, 0.3).unwrap();
        assert_eq!(t, key(3.0));
        let kept: Vec<usize> = (0..l.len()).filter(|&i| in_nucleus(&l, i, t)).collect();
        assert_eq!(kept, vec![1, 3]);
        // Slightly more than the two top tokens' share pulls in the 2.0 token.
        let e = |x: f64| x.exp();
        let s = 2.0 + e(-1.0) + e(-2.0) + e(-4.0);
        let share = (2.0 / s) as f32;
        assert_eq!(threshold_key(&l, 1.0, share * 0.999).unwrap(), key(3.0));
        assert_eq!(threshold_key(&l, 1.0, share * 1.001).unwrap(), key(2.0));
        // top_p 1 and temperature 0 keep every token (callers use neither on the device).
        assert_eq!(threshold_key(&l, 1.0, 1.0).unwrap(), 0);
        assert_eq!(threshold_key(&l, 0.0, 0.5).unwrap(), 0);
        // All logits equal: one key holds everything; any top_p keeps the whole row.
        let flat = row(&[0.5; 9]);
        for p in [1e-3f32, 0.5, 0.999] {
            assert_eq!(threshold_key(&flat, 0.7, p).unwrap(), key(0.5));
        }
        // -inf and NaN never enter when a finite logit exists.
        let mut l = row(&[f32::NEG_INFINITY, 0.0, -1.0, f32::NEG_INFINITY]);
        l.push(0x7FC0); // NaN
        let t = threshold_key(&l, 1.0, 0.999).unwrap();
        assert_eq!(t, key(-1.0));
        assert!(!in_nucleus(&l, 0, t) && !in_nucleus(&l, 4, t));
        // A row of only -inf / NaN: nothing to choose, threshold 0.
        let dead = vec![bits(f32::NEG_INFINITY), 0x7FC0, 0xFFC1];
        assert_eq!(threshold_key(&dead, 1.0, 0.5).unwrap(), 0);
        // +inf dominates: only the +inf tokens.
        let l = row(&[f32::INFINITY, 5.0, f32::INFINITY]);
        assert_eq!(threshold_key(&l, 1.0, 0.999).unwrap(), key(f32::INFINITY));
        // Tokens more than 23 T below the top weigh 0: not in a nucleus even at top_p ~ 1.
        let l = row(&[0.0, -30.0]);
        assert_eq!(threshold_key(&l, 1.0, 0.9999999).unwrap(), key(0.0));
        // An empty row and an oversized one.
        assert_eq!(threshold_key(&[], 1.0, 0.5).unwrap(), 0);
        assert!(threshold_key(&vec![0u16; MAX_VOCAB + 1], 1.0, 0.5).is_err());
    }

    /// Random rows against the sorted definition: the same key except where the running mass
    /// at the boundary is within the quantization (1e-9 relative) of the target.
    #[test]
    fn threshold_matches_the_sorted_definition() {
        let mut g = ChaCha8Rng::seed_from_u64(7);
        let mut compared = 0;
        for case in 0..300 {
            let v = [5usize, 40, 1000, 20000][case % 4];
            let spread = [0.5f32, 3.0, 12.0][case % 3];
            let t = [0.3f32, 0.7, 1.0, 1.8][case % 4];
            let top_p = [0.01f32, 0.3, 0.8, 0.95, 0.999][case % 5];
            let l: Vec<u16> = (0..v)
                .map(|i| {
                    // a few repeated values make ties; some -inf
                    if i % 13 == 0 {
                        bits(1.0)
                    } else if i % 101 == 7 {
                        bits(f32::NEG_INFINITY)
                    } else {
                        let u: f32 = g.random::<f32>() * 2.0 - 1.0;
                        bits(u * spread)
                    }
                })
                .collect();
            let got = threshold_key(&l, t, top_p).unwrap();
            let (want, w) = sorted_threshold(&l, t, top_p);
            if got == want {
                compared += 1;
                continue;
            }
            // Disagreement only where the boundary is within rounding of the target.
            let total: f64 = w.iter().map(|x| x.1).sum();
            let above = |k: u16| -> f64 {
                w.iter().filter(|x| key(x.0) >= k).map(|x| x.1).sum::<f64>() / total
            };
            let lo = above(got.max(want)) - top_p as f64;
            assert!(
                lo.abs() < 1e-6,
                "case {case}: key {got:#x} vs sorted {want:#x} (share {} vs top_p {top_p})",
                above(got.max(want))
            );
        }
        eprintln!("{compared} of 300 rows agree exactly with the sorted definition");
        assert!(compared >= 295, "only {compared} of 300 agreed exactly");
    }

    /// The nucleus is the smallest set of whole keys from the top reaching top_p: dropping the
    /// threshold key falls short, keeping it reaches (checked on the integer masses).
    #[test]
    fn threshold_is_the_first_key_reaching_top_p() {
        let mut g = ChaCha8Rng::seed_from_u64(9);
        for case in 0..50 {
            let l: Vec<u16> = (0..3000)
                .map(|_| bits((g.random::<f32>() - 0.5) * 16.0))
                .collect();
            let (t, top_p) = (0.5 + case as f32 * 0.05, 0.05 + case as f32 * 0.018);
            let thr = threshold_key(&l, t, top_p).unwrap();
            let mut hist = vec![0u32; KEYS];
            for &b in &l {
                hist[logit_key(b) as usize] += 1;
            }
            let kmax = (0..KEYS).rev().find(|&k| hist[k] != 0).unwrap() as u16;
            let inv_t = inverse_temperature(t);
            let mass = |k: usize| key_mass(k as u16, hist[k], kmax, inv_t);
            let total: u64 = (0..KEYS).map(mass).sum();
            let above: u64 = (thr as usize + 1..KEYS).map(mass).sum();
            let target = total as f64 * top_p as f64;
            assert!(hist[thr as usize] > 0);
            assert!((above as f64) < target);
            assert!(((above + mass(thr as usize)) as f64) >= target);
        }
    }
}
