//! GPTQ's inverse-Hessian factor: the upper triangular `U` with `U^T U = (H + λI)^-1`, computed
//! as GPTQ's reference code does (Cholesky `L` of the damped Hessian, `L^-1` by forward
//! substitution, `H^-1 = L^-T L^-1`, Cholesky of `H^-1`), with the loops arranged for threads and
//! caches: Cholesky columns update four rows per pass, rows in parallel; `L^-1` is solved in
//! blocks of eight columns (one pass over `L` per block, the eight sums side by side), blocks in
//! parallel; `H^-1` is formed row by row as ordered rank-one updates, rows in parallel. Every
//! element still gets the same separately rounded multiplies and adds in the same order as the
//! plain loops (kept in the tests), so the factor is bit-identical to them on any thread count
//! and with or without AVX2.

use rayon::prelude::*;

/// Multiply-adds below which a step runs on the calling thread (spawning costs more).
const PAR_WORK: usize = 1 << 16;

/// Columns of `L^-1` solved together.
const LANES: usize = 8;

/// Lower Cholesky factor of the symmetric `a` (`[k, k]`, row-major; only the lower triangle is
/// read) in place, the upper part left as is; the failing column and pivot on a non-positive or
/// non-finite pivot.
pub(crate) fn cholesky_lower(a: &mut [f64], k: usize) -> Result<(), (usize, f64)> {
    for j in 0..k {
        let (head, tail) = a.split_at_mut((j + 1) * k);
        let rowj = &mut head[j * k..(j + 1) * k];
        let mut s = rowj[j];
        for v in &rowj[..j] {
            s -= v * v;
        }
        if !(s > 0.0 && s.is_finite()) {
            return Err((j, s));
        }
        let l = s.sqrt();
        rowj[j] = l;
        let rowj = &rowj[..j];
        // Rows below: a[i][j] = (a[i][j] - sum_p a[i][p] a[j][p]) / l, p ascending.
        let update = |rows: &mut [f64]| column_update(rows, k, j, rowj, l);
        if (k - j - 1) * j >= PAR_WORK {
            tail.par_chunks_mut(4 * k).for_each(update);
        } else {
            tail.chunks_mut(4 * k).for_each(update);
        }
    }
    Ok(())
}

// Indexed loops: five slices walk together.
#[allow(clippy::needless_range_loop)]
/// Column `j` of up to four whole rows (`rows`, `k` each) of a Cholesky in progress: four
/// independent sums side by side (one load of `rowj` serves all four).
fn column_update(rows: &mut [f64], k: usize, j: usize, rowj: &[f64], l: f64) {
    if rows.len() == 4 * k {
        let (r0, rest) = rows.split_at_mut(k);
        let (r1, rest) = rest.split_at_mut(k);
        let (r2, r3) = rest.split_at_mut(k);
        let (mut t0, mut t1, mut t2, mut t3) = (r0[j], r1[j], r2[j], r3[j]);
        let (x0, x1, x2, x3) = (&r0[..j], &r1[..j], &r2[..j], &r3[..j]);
        for p in 0..j {
            let b = rowj[p];
            t0 -= x0[p] * b;
            t1 -= x1[p] * b;
            t2 -= x2[p] * b;
            t3 -= x3[p] * b;
        }
        r0[j] = t0 / l;
        r1[j] = t1 / l;
        r2[j] = t2 / l;
        r3[j] = t3 / l;
    } else {
        for r in rows.chunks_mut(k) {
            let mut t = r[j];
            for (x, b) in r[..j].iter().zip(rowj) {
                t -= x * b;
            }
            r[j] = t / l;
        }
    }
}

/// `L^-1` of the lower triangular `l` (`[k, k]`, row-major; the upper part is ignored), lower
/// triangular, row-major, zeros above the diagonal.
pub(crate) fn lower_inverse(l: &[f64], k: usize) -> Vec<f64> {
    // lt[c][p] = L^-1[p][c]: each block of columns fills whole rows of lt.
    let mut lt = vec![0.0f64; k * k];
    let work = k * k * k / 6;
    let solve = |(b, rows): (usize, &mut [f64])| inverse_columns(l, k, b * LANES, rows);
    if work >= PAR_WORK {
        lt.par_chunks_mut(LANES * k).enumerate().for_each(solve);
    } else {
        lt.chunks_mut(LANES * k).enumerate().for_each(solve);
    }
    let mut inv = vec![0.0f64; k * k];
    for (c, row) in lt.chunks(k).enumerate() {
        for (p, &v) in row.iter().enumerate().skip(c) {
            inv[p * k + c] = v;
        }
    }
    inv
}

/// Columns `c0..c0 + rows.len() / k` of `L^-1` into `rows` (row `q` = column `c0 + q`), by
/// forward substitution down the rows of `l`: `x[i] = -(sum_{p=c}^{i-1} l[i][p] x[p]) / l[i][i]`,
/// `x[c] = 1 / l[c][c]`. The lanes' sums run side by side from `c0` on; a lane's terms before
/// its own column multiply its zeros and add exactly nothing (`0 + ±0 = 0`).
fn inverse_columns(l: &[f64], k: usize, c0: usize, rows: &mut [f64]) {
    crate::f64ops::dispatch!(inverse_columns_body(l, k, c0, rows))
}

#[inline(always)]
fn inverse_columns_body(l: &[f64], k: usize, c0: usize, rows: &mut [f64]) {
    let w = rows.len() / k;
    // x[p][q]: lane q's value at row p (zeros before its column).
    let mut x = vec![[0.0f64; LANES]; k];
    for i in c0..k {
        let li = &l[i * k..i * k + i];
        let mut s = [0.0f64; LANES];
        for (p, xp) in x.iter().enumerate().take(i).skip(c0) {
            let a = li[p];
            for q in 0..LANES {
                s[q] += a * xp[q];
            }
        }
        let d = l[i * k + i];
        for q in 0..w {
            let c = c0 + q;
            x[i][q] = match i.cmp(&c) {
                std::cmp::Ordering::Less => 0.0,
                std::cmp::Ordering::Equal => 1.0 / d,
                std::cmp::Ordering::Greater => -s[q] / d,
            };
        }
    }
    for (q, row) in rows.chunks_mut(k).enumerate() {
        for (p, v) in row.iter_mut().enumerate().skip(c0) {
            *v = x[p][q];
        }
    }
}

/// The lower triangle of `L^-T L^-1` from `inv = L^-1` (`[k, k]`, lower triangular):
/// `h[i][j] = sum_{p=i}^{k-1} inv[p][i] inv[p][j]` for `j <= i`, the terms added in `p` order
/// (row `i` as ordered rank-one updates by the rows of `inv`); zeros above the diagonal.
pub(crate) fn gram_of_inverse(inv: &[f64], k: usize) -> Vec<f64> {
    let mut h = vec![0.0f64; k * k];
    let row = |(i, hrow): (usize, &mut [f64])| {
        crate::f64ops::add_scaled_rows(
            &mut hrow[..=i],
            k - i,
            |t| inv[(i + t) * k + i],
            |t| &inv[(i + t) * k..(i + t) * k + i + 1],
        );
    };
    if k * k * k / 6 >= PAR_WORK {
        h.par_chunks_mut(k).enumerate().for_each(row);
    } else {
        h.chunks_mut(k).enumerate().for_each(row);
    }
    h
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub unsafe fn inverse_columns_body(l: &[f64], k: usize, c0: usize, rows: &mut [f64]) {
        super::inverse_columns_body(l, k, c0, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain loops of the first implementation (the reference for bit-identity).
    fn cholesky_plain(a: &mut [f64], k: usize) -> Result<(), (usize, f64)> {
        for j in 0..k {
            let mut s = a[j * k + j];
            for p in 0..j {
                s -= a[j * k + p] * a[j * k + p];
            }
            if !(s > 0.0 && s.is_finite()) {
                return Err((j, s));
            }
            let l = s.sqrt();
            a[j * k + j] = l;
            for i in j + 1..k {
                let mut t = a[i * k + j];
                for p in 0..j {
                    t -= a[i * k + p] * a[j * k + p];
                }
                a[i * k + j] = t / l;
            }
        }
        Ok(())
    }

    fn inverse_plain(a: &[f64], k: usize) -> Vec<f64> {
        let mut linv = vec![0.0f64; k * k];
        for c in 0..k {
            linv[c * k + c] = 1.0 / a[c * k + c];
            for i in c + 1..k {
                let mut s = 0.0;
                for p in c..i {
                    s += a[i * k + p] * linv[p * k + c];
                }
                linv[i * k + c] = -s / a[i * k + i];
            }
        }
        linv
    }

    fn gram_plain(linv: &[f64], k: usize) -> Vec<f64> {
        let mut h = vec![0.0f64; k * k];
        for i in 0..k {
            for j in 0..=i {
                let mut s = 0.0;
                for p in i..k {
                    s += linv[p * k + i] * linv[p * k + j];
                }
                h[i * k + j] = s;
            }
        }
        h
    }

    /// `X^T X + k I` of a random `X` with `2k` rows: symmetric positive definite.
    fn spd(k: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let x: Vec<f64> = (0..2 * k * k)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect();
        let mut h = vec![0.0; k * k];
        for r in x.chunks(k) {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += r[i] * r[j];
                }
            }
        }
        for i in 0..k {
            h[i * k + i] += 1e-3 * k as f64;
        }
        h
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn every_step_is_bit_identical_to_the_plain_loops() {
        // Sizes around the four-row and eight-lane groups and past the parallel threshold.
        for (k, seed) in [(1, 1), (3, 2), (8, 3), (13, 4), (37, 5), (64, 6), (130, 7)] {
            let h = spd(k, seed);
            let (mut a, mut b) = (h.clone(), h.clone());
            cholesky_lower(&mut a, k).unwrap();
            cholesky_plain(&mut b, k).unwrap();
            assert_eq!(bits(&a), bits(&b), "cholesky k={k}");
            let inv = lower_inverse(&a, k);
            let inv_plain = inverse_plain(&a, k);
            assert_eq!(bits(&inv), bits(&inv_plain), "inverse k={k}");
            let g = gram_of_inverse(&inv, k);
            assert_eq!(bits(&g), bits(&gram_plain(&inv_plain, k)), "gram k={k}");
        }
    }

    #[test]
    fn the_same_on_one_and_several_threads() {
        let k = 97;
        let h = spd(k, 11);
        let run = || {
            let mut a = h.clone();
            cholesky_lower(&mut a, k).unwrap();
            let inv = lower_inverse(&a, k);
            (bits(&a), bits(&gram_of_inverse(&inv, k)))
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(one, three);
    }

    #[test]
    fn a_non_positive_pivot_names_its_column() {
        let k = 6;
        let mut a = spd(k, 3);
        // Row/column 4 a copy of row/column 2: singular at column 4.
        for j in 0..k {
            a[4 * k + j] = a[2 * k + j];
            a[j * k + 4] = a[j * k + 2];
        }
        a[4 * k + 4] = a[2 * k + 2];
        let (mut x, mut y) = (a.clone(), a.clone());
        let e = cholesky_lower(&mut x, k).unwrap_err();
        assert_eq!(e.0, 4);
        assert_eq!(cholesky_plain(&mut y, k).unwrap_err().0, e.0);
    }
}
