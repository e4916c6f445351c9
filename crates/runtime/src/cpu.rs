//! CPU building blocks of the decoder: RMSNorm, RoPE, causal GQA attention over a KV cache,
//! SwiGLU and softmax. All f32, each written to mirror the transformers reference op order.

use rayon::prelude::*;

use crate::config::{RopeConfig, RopeScaling};

/// RMSNorm in place over rows of `x` (row length `w.len()`): `x * rsqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f64) {
    let d = w.len();
    for row in x.chunks_exact_mut(d) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps as f32).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    }
}

/// Precomputed rotary frequencies.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Inverse frequencies, rotary_dim / 2 of them.
    pub inv_freq: Vec<f32>,
    /// Multiplier of cos/sin (YaRN), 1 otherwise.
    pub attention_factor: f32,
    /// Leading dimensions of each head that are rotated.
    pub rotary_dim: usize,
}

impl Rope {
    /// Frequencies as transformers' `ROPE_INIT_FUNCTIONS` computes them (f32 base powers).
    pub fn new(cfg: &RopeConfig) -> Rope {
        let dim = cfg.rotary_dim;
        let base = cfg.theta as f32;
        // pos_freqs[i] = base ** (2i / dim), in f32 as torch does.
        let pos_freqs: Vec<f32> = (0..dim / 2)
            .map(|i| base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let plain: Vec<f32> = pos_freqs.iter().map(|p| 1.0 / p).collect();
        let (inv_freq, attention_factor) = match &cfg.scaling {
            RopeScaling::None => (plain, 1.0),
            RopeScaling::Linear { factor } => {
                (plain.iter().map(|f| f / *factor as f32).collect(), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, lo, hi, old) = (
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_position_embeddings,
                );
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                let f = plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                        let scaled = if wavelen > low_wavelen {
                            f as f64 / factor
                        } else {
                            f as f64
                        };
                        // Frequencies are finite, so "neither short nor long" is the closed interval.
                        let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                        if medium {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect();
                (f, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let af = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let base64 = cfg.theta;
                let corr = |rot: f64| {
                    (dim as f64
                        * (original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * base64.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let f = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let ramp =
                            ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extra_factor = 1.0 - ramp;
                        let extrapolation = 1.0 / p;
                        let interpolation = 1.0 / (*factor as f32 * p);
                        interpolation * (1.0 - extra_factor) + extrapolation * extra_factor
                    })
                    .collect();
                (f, af as f32)
            }
        };
        Rope {
            inv_freq,
            attention_factor,
            rotary_dim: dim,
        }
    }

    /// Rotates one head vector `x` (length >= rotary_dim) at `pos`, rotate-half convention.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.rotary_dim / 2;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = pos as f32 * f;
            let (sin, cos) = angle.sin_cos();
            let (c, s) = (cos * self.attention_factor, sin * self.attention_factor);
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * c - b * s;
            x[i + half] = b * c + a * s;
        }
    }
}

/// `silu(gate) * up`, in place into `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + (-*g).exp());
        *g = s * u;
    }
}

/// Softmax in place (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Log-softmax of one row into a new vector.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = x.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    x.iter().map(|v| v - lse).collect()
}

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Sliding window (keys with `q_pos - k_pos >= window` are masked).
    pub window: Option<usize>,
}

/// Causal attention of `m` new queries at positions `start..start+m` over the cached keys and
/// values `[0, start+m)` (already including the new ones). `q` is `[m, heads, d]`, keys/values
/// `[len, kv_heads, d]`; returns `[m, heads, d]`. Parallel over (query, head) pairs, each
/// computed by one thread in a fixed order.
pub fn attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    start: usize,
    m: usize,
    s: AttnShape,
) -> Vec<f32> {
    let (h, kvh, d) = (s.num_heads, s.num_kv_heads, s.head_dim);
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0f32; m * h * d];
    out.par_chunks_mut(d).enumerate().for_each(|(idx, o)| {
        let (i, head) = (idx / h, idx % h);
        let kv = head / group;
        let pos = start + i;
        let lo = match s.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        let qv = &q[(i * h + head) * d..(i * h + head + 1) * d];
        let mut scores: Vec<f32> = (lo..=pos)
            .map(|j| {
                crate::linear::dot(qv, &keys[(j * kvh + kv) * d..(j * kvh + kv + 1) * d]) * scale
            })
            .collect();
        softmax(&mut scores);
        for (p, j) in scores.iter().zip(lo..=pos) {
            let vv = &values[(j * kvh + kv) * d..(j * kvh + kv + 1) * d];
            for (ov, x) in o.iter_mut().zip(vv) {
                *ov += p * x;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rms() {
        let mut x = vec![3.0f32, -4.0, 0.0, 5.0];
        rms_norm(&mut x, &[1.0, 2.0, 1.0, 1.0], 0.0);
        let rms = (50.0f32 / 4.0).sqrt();
        assert!((x[0] - 3.0 / rms).abs() < 1e-6 && (x[1] + 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_rotation_preserves_norm_and_is_relative() {
        let cfg = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::None,
            rotary_dim: 8,
        };
        let r = Rope::new(&cfg);
        let q0 = [0.3f32, -1.0, 0.5, 2.0, 0.1, 0.7, -0.2, 1.5];
        let k0 = [1.0f32, 0.2, -0.3, 0.4, -1.1, 0.6, 0.9, -0.5];
        let score = |pq: usize, pk: usize| {
            let (mut q, mut k) = (q0, k0);
            r.apply(&mut q, pq);
            r.apply(&mut k, pk);
            crate::linear::dot(&q, &k)
        };
        // Scores depend only on the relative position.
        assert!((score(5, 2) - score(13, 10)).abs() < 1e-4);
        assert!((score(5, 2) - score(5, 3)).abs() > 1e-3);
        let mut q = q0;
        r.apply(&mut q, 7);
        let n0: f32 = q0.iter().map(|v| v * v).sum();
        let n1: f32 = q.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let base = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::None,
            rotary_dim: 64,
        };
        let scaled = RopeConfig {
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
            ..base.clone()
        };
        let (a, b) = (Rope::new(&base), Rope::new(&scaled));
        assert_eq!(a.inv_freq[0], b.inv_freq[0]);
        let last = a.inv_freq.len() - 1;
        assert!((a.inv_freq[last] / 8.0 - b.inv_freq[last]).abs() < 1e-12);
    }

    #[test]
    fn attention_single_key_returns_value_and_window_masks() {
        let s = AttnShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            window: None,
        };
        let q = vec![1.0, 0.0, 0.0, 1.0];
        let k = vec![0.5, 0.5];
        let v = vec![2.0, -3.0];
        let o = attention(&q, &k, &v, 0, 1, s);
        assert_eq!(o, vec![2.0, -3.0, 2.0, -3.0]);
        // Two keys, window 1: only the newest key is seen.
        let s = AttnShape {
            window: Some(1),
            ..s
        };
        let k = vec![10.0, 10.0, 0.5, 0.5];
        let v = vec![100.0, 100.0, 2.0, -3.0];
        let o = attention(&q, &k, &v, 1, 1, s);
        assert_eq!(o, vec![2.0, -3.0, 2.0, -3.0]);
    }
}
