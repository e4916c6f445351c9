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

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
