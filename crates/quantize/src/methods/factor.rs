//! GPTQ's inverse-Hessian factor: the upper triangular `U` with `U^T U = (H + λI)^-1`, computed
//! as GPTQ's reference code does (Cholesky `L` of the damped Hessian, `L^-1` by forward
//! substitution, `H^-1 = L^-T L^-1`, Cholesky of `H^-1`), with the loops arranged for threads and
//! caches: Cholesky in panels of 32 columns (right-looking, the trailing rows in parallel, 16
//! columns side by side); `L^-1` is solved in
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

/// Panel width of the blocked Cholesky.
const PANEL: usize = 32;

/// Trailing-update columns computed side by side (four AVX2 vectors).
const TRAIL: usize = 16;

/// Rows per parallel task.
const ROWS: usize = 8;

/// Rows per trailing-update task.
const TRAIL_ROWS: usize = 64;

/// Lower Cholesky factor of the symmetric `a` (`[k, k]`, row-major; only the lower triangle is
/// read) in place, the upper part left as is; the failing column and pivot on a non-positive or
/// non-finite pivot.
///
/// Blocked by panels of `PANEL` columns, right-looking: a panel is factored, then the rows
/// below subtract the panel's terms from their later columns. Each element still subtracts
/// `a[i][p] a[j][p]` for `p = 0, 1, ..` one at a time, in order (stored between panels as the
/// same f64), so the factor equals the plain column-by-column loops bit for bit.
pub(crate) fn cholesky_lower(a: &mut [f64], k: usize) -> Result<(), (usize, f64)> {
    let mut pan_t = vec![0.0f64; PANEL * k.div_ceil(TRAIL) * TRAIL];
    for p0 in (0..k).step_by(PANEL) {
        let p1 = (p0 + PANEL).min(k);
        let b = p1 - p0;
        // The panel's diagonal block (rows p0..p1), column by column.
        for j in p0..p1 {
            let (head, tail) = a.split_at_mut((j + 1) * k);
            let rowj = &mut head[j * k..(j + 1) * k];
            let mut s = rowj[j];
            for v in &rowj[p0..j] {
                s -= v * v;
            }
            if !(s > 0.0 && s.is_finite()) {
                return Err((j, s));
            }
            let l = s.sqrt();
            rowj[j] = l;
            let rowj = &rowj[p0..j];
            for r in tail.chunks_mut(k).take(p1 - j - 1) {
                let mut t = r[j];
                for (x, y) in r[p0..j].iter().zip(rowj) {
                    t -= x * y;
                }
                r[j] = t / l;
            }
        }
        if p1 == k {
            break;
        }
        let (head, tail) = a.split_at_mut(p1 * k);
        let blk = &head[p0 * k..];
        let below = k - p1;
        // Rows below the block: the panel's columns, with the panel's own terms.
        let panel_rows = |rows: &mut [f64]| {
            for r in rows.chunks_mut(k) {
                for j in p0..p1 {
                    let rj = &blk[(j - p0) * k..(j - p0 + 1) * k];
                    let mut t = r[j];
                    for (x, y) in r[p0..j].iter().zip(&rj[p0..j]) {
                        t -= x * y;
                    }
                    r[j] = t / rj[j];
                }
            }
        };
        if below * b * b / 2 >= PAR_WORK {
            tail.par_chunks_mut(ROWS * k).for_each(panel_rows);
        } else {
            tail.chunks_mut(ROWS * k).for_each(panel_rows);
        }
        // The panel transposed in chunks of TRAIL columns (chunk c holds a[j][p0 + q] for
        // j = p1 + c * TRAIL + l at (c * PANEL + q) * TRAIL + l: one chunk is one contiguous
        // 4 KB, where rows k apart would fall into the same cache set), then every row's later
        // columns minus the panel's terms.
        for (jj, r) in tail.chunks(k).enumerate() {
            let (c, l) = (jj / TRAIL, jj % TRAIL);
            for q in 0..b {
                pan_t[(c * PANEL + q) * TRAIL + l] = r[p0 + q];
            }
        }
        let pan_t = &pan_t;
        let trailing = |(c, rows): (usize, &mut [f64])| {
            trailing_rows(rows, k, p1 + c * TRAIL_ROWS, p0, b, p1, pan_t)
        };
        if below * below * b / 2 >= PAR_WORK {
            tail.par_chunks_mut(TRAIL_ROWS * k)
                .enumerate()
                .for_each(trailing);
        } else {
            tail.chunks_mut(TRAIL_ROWS * k)
                .enumerate()
                .for_each(trailing);
        }
    }
    Ok(())
}

/// Rows `i0..` (`rows`, `k` each) of a blocked Cholesky: for every column `j` in `p1..=i`,
/// `a[i][j] -= a[i][p] a[j][p]` for the panel's `p = p0..p0 + b` in order (`pan_t` holds the
/// panel transposed, in chunks of `TRAIL` columns), `TRAIL` columns side by side.
fn trailing_rows(
    rows: &mut [f64],
    k: usize,
    i0: usize,
    p0: usize,
    b: usize,
    p1: usize,
    pan_t: &[f64],
) {
    crate::f64ops::dispatch!(trailing_rows_body(rows, k, i0, p0, b, p1, pan_t))
}

#[inline(always)]
fn trailing_rows_body(
    rows: &mut [f64],
    k: usize,
    i0: usize,
    p0: usize,
    b: usize,
    p1: usize,
    pan_t: &[f64],
) {
    let last = i0 + rows.len() / k - 1;
    // Column chunks outside, rows inside: a chunk's slice of the panel (b x TRAIL) stays in
    // the L1 cache for all the task's rows.
    let mut j = p1;
    while j <= last {
        for (ii, r) in rows.chunks_mut(k).enumerate() {
            let i = i0 + ii;
            if i < j {
                continue;
            }
            let (ai, rest) = r.split_at_mut(j);
            let ai = &ai[p0..p0 + b];
            let w = TRAIL.min(i + 1 - j);
            let chunk = &pan_t[(j - p1) / TRAIL * PANEL * TRAIL..][..PANEL * TRAIL];
            if w == TRAIL {
                let mut t = [0.0f64; TRAIL];
                t.copy_from_slice(&rest[..TRAIL]);
                for (&x, pv) in ai.iter().zip(chunk.chunks_exact(TRAIL)) {
                    for l in 0..TRAIL {
                        t[l] -= x * pv[l];
                    }
                }
                rest[..TRAIL].copy_from_slice(&t);
            } else {
                for (l, v) in rest[..w].iter_mut().enumerate() {
                    let mut t = *v;
                    for (q, &x) in ai.iter().enumerate() {
                        t -= x * chunk[q * TRAIL + l];
                    }
                    *v = t;
                }
            }
        }
        j += TRAIL;
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
/// (row `i` as ordered rank-one updates by the rows of `inv`); zeros above the diagonal. Rows
/// go in blocks of `ROWS`, so that each row of `inv` is read once per block; a zero term is
/// skipped (it adds exactly nothing: the sums start at +0 and never become -0).
pub(crate) fn gram_of_inverse(inv: &[f64], k: usize) -> Vec<f64> {
    let mut h = vec![0.0f64; k * k];
    let block = |(b, rows): (usize, &mut [f64])| {
        let i0 = b * ROWS;
        for p in i0..k {
            let ip = &inv[p * k..(p + 1) * k];
            for (r, hrow) in rows.chunks_mut(k).enumerate() {
                let i = i0 + r;
                if i > p {
                    break;
                }
                let c = ip[i];
                if c != 0.0 {
                    crate::f64ops::add_scaled(&mut hrow[..=i], c, ip);
                }
            }
        }
    };
    if k * k * k / 6 >= PAR_WORK {
        h.par_chunks_mut(ROWS * k).enumerate().for_each(block);
    } else {
        h.chunks_mut(ROWS * k).enumerate().for_each(block);
    }
    h
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub unsafe fn trailing_rows_body(
        rows: &mut [f64],
        k: usize,
        i0: usize,
        p0: usize,
        b: usize,
        p1: usize,
        pan_t: &[f64],
    ) {
        super::trailing_rows_body(rows, k, i0, p0, b, p1, pan_t)
    }

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
        // In the first panel and in a later one.
        for (k, dup, of) in [(6, 4, 2), (70, 45, 3)] {
            let mut a = spd(k, 3);
            // Row/column `dup` a copy of row/column `of` with half its diagonal: the pivot of
            // column `dup` is negative.
            for j in 0..k {
                a[dup * k + j] = a[of * k + j];
                a[j * k + dup] = a[j * k + of];
            }
            a[dup * k + dup] = 0.5 * a[of * k + of];
            let (mut x, mut y) = (a.clone(), a.clone());
            let e = cholesky_lower(&mut x, k).unwrap_err();
            assert_eq!(e.0, dup, "k={k}");
            let p = cholesky_plain(&mut y, k).unwrap_err();
            assert_eq!((p.0, p.1.to_bits()), (e.0, e.1.to_bits()), "k={k}");
        }
    }
}
