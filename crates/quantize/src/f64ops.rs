//! The f64 vector updates of calibration and GPTQ (Hessian accumulation, error feedback,
//! gradient updates), compiled twice: portable, and with AVX2 enabled (picked at run time), so
//! the loops use 4-wide instead of 2-wide SSE2 vectors. Both forms do the same separately
//! rounded multiplies and adds per element in the same order (no FMA contraction), so results
//! are bit-identical whichever runs.

/// Calls `$f` through its AVX2 instance where the CPU has AVX2, else the portable one.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above).
            return unsafe { avx2::$f($($arg),*) };
        }
        $f($($arg),*)
    }};
}
pub(crate) use dispatch;

/// `y[t] -= a * x[t]` (`x` at least as long as `y`).
pub fn sub_scaled(y: &mut [f64], a: f64, x: &[f64]) {
    dispatch!(sub_scaled_body(y, a, x))
}

/// `y[t] += a * x[t]` (`x` at least as long as `y`).
pub fn add_scaled(y: &mut [f64], a: f64, x: &[f64]) {
    dispatch!(add_scaled_body(y, a, x))
}

/// `y[t] = y[t] + a[0] * x[0][t] + a[1] * x[1][t] + a[2] * x[2][t] + a[3] * x[3][t]`, the terms
/// added left to right (four rank-one updates in order, one pass over `y`; each `x[q]` at least as
/// long as `y`).
pub fn add_scaled4(y: &mut [f64], a: [f64; 4], x: [&[f64]; 4]) {
    dispatch!(add_scaled4_body(y, a, x))
}

/// `y += sum_t a(t) * x(t)` over `t = 0..m`, the tokens' terms added one at a time in token
/// order, four tokens per pass over `y` ([`add_scaled4`], a quarter of the loads and stores of
/// `y`), the rest one at a time. Tokens with `a(t) == 0` may be skipped or added: a zero term
/// adds exactly nothing to a finite sum. Each `x(t)` at least as long as `y`.
pub fn add_scaled_rows<'a>(
    y: &mut [f64],
    m: usize,
    a: impl Fn(usize) -> f64,
    x: impl Fn(usize) -> &'a [f64],
) {
    let mut t = 0;
    while t + 4 <= m {
        let c = [a(t), a(t + 1), a(t + 2), a(t + 3)];
        if c.iter().any(|&v| v != 0.0) {
            add_scaled4(y, c, [x(t), x(t + 1), x(t + 2), x(t + 3)]);
        }
        t += 4;
    }
    for t in t..m {
        let c = a(t);
        if c != 0.0 {
            add_scaled(y, c, x(t));
        }
    }
}

#[inline(always)]
fn sub_scaled_body(y: &mut [f64], a: f64, x: &[f64]) {
    let x = &x[..y.len()];
    for (yt, &xt) in y.iter_mut().zip(x) {
        *yt -= a * xt;
    }
}

#[inline(always)]
fn add_scaled_body(y: &mut [f64], a: f64, x: &[f64]) {
    let x = &x[..y.len()];
    for (yt, &xt) in y.iter_mut().zip(x) {
        *yt += a * xt;
    }
}

#[inline(always)]
fn add_scaled4_body(y: &mut [f64], a: [f64; 4], x: [&[f64]; 4]) {
    let n = y.len();
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    for t in 0..n {
        y[t] = y[t] + a[0] * x0[t] + a[1] * x1[t] + a[2] * x2[t] + a[3] * x3[t];
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub unsafe fn sub_scaled_body(y: &mut [f64], a: f64, x: &[f64]) {
        super::sub_scaled_body(y, a, x)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn add_scaled_body(y: &mut [f64], a: f64, x: &[f64]) {
        super::add_scaled_body(y, a, x)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn add_scaled4_body(y: &mut [f64], a: [f64; 4], x: [&[f64]; 4]) {
        super::add_scaled4_body(y, a, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| ((i * 2654435761 + seed * 97) % 10007) as f64 / 977.0 - 5.0)
            .collect()
    }

    /// The dispatched (AVX2 where present) and portable forms agree bit for bit, odd lengths too.
    #[test]
    fn dispatched_and_portable_agree_bitwise() {
        for n in [0usize, 1, 3, 4, 7, 33, 258] {
            let x: Vec<Vec<f64>> = (0..4).map(|s| vals(n, s + 1)).collect();
            let y0 = vals(n, 9);
            let (mut a, mut b) = (y0.clone(), y0.clone());
            sub_scaled(&mut a, 0.37, &x[0]);
            sub_scaled_body(&mut b, 0.37, &x[0]);
            assert_eq!(bits(&a), bits(&b), "sub n={n}");
            add_scaled(&mut a, -1.9, &x[1]);
            add_scaled_body(&mut b, -1.9, &x[1]);
            assert_eq!(bits(&a), bits(&b), "add n={n}");
            let c = [0.5, -0.25, 3.0, 1e-3];
            let xs = [&x[0][..], &x[1][..], &x[2][..], &x[3][..]];
            add_scaled4(&mut a, c, xs);
            add_scaled4_body(&mut b, c, xs);
            assert_eq!(bits(&a), bits(&b), "add4 n={n}");
            // add_scaled4 is four add_scaled in order.
            let mut s = y0.clone();
            let mut f = y0.clone();
            add_scaled4(&mut s, c, xs);
            for q in 0..4 {
                add_scaled(&mut f, c[q], xs[q]);
            }
            assert_eq!(bits(&s), bits(&f), "add4 order n={n}");
        }
    }

    /// add_scaled_rows equals one add_scaled per token in order, zero coefficients included,
    /// for token counts on and off the four-token pass.
    #[test]
    fn scaled_rows_equal_token_by_token_updates() {
        for m in [0usize, 1, 4, 6, 9] {
            let n = 13;
            let rows: Vec<Vec<f64>> = (0..m).map(|t| vals(n, t as u64 + 20)).collect();
            let coef = |t: usize| {
                if t % 3 == 1 {
                    0.0
                } else {
                    t as f64 * 0.7 - 1.3
                }
            };
            let mut a = vals(n, 5);
            let mut b = a.clone();
            add_scaled_rows(&mut a, m, coef, |t| &rows[t]);
            for (t, r) in rows.iter().enumerate() {
                add_scaled(&mut b, coef(t), r);
            }
            assert_eq!(bits(&a), bits(&b), "m={m}");
        }
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
