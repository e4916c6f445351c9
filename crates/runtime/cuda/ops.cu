// Non-GEMM operations of the GPU decoder (mimo_runtime::cuda), compiled at run time by NVRTC.
//
// No CUDA headers: bf16 values travel as raw 16-bit patterns (u16) and are widened to f32 by a
// shift; f32 -> bf16 rounds to nearest even with cvt.rn.bf16.f32. Everything is computed in f32.
//
// Layouts (row-major):
//   residual x   [tokens][hidden] f32
//   activations  [tokens][width] bf16
//   KV cache     [seq][layer][kv_head][capacity][head_dim] bf16, keys and values in two buffers
//   positions    pos[t] = position of token t in its sequence, seq[t] = its sequence index
//
// Kernels that finish a reduction across blocks (attention splits, router, argmax) use the
// "last block combines" pattern: each block writes its partial result, fences, and bumps a
// per-row counter; the block that sees count - 1 combines the partials in a fixed order
// (deterministic) and resets the counter to 0 for the next launch (CUDA graph replays).

// Compiled after mimo_kernels' common.cuh (typedefs, NEG_INF, bf16 conversions,
// mma_bf16_16816, pdl_enter).

// Short names for common.cuh's conversions (used on nearly every line here).
__device__ __forceinline__ float bf(u16 h) { return bf16_to_f32(h); }
__device__ __forceinline__ u16 to_bf(float f) { return f32_to_bf16(f); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024). `sh` holds 32 entries.
// f32 (fixed shuffle order) or u64 (integer: any order gives the same result).
template <class T>
__device__ T block_sum(T v, T* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    // Every warp reduces the nw partials with the same shuffle tree: one result, fixed order.
    T s = lane < nw ? sh[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

__device__ float block_max(float v, float* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float s = lane < nw ? sh[lane] : NEG_INF;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s = fmaxf(s, __shfl_xor_sync(0xffffffffu, s, o));
    return s;
}

// (value, index) max with ties to the lower index. NaN counts as -inf.
__device__ __forceinline__ void argmax_merge(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

__device__ void block_argmax(float& v, int& i, float* shv, int* shi) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        argmax_merge(v, i, v2, i2);
    }
    __syncthreads();
    if (lane == 0) {
        shv[warp] = v;
        shi[warp] = i;
    }
    __syncthreads();
    v = shv[0];
    i = shi[0];
    for (int w = 1; w < nw; w++) argmax_merge(v, i, shv[w], shi[w]);
}

// Returns true in every thread of the block that arrives last at `counter` (expected arrivals:
// `total`); that block resets the counter. Partial results must be written before the call.
// Ordering (CUTLASS's semaphore pattern): the barrier orders every thread's partial writes
// before thread 0's acq_rel atomic at gpu scope, whose release half publishes them (release is
// cumulative) and whose acquire half, in the last block, makes every other block's published
// writes visible to the reads after the second barrier (which bypass L1: __ldcg). One atomic
// instead of a gpu-scope fence in every thread before it and another after it.
__device__ bool last_block(int* counter, int total, int* flag) {
    __syncthreads();
    if (threadIdx.x == 0) {
        int prev;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;"
                     : "=r"(prev)
                     : "l"(counter)
                     : "memory");
        *flag = prev == total - 1;
        if (*flag) *counter = 0;
    }
    __syncthreads();
    return *flag != 0;
}

// ---------------------------------------------------------------------------------------------
// Embedding gather: x[t] = E[tok[t]] (f32). Ids outside the vocabulary give a zero row and are
// counted in bad[0].
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void embed_gather(const u16* __restrict__ emb, const int* __restrict__ tok,
                                        float* __restrict__ x, int hidden, int vocab,
                                        int* __restrict__ bad) {
    pdl_enter();
    const int t = blockIdx.x;
    const int id = tok[t];
    const bool ok = id >= 0 && id < vocab;
    if (!ok && threadIdx.x == 0) atomicAdd(bad, 1);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        x[(size_t)t * hidden + i] = ok ? bf(emb[(size_t)id * hidden + i]) : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Residual add + RMSNorm. Per row t:
//   x[t] += d1[t]                                  (d1: bf16 [m][h], optional)
//         + sum_j pw[t,j] * pairs[t*k+j]            (MoE combine over top-k pairs, optional)
//         + sigmoid(g2[t]) * d2[t]                  (shared expert, gate optional, optional)
//   out[t - row_begin] = bf16(w * (x[t] * rsqrt(mean(x[t]^2) + eps)))   for t >= row_begin
// ---------------------------------------------------------------------------------------------
// Elements per thread of a row RMSNorm held in registers between its two passes (2048-wide rows
// at 256 threads; more are kept elsewhere and read back).
#define NORM_REG 8

// This thread's norm weights for its first NORM_REG elements (threadIdx.x + r * blockDim.x);
// zeros where !on. Norm weights are never written by another kernel, so callers load them before
// their PDL wait.
__device__ __forceinline__ void load_norm_weights(const float* __restrict__ w, int hidden, bool on,
                                                  float (&wv)[NORM_REG]) {
#pragma unroll
    for (int r = 0; r < NORM_REG; r++) {
        const int i = threadIdx.x + r * blockDim.x;
        wv[r] = on && i < hidden ? w[i] : 0.f;
    }
}

// One row's RMSNorm by the whole block, its loads issued at once. Pass 1: v = value(i) for this
// thread's elements in increasing i (the squares summed in that order), keep(i, v) for each;
// the first NORM_REG stay in registers. Then the block sum, and where `emit`, pass 2:
// out(i, bf16(w_i * (v_i * inv))) with v_i from registers or, beyond them, kept(i).
template <class Value, class Keep, class Kept, class Out>
__device__ __forceinline__ void rmsnorm_row(int hidden, float eps, const float* __restrict__ w,
                                            const float (&wv)[NORM_REG], bool emit, float* sh,
                                            Value value, Keep keep, Kept kept, Out out) {
    float vv[NORM_REG];
#pragma unroll
    for (int r = 0; r < NORM_REG; r++) {
        const int i = threadIdx.x + r * blockDim.x;
        vv[r] = i < hidden ? value(i) : 0.f;
    }
    float ss = 0.f;
#pragma unroll
    for (int r = 0; r < NORM_REG; r++) {
        const int i = threadIdx.x + r * blockDim.x;
        if (i < hidden) {
            keep(i, vv[r]);
            ss += vv[r] * vv[r];
        }
    }
    for (int i = threadIdx.x + NORM_REG * blockDim.x; i < hidden; i += blockDim.x) {
        const float v = value(i);
        keep(i, v);
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    if (!emit) return;
    const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
#pragma unroll
    for (int r = 0; r < NORM_REG; r++) {
        const int i = threadIdx.x + r * blockDim.x;
        if (i < hidden) out(i, to_bf(wv[r] * (vv[r] * inv)));
    }
    for (int i = threadIdx.x + NORM_REG * blockDim.x; i < hidden; i += blockDim.x)
        out(i, to_bf(w[i] * (kept(i) * inv)));
}
extern "C" __global__ void add_rmsnorm(float* __restrict__ x, const u16* __restrict__ d1,
                                       const u16* __restrict__ pairs, const float* __restrict__ pw,
                                       const int* __restrict__ pids, int top_k, int n_experts,
                                       const u16* __restrict__ d2, const u16* __restrict__ g2,
                                       const float* __restrict__ w, u16* __restrict__ out,
                                       int hidden, float eps, int row_begin) {
    // The norm weights load while the previous kernel of a PDL chain finishes.
    float wv[NORM_REG];
    load_norm_weights(w, hidden, true, wv);
    pdl_enter();
    __shared__ float sh[32];
    const int t = blockIdx.x;
    float* xr = x + (size_t)t * hidden;
    float g = 1.f;
    if (g2 != 0) {
        const float gv = bf(g2[t]);
        g = 1.f / (1.f + expf(-gv));
    }
    // x[t][i] + the pending terms, in the order of the comment above.
    auto sum_at = [&](int i) {
        float v = xr[i];
        if (d1 != 0) v += bf(d1[(size_t)t * hidden + i]);
        if (pairs != 0) {
            float s = 0.f;
            for (int j = 0; j < top_k; j++) {
                const size_t p = (size_t)t * top_k + j;
                const int e = pids[p];
                if (e < 0 || e >= n_experts) continue;
                s += pw[p] * bf(pairs[p * hidden + i]);
            }
            v += s;
        }
        if (d2 != 0) v += g * bf(d2[(size_t)t * hidden + i]);
        return v;
    };
    // Rows before row_begin only update the residual (no normalized output).
    rmsnorm_row(
        hidden, eps, w, wv, t >= row_begin, sh, sum_at, [&](int i, float v) { xr[i] = v; },
        [&](int i) { return xr[i]; },
        [&](int i, u16 hb) { out[(size_t)(t - row_begin) * hidden + i] = hb; });
}

// ---------------------------------------------------------------------------------------------
// One attention head vector prepared in shared memory: src (+ bias), optional per-head RMSNorm,
// rotate-half RoPE over the first rot_dim elements at `pos`. Called by the whole block.
// ---------------------------------------------------------------------------------------------
__device__ void head_prep(const u16* __restrict__ src, const float* __restrict__ bias,
                          const float* __restrict__ normw, float eps,
                          const float* __restrict__ inv_freq, float attn_factor, int rot_dim,
                          int pos, int d, float* out, float* sh) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = bf(src[i]);
        if (bias != 0) v += bias[i];
        out[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, sh);  // also a barrier: out[] is complete
    if (normw != 0) {
        const float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (int i = threadIdx.x; i < d; i += blockDim.x) out[i] = normw[i] * (out[i] * inv);
        __syncthreads();
    }
    const int half = rot_dim >> 1;
    float a = 0.f, b = 0.f, c = 0.f, s = 0.f;
    const bool mine = threadIdx.x < half;
    if (mine) {
        const float ang = (float)pos * inv_freq[threadIdx.x];
        float sn, cs;
        sincosf(ang, &sn, &cs);
        c = cs * attn_factor;
        s = sn * attn_factor;
        a = out[threadIdx.x];
        b = out[threadIdx.x + half];
    }
    __syncthreads();
    if (mine) {
        out[threadIdx.x] = a * c - b * s;
        out[threadIdx.x + half] = b * c + a * s;
    }
    __syncthreads();
}

// The new token of a decode step (attention, attention_w): its value (+ bias) and its prepared
// key `kn`, both rounded to bf16 and kept rounded in kn / vn (used exactly as later tokens will
// read them from the cache), written to the cache rows by the first head of the KV group
// (`write`). Elements first, first + step, ... (the block's threads or one warp's lanes).
__device__ __forceinline__ void new_kv(const u16* __restrict__ vs, const float* __restrict__ v_bias,
                                       float* kn, float* vn, u16* __restrict__ kc_row,
                                       u16* __restrict__ vc_row, bool write, int d, int first,
                                       int step) {
    for (int i = first; i < d; i += step) {
        float v = bf(vs[i]);
        if (v_bias != 0) v += v_bias[i];
        const u16 kb = to_bf(kn[i]), vb = to_bf(v);
        kn[i] = bf(kb);
        vn[i] = bf(vb);
        if (write) {
            kc_row[i] = kb;
            vc_row[i] = vb;
        }
    }
}

// First key position a token at position p attends to (sliding window, or 0).
__device__ __forceinline__ int window_lo(int p, int window) {
    return window > 0 ? max(0, p + 1 - window) : 0;
}

struct AttnArgs {
    int n_heads, n_kv, d, rot_dim, capacity, layers, layer, window, split_len, max_splits,
        fused_new;
    float eps, attn_factor, scale;
};

// K/V of new tokens into the cache (prefill path; the decode path does it inside attention).
// grid (m, n_kv), block >= rot_dim / 2 threads (multiple of 32).
extern "C" __global__ void kv_write(const u16* __restrict__ k_src, int k_off, int k_stride,
                                    const u16* __restrict__ v_src, int v_off, int v_stride,
                                    const float* __restrict__ k_bias,
                                    const float* __restrict__ v_bias,
                                    const float* __restrict__ k_norm,
                                    const float* __restrict__ inv_freq,
                                    const int* __restrict__ pos, const int* __restrict__ seq,
                                    u16* __restrict__ kc, u16* __restrict__ vc, AttnArgs a) {
    pdl_enter();
    extern __shared__ float smem[];
    __shared__ float sh[32];
    const int t = blockIdx.x, kv = blockIdx.y, d = a.d;
    const int p = pos[t], s = seq[t];
    if (p < 0 || p >= a.capacity) return;
    float* kf = smem;
    head_prep(k_src + (size_t)t * k_stride + k_off + kv * d, k_bias ? k_bias + kv * d : 0, k_norm,
              a.eps, inv_freq, a.attn_factor, a.rot_dim, p, d, kf, sh);
    const size_t base = ((((size_t)s * a.layers + a.layer) * a.n_kv + kv) * a.capacity + p) * d;
    const u16* vs = v_src + (size_t)t * v_stride + v_off + kv * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        kc[base + i] = to_bf(kf[i]);
        float v = bf(vs[i]);
        if (v_bias != 0) v += v_bias[kv * d + i];
        vc[base + i] = to_bf(v);
    }
}

// The last of the `nsplit` split blocks of attention row `row` to arrive merges the partial
// (max, sum, out) of all splits in split order (deterministic) and writes out[row]. Partial
// results must be written before the call. `red` holds at least nsplit floats (the host checks
// nsplit against the kernels' scratch), `sh` 32.
#define COMBINE_REG 16
__device__ void combine_row(const float* __restrict__ part_ml, const float* __restrict__ part_o,
                            u16* __restrict__ out, size_t row, int nsplit, int max_splits, int d,
                            float* red, float* sh);

__device__ void combine_splits(const float* __restrict__ part_ml, const float* __restrict__ part_o,
                               int* __restrict__ counters, u16* __restrict__ out, size_t row,
                               int nsplit, int max_splits, int d, float* red, float* sh,
                               int* flag) {
    if (!last_block(counters + row, nsplit, flag)) return;
    combine_row(part_ml, part_o, out, row, nsplit, max_splits, d, red, sh);
}

// The merge of combine_splits for one row, by the whole block (after the last block's check).
// A caller merging several rows in turn puts a barrier between them (`red` is reused).
__device__ void combine_row(const float* __restrict__ part_ml, const float* __restrict__ part_o,
                            u16* __restrict__ out, size_t row, int nsplit, int max_splits, int d,
                            float* red, float* sh) {
    // Every load goes out before the first reduction (serial L2 round trips dominated this
    // step): this thread's split (m, l) and, for its first element, the first COMBINE_REG
    // splits' partial outputs; further splits and elements are read where they are used.
    const float* pm = part_ml + row * max_splits * 2;
    const float* pob = part_o + row * max_splits * d;
    const int z0 = threadIdx.x, i0 = threadIdx.x;
    float po[COMBINE_REG];
#pragma unroll
    for (int zz = 0; zz < COMBINE_REG; zz++)
        po[zz] = i0 < d && zz < nsplit ? __ldcg(pob + (size_t)zz * d + i0) : 0.f;
    const float m0 = z0 < nsplit ? __ldcg(pm + 2 * z0) : NEG_INF;
    const float l0 = z0 < nsplit ? __ldcg(pm + 2 * z0 + 1) : 0.f;
    // Per-split factors exp(m_z - M) in shared memory.
    float mloc = fmaxf(NEG_INF, m0);
    for (int zz = z0 + blockDim.x; zz < nsplit; zz += blockDim.x) mloc = fmaxf(mloc, __ldcg(pm + 2 * zz));
    const float m_all = block_max(mloc, sh);
    float lloc = 0.f;
    if (z0 < nsplit) {
        const float f = m0 == NEG_INF ? 0.f : expf(m0 - m_all);
        red[z0] = f;
        lloc += f * l0;
    }
    for (int zz = z0 + blockDim.x; zz < nsplit; zz += blockDim.x) {
        const float mz = __ldcg(pm + 2 * zz);
        const float f = mz == NEG_INF ? 0.f : expf(mz - m_all);
        red[zz] = f;
        lloc += f * __ldcg(pm + 2 * zz + 1);
    }
    const float l_all = block_sum(lloc, sh);  // barrier: red[] holds the factors
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.f;
        int zz = 0;
        if (i == i0) {
#pragma unroll
            for (int r = 0; r < COMBINE_REG; r++)
                if (r < nsplit) o += red[r] * po[r];
            zz = COMBINE_REG;
        }
        for (; zz < nsplit; zz++) o += red[zz] * __ldcg(pob + (size_t)zz * d + i);
        out[row * d + i] = to_bf(o / l_all);
    }
}

// The arguments of the decode attention kernels (attention, attention_w, attention_gqa_*), in
// the order ops.rs pushes them.
#define ATTN_PARAMS                                                                               \
    const u16 *__restrict__ q_src, int q_off, int q_stride, const u16 *__restrict__ k_src,       \
        int k_off, int k_stride, const u16 *__restrict__ v_src, int v_off, int v_stride,         \
        const float *__restrict__ q_bias, const float *__restrict__ k_bias,                      \
        const float *__restrict__ v_bias, const float *__restrict__ q_norm,                      \
        const float *__restrict__ k_norm, const float *__restrict__ inv_freq,                    \
        const int *__restrict__ pos, const int *__restrict__ seq, u16 *__restrict__ kc,          \
        u16 *__restrict__ vc, float *__restrict__ part_ml, float *__restrict__ part_o,           \
        int *__restrict__ counters, u16 *__restrict__ out, AttnArgs a

// Causal GQA attention, flash-decoding style. grid (m tokens, n_heads, max_splits), 128 threads.
// Split z covers key positions [z*L, z*L+L) of [lo, pos]; the last split block to finish
// combines the partial (max, sum, out) of all splits in split order. With fused_new, the new
// token's key and value are prepared here (bias, k-norm, RoPE) and written to the cache by the
// block of the split holding `pos` (decode: no separate kv_write launch).
// Shared memory: d (q) + d (k new) + d (v new) + split_len (scores) + 8 * blockDim (P.V
// partial sums) floats. head_dim must be a multiple of 8.
extern "C" __global__ void __launch_bounds__(128)
attention(ATTN_PARAMS) {
    pdl_enter();
    extern __shared__ float smem[];
    __shared__ float sh[32];
    __shared__ int flag;
    const int t = blockIdx.x, h = blockIdx.y, z = blockIdx.z, d = a.d;
    const int group = a.n_heads / a.n_kv, kv = h / group;
    const int p = pos[t], s = seq[t];
    if (p < 0 || p >= a.capacity) return;  // the host refuses such steps; never write outside
    const int nsplit = p / a.split_len + 1;
    if (z >= nsplit) return;
    const int lo = window_lo(p, a.window);
    const int j0 = max(lo, z * a.split_len), j1 = min(p, z * a.split_len + a.split_len - 1);
    float* qf = smem;
    float* kn = smem + d;
    float* vn = smem + 2 * d;
    float* sc = smem + 3 * d;
    head_prep(q_src + (size_t)t * q_stride + q_off + h * d, q_bias ? q_bias + h * d : 0, q_norm,
              a.eps, inv_freq, a.attn_factor, a.rot_dim, p, d, qf, sh);
    const size_t cbase = (((size_t)s * a.layers + a.layer) * a.n_kv + kv) * a.capacity;
    const bool has_new = a.fused_new && j0 <= p && p <= j1;
    if (has_new) {
        head_prep(k_src + (size_t)t * k_stride + k_off + kv * d, k_bias ? k_bias + kv * d : 0,
                  k_norm, a.eps, inv_freq, a.attn_factor, a.rot_dim, p, d, kn, sh);
        new_kv(v_src + (size_t)t * v_stride + v_off + kv * d, v_bias ? v_bias + kv * d : 0, kn, vn,
               kc + (cbase + p) * d, vc + (cbase + p) * d, h % group == 0, d, threadIdx.x,
               blockDim.x);
        __syncthreads();
    }
    // Scores: one thread per key, 16-byte loads (head_dim % 8 == 0), q broadcast from smem.
    const int nk = j1 - j0 + 1;  // may be <= 0 (split entirely before the window)
    for (int jj = threadIdx.x; jj < nk; jj += blockDim.x) {
        const int j = j0 + jj;
        float acc = 0.f;
        if (has_new && j == p) {
            for (int i = 0; i < d; i++) acc += qf[i] * kn[i];
        } else {
            const uint4* kr = (const uint4*)(kc + (cbase + j) * d);
#pragma unroll 8
            for (int c = 0; c < (d >> 3); c++) {
                const uint4 kv4 = kr[c];
                const float* qc = qf + c * 8;
                acc += qc[0] * __uint_as_float(kv4.x << 16) + qc[1] * __uint_as_float(kv4.x & 0xFFFF0000u);
                acc += qc[2] * __uint_as_float(kv4.y << 16) + qc[3] * __uint_as_float(kv4.y & 0xFFFF0000u);
                acc += qc[4] * __uint_as_float(kv4.z << 16) + qc[5] * __uint_as_float(kv4.z & 0xFFFF0000u);
                acc += qc[6] * __uint_as_float(kv4.w << 16) + qc[7] * __uint_as_float(kv4.w & 0xFFFF0000u);
            }
        }
        sc[jj] = acc * a.scale;
    }
    __syncthreads();
    float mx = NEG_INF;
    for (int jj = threadIdx.x; jj < nk; jj += blockDim.x) mx = fmaxf(mx, sc[jj]);
    mx = block_max(mx, sh);
    float l = 0.f;
    for (int jj = threadIdx.x; jj < nk; jj += blockDim.x) {
        const float e = expf(sc[jj] - mx);
        sc[jj] = e;
        l += e;
    }
    l = block_sum(l, sh);  // barrier: sc[] holds the weights
    // P.V: thread = (8-element chunk of the head, key group); groups reduced in smem in order.
    const int nch = d >> 3, groups = blockDim.x / nch;
    const int ch = threadIdx.x % nch, grp = threadIdx.x / nch;
    float o8[8];
#pragma unroll
    for (int i = 0; i < 8; i++) o8[i] = 0.f;
    if (grp < groups) {
#pragma unroll 4
        for (int jj = grp; jj < nk; jj += groups) {
            const int j = j0 + jj;
            const float w = sc[jj];
            if (has_new && j == p) {
#pragma unroll
                for (int i = 0; i < 8; i++) o8[i] += w * vn[ch * 8 + i];
            } else {
                const uint4 v4 = *(const uint4*)(vc + (cbase + j) * d + ch * 8);
                const u32 vs[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    o8[2 * q] += w * __uint_as_float(vs[q] << 16);
                    o8[2 * q + 1] += w * __uint_as_float(vs[q] & 0xFFFF0000u);
                }
            }
        }
    }
    float* red = sc + a.split_len;  // [groups][d]
    if (grp < groups) {
#pragma unroll
        for (int i = 0; i < 8; i++) red[grp * d + ch * 8 + i] = o8[i];
    }
    __syncthreads();
    const size_t row = (size_t)t * a.n_heads + h;
    float* po = part_o + (row * a.max_splits + z) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.f;
        for (int gi = 0; gi < groups; gi++) o += red[gi * d + i];
        if (nsplit == 1) {
            out[row * d + i] = to_bf(o / l);
        } else {
            po[i] = o;
        }
    }
    if (nsplit == 1) return;
    if (threadIdx.x == 0) {
        part_ml[(row * a.max_splits + z) * 2] = nk > 0 ? mx : NEG_INF;
        part_ml[(row * a.max_splits + z) * 2 + 1] = l;
    }
    combine_splits(part_ml, part_o, counters, out, row, nsplit, a.max_splits, d, red, sh, &flag);
}

// The constants of one head's preparation for one lane (head_dim <= 128): bias and norm weight
// of elements lane + 32 j, inverse frequencies of RoPE pairs lane + 32 j. They never come from
// another kernel, so attention_w loads them before its PDL wait.
struct HeadConsts {
    float bias[4], normw[4], freq[2];
    bool has_bias, has_norm;
};

__device__ __forceinline__ void load_head_consts(const float* __restrict__ bias,
                                                 const float* __restrict__ normw,
                                                 const float* __restrict__ inv_freq, int rot_dim,
                                                 int d, HeadConsts& c) {
    const int lane = threadIdx.x & 31;
    c.has_bias = bias != 0;
    c.has_norm = normw != 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int i = lane + 32 * j;
        c.bias[j] = bias != 0 && i < d ? bias[i] : 0.f;
        c.normw[j] = normw != 0 && i < d ? normw[i] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int i = lane + 32 * j;
        c.freq[j] = i < (rot_dim >> 1) ? inv_freq[i] : 0.f;
    }
}

// One lane's elements lane + 32 j of a head (head_dim <= 128; 0 past d), as warp_head_finish
// takes them: a caller preparing several heads loads them all first.
__device__ __forceinline__ void warp_head_load(const u16* __restrict__ src, int d, float (&raw)[4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < 4; j++) raw[j] = lane + 32 * j < d ? bf(src[lane + 32 * j]) : 0.f;
}

// warp_head_prep_c from the lane's loaded elements (warp_head_load).
__device__ __forceinline__ void warp_head_finish(const float (&raw)[4], const HeadConsts& c,
                                                 float eps, float attn_factor, int rot_dim, int pos,
                                                 int d, float* out) {
    const int lane = threadIdx.x & 31;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int i = lane + 32 * j;
        if (i < d) {
            float v = raw[j];
            if (c.has_bias) v += c.bias[j];
            out[i] = v;
            ss += v * v;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    __syncwarp();
    if (c.has_norm) {
        const float inv = 1.0f / sqrtf(ss / (float)d + eps);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = lane + 32 * j;
            if (i < d) out[i] = c.normw[j] * (out[i] * inv);
        }
        __syncwarp();
    }
    const int half = rot_dim >> 1;
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int i = lane + 32 * j;
        if (i < half) {
            float sn, cs;
            sincosf((float)pos * c.freq[j], &sn, &cs);
            const float cc = cs * attn_factor, sv = sn * attn_factor;
            const float x0 = out[i], x1 = out[i + half];
            out[i] = x0 * cc - x1 * sv;
            out[i + half] = x1 * cc + x0 * sv;
        }
    }
    __syncwarp();
}

// warp_head_prep with the constants already loaded (head_dim <= 128).
__device__ void warp_head_prep_c(const u16* __restrict__ src, const HeadConsts& c, float eps,
                                 float attn_factor, int rot_dim, int pos, int d, float* out) {
    float raw[4];
    warp_head_load(src, d, raw);
    warp_head_finish(raw, c, eps, attn_factor, rot_dim, pos, d, out);
}

// Warp-level head preparation (the attention_w and prefill kernels): src (+ bias), optional
// RMSNorm over the head, rotate-half RoPE over the first rot_dim elements at `pos`, into
// out[0..d). One warp, no block barrier; each RoPE pair (i, i + rot_dim/2) belongs to one lane.
// head_dim <= 128 (the kernels that call it).
__device__ void warp_head_prep(const u16* __restrict__ src, const float* __restrict__ bias,
                               const float* __restrict__ normw, float eps,
                               const float* __restrict__ inv_freq, float attn_factor, int rot_dim,
                               int pos, int d, float* out) {
    HeadConsts c;
    load_head_consts(bias, normw, inv_freq, rot_dim, d, c);
    warp_head_prep_c(src, c, eps, attn_factor, rot_dim, pos, d, out);
}

__device__ __forceinline__ float bf_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(u32 w) { return __uint_as_float(w & 0xFFFF0000u); }

// ---------------------------------------------------------------------------------------------
// Prefill attention on the tensor cores (FlashAttention-2 style) for head_dim 64 or 128.
// grid (ceil(m / 64), n_heads), 128 threads = 4 warps x 16 queries. The new tokens' keys and
// values are already in the cache (kv_write) and all m tokens belong to one sequence at
// increasing positions (GpuModel::forward). q is prepared in f32 (bias, norm, RoPE: the same
// warp_head_prep as attention_w), rounded to bf16 and held as mma A fragments; 64-key tiles of K
// (row-major) and V (transposed) pass through shared memory; S = Q K^T and O += P V are
// m16n8k16 bf16 mma with f32 accumulators and an online softmax in registers (P rounded to bf16,
// and the row sums taken over the rounded P, so the weights used are the weights normalised).
// ---------------------------------------------------------------------------------------------
#define PF_Q 64
#define PF_K 64

template <int D>
__device__ __forceinline__ void attention_prefill_body(
    const u16* __restrict__ q_src, int q_off, int q_stride, const float* __restrict__ q_bias,
    const float* __restrict__ q_norm, const float* __restrict__ inv_freq,
    const int* __restrict__ pos, const int* __restrict__ seq, const u16* __restrict__ kc,
    const u16* __restrict__ vc, u16* __restrict__ out, AttnArgs a, int m) {
    pdl_enter();
    constexpr int KS = D + 8;     // K tile row stride (bf16): fragment reads hit 32 banks
    constexpr int VS = PF_K + 8;  // transposed V tile row stride
    __shared__ __align__(16) u16 ks[PF_K * KS];  // holds the bf16 q tile first
    __shared__ __align__(16) u16 vt[D * VS];
    __shared__ float qtmp[4][D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, kvh = h / (a.n_heads / a.n_kv);
    const int t0 = blockIdx.x * PF_Q;
    for (int i = 0; i < 16; i++) {
        const int r = warp * 16 + i, t = t0 + r;
        if (t < m) {
            warp_head_prep(q_src + (size_t)t * q_stride + q_off + h * D,
                           q_bias ? q_bias + h * D : 0, q_norm, a.eps, inv_freq, a.attn_factor,
                           a.rot_dim, pos[t], D, qtmp[warp]);
            for (int c = lane; c < D; c += 32) ks[r * KS + c] = to_bf(qtmp[warp][c]);
        } else {
            for (int c = lane; c < D; c += 32) ks[r * KS + c] = 0;
        }
        __syncwarp();
    }
    u32 qa[D / 16][4];
    {
        const u16* q0 = ks + (warp * 16 + g) * KS;
        const u16* q1 = q0 + 8 * KS;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            qa[kk][0] = *(const u32*)(q0 + kk * 16 + 2 * tq);
            qa[kk][1] = *(const u32*)(q1 + kk * 16 + 2 * tq);
            qa[kk][2] = *(const u32*)(q0 + kk * 16 + 2 * tq + 8);
            qa[kk][3] = *(const u32*)(q1 + kk * 16 + 2 * tq + 8);
        }
    }
    // This thread's two query rows (g and g + 8 of the warp's 16); rows past m see no key.
    const int r0 = t0 + warp * 16 + g, r1 = r0 + 8;
    const int p0 = r0 < m ? pos[r0] : -1, p1 = r1 < m ? pos[r1] : -1;
    const int lo0 = window_lo(p0, a.window), lo1 = window_lo(p1, a.window);
    const int khi = pos[min(m, t0 + PF_Q) - 1];
    const int klo = window_lo(pos[t0], a.window);
    const size_t cbase = (((size_t)seq[t0] * a.layers + a.layer) * a.n_kv + kvh) * a.capacity;
    const float sl2 = a.scale * 1.4426950408889634f;  // scores in log2 units: exp2f below
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float mr[2] = {NEG_INF, NEG_INF}, lr[2] = {0.f, 0.f};
    for (int kt = klo / PF_K * PF_K; kt <= khi; kt += PF_K) {
        __syncthreads();  // every warp is done with the previous tile (or the q tile)
        for (int idx = threadIdx.x; idx < PF_K * (D / 8); idx += blockDim.x) {
            const int r = idx / (D / 8), c = (idx % (D / 8)) * 8, j = kt + r;
            uint4 k4 = make_uint4(0, 0, 0, 0), v4 = make_uint4(0, 0, 0, 0);
            if (j <= khi) {  // zeros past the last key: masked scores must not meet NaN values
                k4 = *(const uint4*)(kc + (cbase + j) * D + c);
                v4 = *(const uint4*)(vc + (cbase + j) * D + c);
            }
            *(uint4*)(ks + r * KS + c) = k4;
            const u32 vw[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                vt[(c + 2 * e) * VS + r] = (u16)(vw[e] & 0xFFFFu);
                vt[(c + 2 * e + 1) * VS + r] = (u16)(vw[e] >> 16);
            }
        }
        __syncthreads();
        float sc[PF_K / 8][4];
#pragma unroll
        for (int nt = 0; nt < PF_K / 8; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
            const u16* kr = ks + (nt * 8 + g) * KS + 2 * tq;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++)
                mma_bf16_16816(sc[nt], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3],
                               *(const u32*)(kr + kk * 16), *(const u32*)(kr + kk * 16 + 8));
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < PF_K / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = kt + nt * 8 + 2 * tq + e;
                const float v0 = (j > p0 || j < lo0) ? NEG_INF : sc[nt][e] * sl2;
                const float v1 = (j > p1 || j < lo1) ? NEG_INF : sc[nt][2 + e] * sl2;
                sc[nt][e] = v0;
                sc[nt][2 + e] = v1;
                mx0 = fmaxf(mx0, v0);
                mx1 = fmaxf(mx1, v1);
            }
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(mr[0], mx0), mn1 = fmaxf(mr[1], mx1);
        // A row that has seen no key yet keeps max -inf: subtract 0 so exp2f gives 0, not NaN.
        const float mu0 = mn0 == NEG_INF ? 0.f : mn0, mu1 = mn1 == NEG_INF ? 0.f : mn1;
        const float c0 = exp2f(mr[0] - mu0), c1 = exp2f(mr[1] - mu1);
        mr[0] = mn0;
        mr[1] = mn1;
        lr[0] *= c0;
        lr[1] *= c1;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            o[dt][0] *= c0;
            o[dt][1] *= c0;
            o[dt][2] *= c1;
            o[dt][3] *= c1;
        }
        u32 pa[PF_K / 16][4];
#pragma unroll
        for (int nt = 0; nt < PF_K / 8; nt++) {
            const u32 w0 = f32x2_to_bf16x2(exp2f(sc[nt][0] - mu0), exp2f(sc[nt][1] - mu0));
            const u32 w1 = f32x2_to_bf16x2(exp2f(sc[nt][2] - mu1), exp2f(sc[nt][3] - mu1));
            lr[0] += __uint_as_float(w0 << 16) + __uint_as_float(w0 & 0xFFFF0000u);
            lr[1] += __uint_as_float(w1 << 16) + __uint_as_float(w1 & 0xFFFF0000u);
            pa[nt >> 1][(nt & 1) * 2] = w0;
            pa[nt >> 1][(nt & 1) * 2 + 1] = w1;
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            const u16* vr = vt + (dt * 8 + g) * VS + 2 * tq;
#pragma unroll
            for (int kk = 0; kk < PF_K / 16; kk++)
                mma_bf16_16816(o[dt], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3],
                               *(const u32*)(vr + kk * 16), *(const u32*)(vr + kk * 16 + 8));
        }
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        lr[0] += __shfl_xor_sync(0xffffffffu, lr[0], off);
        lr[1] += __shfl_xor_sync(0xffffffffu, lr[1], off);
    }
    const float i0 = lr[0] > 0.f ? 1.f / lr[0] : 0.f, i1 = lr[1] > 0.f ? 1.f / lr[1] : 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        const int c = dt * 8 + 2 * tq;
        if (r0 < m)
            *(u32*)(out + ((size_t)r0 * a.n_heads + h) * D + c) =
                f32x2_to_bf16x2(o[dt][0] * i0, o[dt][1] * i0);
        if (r1 < m)
            *(u32*)(out + ((size_t)r1 * a.n_heads + h) * D + c) =
                f32x2_to_bf16x2(o[dt][2] * i1, o[dt][3] * i1);
    }
}

#define ATTENTION_PREFILL(NAME, D)                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        NAME(const u16* q_src, int q_off, int q_stride, const float* q_bias,                   \
             const float* q_norm, const float* inv_freq, const int* pos, const int* seq,        \
             const u16* kc, const u16* vc, u16* out, AttnArgs a, int m) {                       \
        attention_prefill_body<D>(q_src, q_off, q_stride, q_bias, q_norm, inv_freq, pos, seq, \
                                  kc, vc, out, a, m);                                           \
    }
ATTENTION_PREFILL(attention_prefill_d64, 64)
ATTENTION_PREFILL(attention_prefill_d128, 128)

// Causal GQA attention for head_dim in {32, 64, 96, 128} and 64-key splits (decode steps):
// same arguments, grid and results as `attention` (flash-decoding, last split block combines),
// with a shorter chain of dependent steps. 128 threads = 4 warps x 16 keys (two passes of 8);
// lane (g = lane / 4, sub = lane % 4) holds elements [sub * d/4, (sub + 1) * d/4) of key g of
// each pass. Every K and V load of the block is issued first, while warps 0 and 1 prepare q
// and the new key/value (bias, norm, RoPE) with warp shuffles only; one block barrier later each
// warp scores its 16 keys (two shuffle steps), runs its own softmax and P.V (three shuffle
// steps), and the 4 warps' (max, sum, out) are merged in warp order.
#define AW_WARPS 4
extern "C" __global__ void __launch_bounds__(128)
attention_w(ATTN_PARAMS, L2Ranges l2) {
    // With the new token's K/V prepared here (fused_new), nothing this block reads before the
    // second pdl_enter below was written by the previous kernel: positions and cached keys and
    // values of earlier tokens come from earlier steps. So in a PDL chain those loads (through
    // L2, __ldcg) go out while the previous kernel (the QKV projection) finishes. Otherwise a
    // separate kv_write may just have written row p: wait first.
    if (!a.fused_new) pdl_enter();
    __shared__ float qf[128], kn[128], vn[128];
    // Per-warp partial outputs; reused as the split combine's scratch (>= 1024 floats).
    __shared__ float wo[1024];
    __shared__ float wm[AW_WARPS], wl[AW_WARPS];
    __shared__ float sh[32];
    __shared__ int flag;
    const int t = blockIdx.x, h = blockIdx.y, z = blockIdx.z, d = a.d;
    const int group = a.n_heads / a.n_kv, kv = h / group;
    const int p = __ldcg(pos + t), s = __ldcg(seq + t);
    if (p < 0 || p >= a.capacity) return;  // the host refuses such steps; never write outside
    const int nsplit = p / a.split_len + 1;
    if (z >= nsplit) return;
    const int lo = window_lo(p, a.window);
    const int j0 = max(lo, z * a.split_len), j1 = min(p, z * a.split_len + a.split_len - 1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, sub = lane & 3;
    const size_t cbase = (((size_t)s * a.layers + a.layer) * a.n_kv + kv) * a.capacity;
    const bool has_new = a.fused_new && j0 <= p && p <= j1;
    const int nc = d >> 5;          // 16-byte chunks per lane (<= 4)
    const int e0 = sub * (d >> 2);  // first element of this lane
    int jk[2];
    bool valid[2], use_new[2];
    uint4 kr[2][4], vr[2][4];
#pragma unroll
    for (int ps = 0; ps < 2; ps++) {
        const int j = z * a.split_len + warp * 16 + ps * 8 + g;
        jk[ps] = j;
        valid[ps] = j >= j0 && j <= j1;
        use_new[ps] = has_new && j == p;
        const bool from_cache = valid[ps] && !use_new[ps];
        const size_t row = (cbase + (from_cache ? j : 0)) * d + e0;
        const uint4* kp = (const uint4*)(kc + row);
        const uint4* vp = (const uint4*)(vc + row);
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const bool ld = from_cache && c < nc;
            kr[ps][c] = ld ? __ldcg(kp + c) : make_uint4(0, 0, 0, 0);
            vr[ps][c] = ld ? __ldcg(vp + c) : make_uint4(0, 0, 0, 0);
        }
    }
    // The head constants (biases, norm weights, RoPE frequencies) too.
    HeadConsts hc;
    if (warp == 0) {
        load_head_consts(q_bias ? q_bias + h * d : 0, q_norm, inv_freq, a.rot_dim, d, hc);
    } else if (warp == 1 && has_new) {
        load_head_consts(k_bias ? k_bias + kv * d : 0, k_norm, inv_freq, a.rot_dim, d, hc);
    }
    pdl_enter();  // q, the new token's k/v and every store come from / go after here
    if (warp == 0) {
        warp_head_prep_c(q_src + (size_t)t * q_stride + q_off + h * d, hc, a.eps, a.attn_factor,
                         a.rot_dim, p, d, qf);
    } else if (warp == 1 && has_new) {
        warp_head_prep_c(k_src + (size_t)t * k_stride + k_off + kv * d, hc, a.eps, a.attn_factor,
                         a.rot_dim, p, d, kn);
        new_kv(v_src + (size_t)t * v_stride + v_off + kv * d, v_bias ? v_bias + kv * d : 0, kn, vn,
               kc + (cbase + p) * d, vc + (cbase + p) * d, h % group == 0, d, lane, 32);
    }
    __syncthreads();
    // Scores of this lane's two keys: its d/4 elements, then the 4 lanes of each key.
    float score[2];
#pragma unroll
    for (int ps = 0; ps < 2; ps++) {
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            if (c >= nc) break;
            const u32 w4[4] = {kr[ps][c].x, kr[ps][c].y, kr[ps][c].z, kr[ps][c].w};
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int e = e0 + 8 * c + 2 * q;
                const float k0 = use_new[ps] ? kn[e] : bf_lo(w4[q]);
                const float k1 = use_new[ps] ? kn[e + 1] : bf_hi(w4[q]);
                acc += qf[e] * k0 + qf[e + 1] * k1;
            }
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        score[ps] = valid[ps] ? acc * a.scale : NEG_INF;
    }
    // The next products' weights (`l2`: the output projection's, a dense FFN's first rows):
    // the rest of this kernel is a dependent chain that leaves DRAM nearly idle, so each block
    // with keys asks L2 for its share of them here, once its own keys and values have arrived
    // (asked at the start, they queued ahead of those loads: H100, MiMo-7B 433-437 vs 442
    // tokens/s).
    if (threadIdx.x == 0)
        prefetch_l2_share(l2, (u64)h * nsplit + z, (u64)a.n_heads * nsplit);  // m == 1
    // The warp's softmax over its 16 keys.
    float mw = fmaxf(score[0], score[1]);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) mw = fmaxf(mw, __shfl_xor_sync(0xffffffffu, mw, o));
    float pg[2];
#pragma unroll
    for (int ps = 0; ps < 2; ps++) pg[ps] = valid[ps] ? expf(score[ps] - mw) : 0.f;
    float lw = pg[0] + pg[1];
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) lw += __shfl_xor_sync(0xffffffffu, lw, o);
    // P.V on this lane's elements, summed over the warp's 16 keys.
#pragma unroll
    for (int c = 0; c < 4; c++) {
        if (c >= nc) break;
        float o8[8];
#pragma unroll
        for (int i = 0; i < 8; i++) o8[i] = 0.f;
#pragma unroll
        for (int ps = 0; ps < 2; ps++) {
            const u32 w4[4] = {vr[ps][c].x, vr[ps][c].y, vr[ps][c].z, vr[ps][c].w};
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int e = e0 + 8 * c + 2 * q;
                o8[2 * q] += pg[ps] * (use_new[ps] ? vn[e] : bf_lo(w4[q]));
                o8[2 * q + 1] += pg[ps] * (use_new[ps] ? vn[e + 1] : bf_hi(w4[q]));
            }
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) o8[i] += __shfl_xor_sync(0xffffffffu, o8[i], o);
        }
        if (g == 0) {
#pragma unroll
            for (int i = 0; i < 8; i++) wo[warp * 128 + e0 + 8 * c + i] = o8[i];
        }
    }
    if (lane == 0) {
        wm[warp] = mw;
        wl[warp] = lw;
    }
    __syncthreads();
    // Merge the warps in order.
    float m_all = NEG_INF;
#pragma unroll
    for (int w = 0; w < AW_WARPS; w++) m_all = fmaxf(m_all, wm[w]);
    float f[AW_WARPS];
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < AW_WARPS; w++) {
        f[w] = wm[w] == NEG_INF ? 0.f : expf(wm[w] - m_all);
        l += f[w] * wl[w];
    }
    const size_t row = (size_t)t * a.n_heads + h;
    float* po = part_o + (row * a.max_splits + z) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < AW_WARPS; w++) o += f[w] * wo[w * 128 + i];
        if (nsplit == 1) {
            out[row * d + i] = to_bf(o / l);
        } else {
            po[i] = o;
        }
    }
    trace_mark();  // the split's own work done
    if (nsplit == 1) return;
    if (threadIdx.x == 0) {
        part_ml[(row * a.max_splits + z) * 2] = m_all;
        part_ml[(row * a.max_splits + z) * 2 + 1] = l;
    }
    // wo becomes the combine's scratch: last_block's barrier orders it after the reads above.
    combine_splits(part_ml, part_o, counters, out, row, nsplit, a.max_splits, d, wo, sh, &flag);
    trace_mark();
}

// ---------------------------------------------------------------------------------------------
// Batched decode attention on the tensor cores, one block per (token, KV head, split): the
// query heads of a KV group share every key and value the block loads (the per-head kernels
// above read them once per query head: 8 times over for Qwen3-30B-A3B's 32 / 4 heads).
// grid (m tokens, n_kv, max_splits), 4 warps; split z covers keys [z*L, z*L + L) of [lo, pos]
// (L = split_len, a multiple of 64), taken 64 at a time, 16 per warp. The group's q rows
// (G <= 16, padded to the 16 rows of an m16n8k16 tile) are prepared in f32 (bias, norm, RoPE:
// warp_head_prep) and rounded to bf16 as mma A fragments; S = Q K^T and O += P V are mma with
// f32 accumulators and an online softmax per warp (P rounded to bf16, its row sums taken over
// the rounded values, as attention_prefill). Lane (g = lane / 4, t = lane % 4) loads 16-byte
// pieces only: K rows g and 8 + g at elements [t D/4, (t + 1) D/4) (the k slots of each mma
// step mapped onto 4 consecutive elements of the lane's piece, the same map for Q), V rows 2t,
// 2t + 1, 2t + 8, 2t + 9 at elements [g D/8, (g + 1) D/8) (output column g of n-tile j is
// element g D/8 + j). The 4 warps' (max, sum, out) are merged in warp order; with several
// splits the last block of the (token, KV head) combines each head's splits in split order.
// The new token's key and value are prepared and written to the cache by the block holding
// `pos` (fused_new: decode steps only).
// ---------------------------------------------------------------------------------------------
#define AG_WARPS 4
#define AG_MAX_GROUP 16
template <int D, bool WIDE>
__device__ __forceinline__ void attention_gqa_body(
    const u16* __restrict__ q_src, int q_off, int q_stride, const u16* __restrict__ k_src,
    int k_off, int k_stride, const u16* __restrict__ v_src, int v_off, int v_stride,
    const float* __restrict__ q_bias, const float* __restrict__ k_bias,
    const float* __restrict__ v_bias, const float* __restrict__ q_norm,
    const float* __restrict__ k_norm, const float* __restrict__ inv_freq,
    const int* __restrict__ pos, const int* __restrict__ seq, u16* __restrict__ kc,
    u16* __restrict__ vc, float* __restrict__ part_ml, float* __restrict__ part_o,
    int* __restrict__ counters, u16* __restrict__ out, const AttnArgs& a) {
    constexpr int KU = D / 32;  // 16-byte K pieces per lane and key
    constexpr int VU = D / 64;  // 16-byte V pieces per lane and key
    constexpr int KS = D / 16;  // k steps of Q K^T
    constexpr int NT = D / 8;   // n tiles of P V
    constexpr int ROWS = WIDE ? 16 : 8;
    __shared__ __align__(16) float qf[ROWS * D];
    __shared__ __align__(16) float wo[AG_WARPS * ROWS * D];  // also the combine's scratch
    __shared__ __align__(16) float kn[D], vn[D];
    __shared__ float wm[AG_WARPS * ROWS], wl[AG_WARPS * ROWS];
    __shared__ float sh[32];
    __shared__ int flag;
    const int t = blockIdx.x, kvh = blockIdx.y, z = blockIdx.z;
    const int group = a.n_heads / a.n_kv, h0 = kvh * group;
    const int p = __ldcg(pos + t), s = __ldcg(seq + t);
    if (p < 0 || p >= a.capacity) return;  // the host refuses such steps; never write outside
    const int nsplit = p / a.split_len + 1;
    if (z >= nsplit) return;
    const int lo = window_lo(p, a.window);
    const int k_first = z * a.split_len;
    const int j0 = max(lo, k_first), j1 = min(p, k_first + a.split_len - 1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const size_t cbase = (((size_t)s * a.layers + a.layer) * a.n_kv + kvh) * a.capacity;
    const bool has_new = a.fused_new && j0 <= p && p <= j1;
    uint4 kr[2][KU], vr[4][VU];
    // The loads of the warp's 16 keys from `kb` (keys outside [j0, j1] and the new one: zeros),
    // keys and values apart: the next chunk's keys are loaded once this chunk's scores are
    // taken, its values once P V is done, so that they arrive while this chunk is computed.
    auto load_k = [&](int kb) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int key = kb + 8 * j + g;
            const bool ok = key >= j0 && key <= j1 && !(has_new && key == p);
            const uint4* src = (const uint4*)(kc + (cbase + (ok ? key : 0)) * D + tq * (D / 4));
#pragma unroll
            for (int c = 0; c < KU; c++) kr[j][c] = ok ? __ldcg(src + c) : make_uint4(0, 0, 0, 0);
        }
    };
    auto load_v = [&](int kb) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int key = kb + (j & 1) + 2 * tq + 8 * (j >> 1);
            const bool ok = key >= j0 && key <= j1 && !(has_new && key == p);
            const uint4* src = (const uint4*)(vc + (cbase + (ok ? key : 0)) * D + g * (D / 8));
#pragma unroll
            for (int c = 0; c < VU; c++) vr[j][c] = ok ? __ldcg(src + c) : make_uint4(0, 0, 0, 0);
        }
    };
    // Cached keys and values of earlier tokens were written by earlier steps: the first loads go
    // out before the wait.
    load_k(k_first + warp * 16);
    load_v(k_first + warp * 16);
    pdl_enter();
    // The warp's query heads (r = warp, warp + 4, ...): every load first, then the norms and
    // rotations (one L2 round trip per warp, not one per head).
    {
        constexpr int PER = AG_MAX_GROUP / AG_WARPS;
        float raw[PER][4];
#pragma unroll
        for (int rr = 0; rr < PER; rr++) {
            const int r = warp + AG_WARPS * rr;
            if (r < group) warp_head_load(q_src + (size_t)t * q_stride + q_off + (h0 + r) * D, D, raw[rr]);
        }
#pragma unroll
        for (int rr = 0; rr < PER; rr++) {
            const int r = warp + AG_WARPS * rr;
            if (r < group) {
                HeadConsts hc;
                load_head_consts(q_bias ? q_bias + (h0 + r) * D : 0, q_norm, inv_freq, a.rot_dim,
                                 D, hc);
                warp_head_finish(raw[rr], hc, a.eps, a.attn_factor, a.rot_dim, p, D, qf + r * D);
            }
        }
    }
    if (has_new && warp == AG_WARPS - 1) {
        warp_head_prep(k_src + (size_t)t * k_stride + k_off + kvh * D,
                       k_bias ? k_bias + kvh * D : 0, k_norm, a.eps, inv_freq, a.attn_factor,
                       a.rot_dim, p, D, kn);
        new_kv(v_src + (size_t)t * v_stride + v_off + kvh * D, v_bias ? v_bias + kvh * D : 0, kn,
               vn, kc + (cbase + p) * D, vc + (cbase + p) * D, true, D, lane, 32);
    }
    __syncthreads();
    // Q fragments: rows g and 8 + g (zero past the group), k step st at the lane's elements
    // t D/4 + 4 st + {0, 1} (slots 2t, 2t + 1) and + {2, 3} (slots 2t + 8, 2t + 9).
    u32 qa[KS][2], qb[KS][2];
#pragma unroll
    for (int st = 0; st < KS; st++) {
        const int e = tq * (D / 4) + 4 * st;
        const bool r0 = g < group, r1 = WIDE && g + 8 < group;
        qa[st][0] = r0 ? f32x2_to_bf16x2(qf[g * D + e], qf[g * D + e + 1]) : 0u;
        qa[st][1] = r0 ? f32x2_to_bf16x2(qf[g * D + e + 2], qf[g * D + e + 3]) : 0u;
        qb[st][0] = r1 ? f32x2_to_bf16x2(qf[(g + 8) * D + e], qf[(g + 8) * D + e + 1]) : 0u;
        qb[st][1] = r1 ? f32x2_to_bf16x2(qf[(g + 8) * D + e + 2], qf[(g + 8) * D + e + 3]) : 0u;
    }
    const float sl2 = a.scale * 1.4426950408889634f;  // scores in log2 units: exp2f below
    float o[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const int k_end = min(j1 + 1, k_first + a.split_len);
    for (int cb = k_first; cb < k_end; cb += 64) {
        const int kb = cb + warp * 16;
        const bool more = cb + 64 < k_end;
        if (has_new) {  // the new token's key from shared memory (bf16-exact)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                if (kb + 8 * j + g == p) {
#pragma unroll
                    for (int c = 0; c < KU; c++) {
                        const float* f = kn + tq * (D / 4) + 8 * c;
                        kr[j][c] = make_uint4(f32x2_to_bf16x2(f[0], f[1]), f32x2_to_bf16x2(f[2], f[3]),
                                              f32x2_to_bf16x2(f[4], f[5]), f32x2_to_bf16x2(f[6], f[7]));
                    }
                }
            }
        }
        // S = Q K^T for the warp's two tiles of 8 keys.
        float sc[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
            for (int st = 0; st < KS; st++) {
                const uint4 k4 = kr[j][st >> 1];
                const u32 b0 = (st & 1) ? k4.z : k4.x, b1 = (st & 1) ? k4.w : k4.y;
                mma_bf16_16816(sc[j], qa[st][0], qb[st][0], qa[st][1], qb[st][1], b0, b1);
            }
        }
        if (more) load_k(kb + 64);
        // Online softmax: this lane holds keys kb + 8j + 2t + {0, 1} of rows g and 8 + g.
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int key = kb + 8 * j + 2 * tq + i;
                const bool ok = key >= j0 && key <= j1;
                sc[j][i] = ok ? sc[j][i] * sl2 : NEG_INF;
                sc[j][2 + i] = ok ? sc[j][2 + i] * sl2 : NEG_INF;
                mx0 = fmaxf(mx0, sc[j][i]);
                mx1 = fmaxf(mx1, sc[j][2 + i]);
            }
        }
#pragma unroll
        for (int sft = 1; sft < 4; sft <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, sft));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, sft));
        }
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float c0 = n0 == NEG_INF ? 1.f : exp2f(m0 - n0);
        const float c1 = n1 == NEG_INF ? 1.f : exp2f(m1 - n1);
        m0 = n0;
        m1 = n1;
        u32 pa[2][2];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const float p0 = n0 == NEG_INF ? 0.f : exp2f(sc[j][0] - n0);
            const float p1 = n0 == NEG_INF ? 0.f : exp2f(sc[j][1] - n0);
            const float p2 = n1 == NEG_INF ? 0.f : exp2f(sc[j][2] - n1);
            const float p3 = n1 == NEG_INF ? 0.f : exp2f(sc[j][3] - n1);
            pa[j][0] = f32x2_to_bf16x2(p0, p1);
            pa[j][1] = f32x2_to_bf16x2(p2, p3);
        }
        l0 = l0 * c0 + bf_lo(pa[0][0]) + bf_hi(pa[0][0]) + bf_lo(pa[1][0]) + bf_hi(pa[1][0]);
        l1 = l1 * c1 + bf_lo(pa[0][1]) + bf_hi(pa[0][1]) + bf_lo(pa[1][1]) + bf_hi(pa[1][1]);
        if (has_new) {  // and value
#pragma unroll
            for (int j = 0; j < 4; j++) {
                if (kb + (j & 1) + 2 * tq + 8 * (j >> 1) == p) {
#pragma unroll
                    for (int c = 0; c < VU; c++) {
                        const float* f = vn + g * (D / 8) + 8 * c;
                        vr[j][c] = make_uint4(f32x2_to_bf16x2(f[0], f[1]), f32x2_to_bf16x2(f[2], f[3]),
                                              f32x2_to_bf16x2(f[4], f[5]), f32x2_to_bf16x2(f[6], f[7]));
                    }
                }
            }
        }
        // O = O * c + P V: P's k slots 2t, 2t + 1, 2t + 8, 2t + 9 are this lane's keys of
        // tiles 0 and 1, i.e. V rows vr[0..4); column g of n tile jn is element g D/8 + jn.
#pragma unroll
        for (int jn = 0; jn < NT; jn++) {
            o[jn][0] *= c0;
            o[jn][1] *= c0;
            o[jn][2] *= c1;
            o[jn][3] *= c1;
            const int c = jn >> 3, w = (jn & 7) >> 1;
            const u32 sel = (jn & 1) ? 0x7632u : 0x5410u;
            const u32 v0 = w == 0 ? vr[0][c].x : w == 1 ? vr[0][c].y : w == 2 ? vr[0][c].z : vr[0][c].w;
            const u32 v1 = w == 0 ? vr[1][c].x : w == 1 ? vr[1][c].y : w == 2 ? vr[1][c].z : vr[1][c].w;
            const u32 v2 = w == 0 ? vr[2][c].x : w == 1 ? vr[2][c].y : w == 2 ? vr[2][c].z : vr[2][c].w;
            const u32 v3 = w == 0 ? vr[3][c].x : w == 1 ? vr[3][c].y : w == 2 ? vr[3][c].z : vr[3][c].w;
            mma_bf16_16816(o[jn], pa[0][0], pa[0][1], pa[1][0], pa[1][1], __byte_perm(v0, v1, sel),
                           __byte_perm(v2, v3, sel));
        }
        if (more) load_v(kb + 64);
    }
#pragma unroll
    for (int sft = 1; sft < 4; sft <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, sft);
        l1 += __shfl_xor_sync(0xffffffffu, l1, sft);
    }
    // Each warp's rows to shared memory: lane columns 2t, 2t + 1 of n tile jn are elements
    // (2t) D/8 + jn and (2t + 1) D/8 + jn.
    if (tq == 0) {
        wm[warp * ROWS + g] = m0;
        wl[warp * ROWS + g] = l0;
        if (WIDE) {
            wm[warp * ROWS + g + 8] = m1;
            wl[warp * ROWS + g + 8] = l1;
        }
    }
#pragma unroll
    for (int jn = 0; jn < NT; jn++) {
        float* r0 = wo + (warp * ROWS + g) * D;
        r0[(2 * tq) * (D / 8) + jn] = o[jn][0];
        r0[(2 * tq + 1) * (D / 8) + jn] = o[jn][1];
        if (WIDE) {
            float* r1 = wo + (warp * ROWS + g + 8) * D;
            r1[(2 * tq) * (D / 8) + jn] = o[jn][2];
            r1[(2 * tq + 1) * (D / 8) + jn] = o[jn][3];
        }
    }
    __syncthreads();
    // Merge the warps in order; the split's (max, sum) in natural-log units as the combine
    // expects (m * ln 2).
    for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
        const int r = idx / D, i = idx - r * D;
        float m_all = NEG_INF;
#pragma unroll
        for (int w = 0; w < AG_WARPS; w++) m_all = fmaxf(m_all, wm[w * ROWS + r]);
        float l = 0.f, acc = 0.f;
#pragma unroll
        for (int w = 0; w < AG_WARPS; w++) {
            const float mw = wm[w * ROWS + r];
            const float f = mw == NEG_INF ? 0.f : exp2f(mw - m_all);
            l += f * wl[w * ROWS + r];
            acc += f * wo[(w * ROWS + r) * D + i];
        }
        const size_t row = (size_t)t * a.n_heads + h0 + r;
        if (nsplit == 1) {
            out[row * D + i] = to_bf(acc / l);
        } else {
            part_o[(row * a.max_splits + z) * D + i] = acc;
            if (i == 0) {
                part_ml[(row * a.max_splits + z) * 2] =
                    m_all == NEG_INF ? NEG_INF : m_all * 0.6931471805599453f;
                part_ml[(row * a.max_splits + z) * 2 + 1] = l;
            }
        }
    }
    trace_mark();
    if (nsplit == 1) return;
    // wo becomes the combine's scratch: last_block's barrier orders it after the reads above.
    if (!last_block(counters + (size_t)t * a.n_heads + h0, nsplit, &flag)) return;
    const size_t row0 = (size_t)t * a.n_heads + h0;
    if (group * (nsplit + 1) > AG_WARPS * ROWS * D) {
        // More splits than the scratch holds for all rows at once (very long contexts): the
        // rows one after the other.
        for (int r = 0; r < group; r++) {
            if (r > 0) __syncthreads();
            combine_row(part_ml, part_o, out, row0 + r, nsplit, a.max_splits, D, wo, sh);
        }
    } else {
        // All rows at once: each warp takes rows warp, warp + 4, ... and writes their split
        // factors exp(m_z - M) (wo[r * nsplit + z]) and sums (wo[group * nsplit + r]); then
        // every thread forms its outputs from them, splits in order (deterministic).
        float* fz = wo;
        float* lsum = wo + group * nsplit;
        for (int r = warp; r < group; r += AG_WARPS) {
            const float* pm = part_ml + (row0 + r) * a.max_splits * 2;
            float mx = NEG_INF;
            for (int zz = lane; zz < nsplit; zz += 32) mx = fmaxf(mx, __ldcg(pm + 2 * zz));
#pragma unroll
            for (int sft = 16; sft > 0; sft >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, sft));
            float ls = 0.f;
            for (int zz = lane; zz < nsplit; zz += 32) {
                const float mz = __ldcg(pm + 2 * zz);
                const float f = mz == NEG_INF ? 0.f : expf(mz - mx);
                fz[r * nsplit + zz] = f;
                ls += f * __ldcg(pm + 2 * zz + 1);
            }
#pragma unroll
            for (int sft = 16; sft > 0; sft >>= 1) ls += __shfl_xor_sync(0xffffffffu, ls, sft);
            if (lane == 0) lsum[r] = ls;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
            const int r = idx / D, i = idx - r * D;
            const float* po = part_o + (row0 + r) * a.max_splits * D + i;
            const float* f = fz + r * nsplit;
            float acc = 0.f;
            int zz = 0;
            for (; zz + 4 <= nsplit; zz += 4) {
                const float p0 = __ldcg(po + (size_t)zz * D), p1 = __ldcg(po + (size_t)(zz + 1) * D);
                const float p2 = __ldcg(po + (size_t)(zz + 2) * D), p3 = __ldcg(po + (size_t)(zz + 3) * D);
                acc += f[zz] * p0;
                acc += f[zz + 1] * p1;
                acc += f[zz + 2] * p2;
                acc += f[zz + 3] * p3;
            }
            for (; zz < nsplit; zz++) acc += f[zz] * __ldcg(po + (size_t)zz * D);
            out[(row0 + r) * D + i] = to_bf(acc / lsum[r]);
        }
    }
    trace_mark();
}

#define ATTENTION_GQA(name, D, WIDE)                                                              \
    extern "C" __global__ void __launch_bounds__(AG_WARPS * 32) name(ATTN_PARAMS) {              \
        attention_gqa_body<D, WIDE>(q_src, q_off, q_stride, k_src, k_off, k_stride, v_src, v_off, \
                                    v_stride, q_bias, k_bias, v_bias, q_norm, k_norm, inv_freq,  \
                                    pos, seq, kc, vc, part_ml, part_o, counters, out, a);        \
    }
ATTENTION_GQA(attention_gqa_d64, 64, false)
ATTENTION_GQA(attention_gqa_d64_wide, 64, true)
ATTENTION_GQA(attention_gqa_d128, 128, false)
ATTENTION_GQA(attention_gqa_d128_wide, 128, true)

// ---------------------------------------------------------------------------------------------
// SwiGLU: out[t][i] = silu(g[t][i]) * u[t][i], rows of g and u `stride` elements apart (a fused
// gate/up output passes the same buffer twice, u offset by `inter`, stride 2 * inter).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void swiglu(const u16* __restrict__ g, const u16* __restrict__ u, int stride,
                                  u16* __restrict__ out, int m, int inter) {
    pdl_enter();
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)m * inter) return;
    const size_t t = idx / inter, i = idx - t * inter;
    const float gv = bf(g[t * stride + i]);
    const float uv = bf(u[t * stride + i]);
    out[idx] = to_bf(gv / (1.f + expf(-gv)) * uv);
}

// ---------------------------------------------------------------------------------------------
// Calibration statistics on the device (crates/runtime/src/cuda/model/walk.rs).
// calib_gather: dst[r][j] = src[idx[r] * stride + off + j] for j < width, or with `swiglu` the
// down projection's input silu(g) * u of a [gate | up] row (g at off + j, u at off + width + j),
// rounded to bf16 exactly as swiglu2 forms it for the grouped down kernel.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void calib_gather(const u16* __restrict__ src, const int* __restrict__ idx,
                                        int n, int width, int stride, int off, int swiglu,
                                        u16* __restrict__ dst) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * width) return;
    const size_t r = i / width, j = i - r * width;
    const u16* row = src + (size_t)idx[r] * stride + off;
    if (swiglu) {
        const float g = bf(row[j]), u = bf(row[width + j]);
        dst[i] = to_bf(g / (1.f + expf(-g)) * u);
    } else {
        dst[i] = row[j];
    }
}

// calib_amax: *out = max(*out, max |x[i]|) over n bf16 values, as the bits of a non-negative
// float (their order is the unsigned order; a NaN input wins, as it should be seen).
extern "C" __global__ void calib_amax(const u16* __restrict__ x, unsigned long long n,
                                      unsigned* __restrict__ out) {
    float m = 0.f;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float v = fabsf(bf(x[i]));
        m = (v > m || v != v) ? v : m;
    }
    unsigned b = __float_as_uint(m);
    for (int o = 16; o > 0; o >>= 1) b = max(b, __shfl_xor_sync(0xffffffffu, b, o));
    if ((threadIdx.x & 31) == 0) atomicMax(out, b);
}

// y[t][n] += bias[n] (bf16 in place).
extern "C" __global__ void add_bias(u16* __restrict__ y, const float* __restrict__ b, int m, int n) {
    pdl_enter();
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)m * n) return;
    y[idx] = to_bf(bf(y[idx]) + b[idx % n]);
}

// ---------------------------------------------------------------------------------------------
// Router: logits = x[t] . W[e] in f32 (one warp per expert, 8 experts per block), then the last
// block of token t: softmax over all experts, top-k (ties to the lower index), optional
// renormalisation. grid (ceil(E / 8), m), 256 threads; E <= 1024.
// Fused mode (xres != 0; decode graphs of MoE layers without a shared expert): x is not read;
// every block forms the row itself from the residual, v = xres[t] + d1[t] (the attention
// output, which the next add_rmsnorm adds to the residual), h = bf16(normw * v * rsqrt(mean(v^2)
// + eps)), in dynamic shared memory (hidden floats); blocks with blockIdx.x == 0 also store h
// (the experts' input). One launch less per MoE layer than add_rmsnorm + router.
// (A cluster version, 8 blocks whose logits block 0 read over DSMEM, was slower on the H100:
// bench/results/e2e-h100-cluster-router-experiment.json.)
// ---------------------------------------------------------------------------------------------
#define ROUTER_PRE 8

// acc += 8 router weights (bf16, one 16-byte piece) times the row's elements c..c+8, from
// shared memory (fused mode, f32) or the bf16 input row, added in element order.
__device__ __forceinline__ void router_dot8(float& acc, uint4 wv, bool fused, const float* hs,
                                            const u16* __restrict__ xr, int c) {
    const u32 ws[4] = {wv.x, wv.y, wv.z, wv.w};
    float xf[8];
    if (fused) {
#pragma unroll
        for (int q = 0; q < 8; q++) xf[q] = hs[c + q];
    } else {
        const uint4 xv = *(const uint4*)(xr + c);
        const u32 xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            xf[2 * q] = __uint_as_float(xs[q] << 16);
            xf[2 * q + 1] = __uint_as_float(xs[q] & 0xFFFF0000u);
        }
    }
#pragma unroll
    for (int q = 0; q < 4; q++) {
        acc += xf[2 * q] * __uint_as_float(ws[q] << 16);
        acc += xf[2 * q + 1] * __uint_as_float(ws[q] & 0xFFFF0000u);
    }
}

// The warp's first ROUTER_PRE 16-byte pieces per lane of expert row wr (hidden <= 2048
// entirely). The router weights are never written by another kernel: requested before
// pdl_enter, they arrive while the previous kernel finishes.
__device__ __forceinline__ void router_prefetch(const u16* __restrict__ wr, int hidden, bool vec,
                                                uint4 (&wpre)[ROUTER_PRE]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < ROUTER_PRE; i++) {
        const int c = lane * 8 + i * 256;
        wpre[i] = wr != 0 && vec && c < hidden ? *(const uint4*)(wr + c) : make_uint4(0, 0, 0, 0);
    }
}

// Fused mode's normalized row into hs (whole block, after pdl_enter), block 0 also storing it
// to h_out. nw: this thread's norm weights (load_norm_weights, before the wait).
__device__ __forceinline__ void router_norm_row(const float* __restrict__ xres,
                                                const u16* __restrict__ d1,
                                                const float* __restrict__ normw, float eps,
                                                u16* __restrict__ h_out, int t, int hidden,
                                                const float (&nw)[NORM_REG], float* hs,
                                                float* shv) {
    const float* xr = xres + (size_t)t * hidden;
    const u16* dr = d1 != 0 ? d1 + (size_t)t * hidden : 0;
    rmsnorm_row(
        hidden, eps, normw, nw, true, shv,
        [&](int i) {
            float v = xr[i];
            if (dr != 0) v += bf(dr[i]);
            return v;
        },
        [&](int i, float v) { hs[i] = v; }, [&](int i) { return hs[i]; },
        [&](int i, u16 hb) {
            hs[i] = bf(hb);
            if (blockIdx.x == 0) h_out[(size_t)t * hidden + i] = hb;
        });
    __syncthreads();
}

// One warp: expert row wr . the input row (wpre: its first pieces, already loaded), reduced
// over the warp (every lane gets the sum).
__device__ __forceinline__ float router_expert_dot(const u16* __restrict__ wr,
                                                   const uint4 (&wpre)[ROUTER_PRE], bool vec,
                                                   bool fused, const float* hs,
                                                   const u16* __restrict__ xr, int hidden) {
    const int lane = threadIdx.x & 31;
    float acc = 0.f;
    if (vec) {
        // Same order as one loop over c = lane * 8, + 256, ...: the preloaded pieces first,
        // then (hidden > 256 * ROUTER_PRE) the rest loaded here.
#pragma unroll
        for (int i = 0; i < ROUTER_PRE; i++) {
            const int c = lane * 8 + i * 256;
            if (c < hidden) router_dot8(acc, wpre[i], fused, hs, xr, c);
        }
        for (int c = lane * 8 + ROUTER_PRE * 256; c < hidden; c += 256)
            router_dot8(acc, *(const uint4*)(wr + c), fused, hs, xr, c);
    } else {
        for (int c = lane; c < hidden; c += 32) acc += (fused ? hs[c] : bf(xr[c])) * bf(wr[c]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

extern "C" __global__ void __launch_bounds__(256)
router_topk(const u16* __restrict__ x, const u16* __restrict__ w, float* __restrict__ logits,
            int* __restrict__ counters, int* __restrict__ ids, float* __restrict__ weights,
            int hidden, int n_experts, int top_k, int renorm, const float* __restrict__ xres,
            const u16* __restrict__ d1, const float* __restrict__ normw, float eps,
            u16* __restrict__ h_out, int select) {
    extern __shared__ float hs[];
    __shared__ __align__(16) float prob[MOE_ROUTER_MAX_EXPERTS];
    __shared__ float shv[32];
    __shared__ float sel_p[MOE_ROUTER_MAX_TOPK];  // checked at load
    __shared__ int sel_id[MOE_ROUTER_MAX_TOPK];
    __shared__ int flag;
    const int t = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int e = blockIdx.x * 8 + warp;
    const bool fused = xres != 0;
    const bool vec = (hidden & 7) == 0;
    const u16* wr = e < n_experts ? w + (size_t)e * hidden : 0;
    uint4 wpre[ROUTER_PRE];
    router_prefetch(wr, hidden, vec, wpre);
    // Fused mode: the norm weights too.
    float nw[NORM_REG];
    load_norm_weights(normw, hidden, fused, nw);
    pdl_enter();
    if (fused) router_norm_row(xres, d1, normw, eps, h_out, t, hidden, nw, hs, shv);
    if (e < n_experts) {
        const float acc =
            router_expert_dot(wr, wpre, vec, fused, hs, x + (size_t)t * hidden, hidden);
        if (lane == 0) logits[(size_t)t * n_experts + e] = acc;
    }
    // select == 0: the logits are the output; the one-token expert kernels take the top-k
    // themselves (moe_topk_from_logits, as below), so no launch waits for this block's last
    // step.
    if (!select) return;
    if (!last_block(counters + t, gridDim.x, &flag)) return;
    moe_topk_from_logits(logits + (size_t)t * n_experts, n_experts, top_k, prob, sel_p, sel_id);
    for (int j = threadIdx.x; j < top_k; j += blockDim.x) {
        ids[(size_t)t * top_k + j] = sel_id[j];
        weights[(size_t)t * top_k + j] = router_weight(sel_p, j, top_k, renorm);
    }
}

// 32-bit hash of a 64-bit counter (murmur3 finaliser): device random numbers that depend only
// on their key (random weights, sampling noise).
__device__ __forceinline__ u32 hash32(u64 x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (u32)x;
}

// Standard Gumbel noise -log(-log(u)) for token i under `key`, u in (0, 1) from 24 hash bits.
__device__ __forceinline__ float gumbel_noise(u64 key, int i) {
    const u32 h = hash32(key * 0x9E3779B97F4A7C15ULL + (u64)i);
    const float u = ((float)(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
    return -logf(-logf(u));
}

// ---------------------------------------------------------------------------------------------
// Nucleus (top-p) threshold on the GPU. The rule and its CPU reference are in
// crates/runtime/src/generate/nucleus.rs (the GPU tests compare bit for bit):
//   key(logit): order-preserving 16-bit key of the bf16 bits (NaN -> -inf, -0 -> +0);
//   mass(key) = count * floor(exp((value(key) - vmax) * inv_t) * 2^32) as an integer (exp
//     from correctly rounded f64 operations only, so the CPU gets the same bits);
//   threshold = the highest key whose running mass from the top reaches top_p * S.
// Integer masses make every summation order give the same sum: integer atomics and any
// reduction tree are deterministic. Tokens of equal logit value are all in or all out.
// Per row: hist[TOPP_KEYS] u32 counts and kmax (highest key present), both zero between steps:
// topp_histogram fills them, topp_threshold resets kmax, argmax_next zeroes hist.
// ---------------------------------------------------------------------------------------------
#define TOPP_KEYS 65536
#define TOPP_SPAN 1024  // keys per topp_threshold block: 256 threads x 4

__device__ __forceinline__ u32 logit_key(u16 h) {
    if ((h & 0x7FFFu) > 0x7F80u) h = 0xFF80u;  // NaN -> -inf
    if (h == 0x8000u) h = 0;                   // -0 -> +0
    return (h & 0x8000u) ? (u32)(~h & 0xFFFFu) : (u32)(h | 0x8000u);
}

__device__ __forceinline__ float key_value(u32 key) {
    return bf((u16)((key & 0x8000u) ? (key & 0x7FFFu) : (~key & 0xFFFFu)));
}

// exp(x) for x in [-23, 0]: Cody-Waite reduction, degree-12 Taylor series in Horner form, times
// 2^n. Only correctly rounded operations (explicit _rn intrinsics and fma, no contraction), the
// same sequence as nucleus::det_exp.
__device__ __forceinline__ double det_exp(double x) {
    const double n = rint(__dmul_rn(x, __longlong_as_double(0x3FF71547652B82FELL)));
    double r = fma(-n, __longlong_as_double(0x3FE62E42FEE00000LL), x);
    r = fma(-n, __longlong_as_double(0x3DEA39EF35793C76LL), r);
    double p = 1.0;
#pragma unroll
    for (int k = 12; k >= 1; k--) p = fma(__ddiv_rn(r, (double)k), p, 1.0);
    return __dmul_rn(p, __longlong_as_double((long long)(1023 + (int)n) << 52));
}

__device__ __forceinline__ u64 topp_mass(u32 key, u32 count, u32 kmax, double inv_t) {
    if (count == 0) return 0;
    if (key == kmax) return (u64)count << 32;
    const double d = __dmul_rn(__dsub_rn((double)key_value(key), (double)key_value(kmax)), inv_t);
    if (!(d >= -23.0)) return 0;
    return (u64)count * (u64)__dmul_rn(det_exp(d), 4294967296.0);
}

// Sum of v over the threads above this one (threadIdx.x + 1 ..). `sh` holds 32 entries.
__device__ u64 block_sum_above(u64 v, u64* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    u64 incl = v;  // becomes the sum over lanes lane..31
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_down_sync(0xffffffffu, incl, o);
        if (lane + o < 32) incl += y;
    }
    __syncthreads();
    if (lane == 0) sh[warp] = incl;
    __syncthreads();
    u64 hi = 0;
    for (int w = warp + 1; w < nw; w++) hi += sh[w];
    return incl - v + hi;
}

// hist[b][key(l)] += 1 for every logit of row b, kmax[b] = max key. grid (ceil(V / chunk), B),
// 256 threads.
extern "C" __global__ void __launch_bounds__(256)
topp_histogram(const u16* __restrict__ logits, int vocab, int chunk, u32* __restrict__ hist,
               u32* __restrict__ kmax) {
    pdl_enter();
    const int b = blockIdx.y;
    const int c0 = blockIdx.x * chunk, c1 = min(vocab, c0 + chunk);
    u32* h = hist + (size_t)b * TOPP_KEYS;
    const int lane = threadIdx.x & 31;
    u32 km = 0;
    // Lanes of a warp with the same key add once (logits cluster in few bins, and a row of
    // equal logits would otherwise serialize the whole vocabulary on one address). The loop
    // bounds are uniform over the block, so every lane takes part in each match.
    for (int base = c0; base < c1; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const u32 k = i < c1 ? logit_key(logits[(size_t)b * vocab + i]) : 0xFFFFFFFFu;
        const u32 peers = __match_any_sync(0xffffffffu, k);
        if (k != 0xFFFFFFFFu) {
            if (lane == __ffs(peers) - 1) atomicAdd(h + k, (u32)__popc(peers));
            km = max(km, k);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) km = max(km, __shfl_xor_sync(0xffffffffu, km, o));
    if (lane == 0 && km != 0) atomicMax(kmax + b, km);
}

// thr[b] = the nucleus threshold key of row b (0: keep every token) from hist and kmax, with
// inv_t = samp[0] and top_p = samp[3] (see sampling_words). grid (TOPP_KEYS / TOPP_SPAN, B),
// 256 threads: each block sums the masses of its 1024 keys into part[b][block]; the last block
// of the row finds the block where the running mass from the top crosses top_p * S, rescans
// it, and resets kmax[b] to 0 for the next step.
extern "C" __global__ void __launch_bounds__(256)
topp_threshold(const u32* __restrict__ hist, u32* __restrict__ kmax, u64* __restrict__ part,
               int* __restrict__ counters, u32* __restrict__ thr, const u32* __restrict__ samp) {
    pdl_enter();
    __shared__ u64 sh[32];
    __shared__ int flag, s_blk;
    __shared__ u64 s_above;
    __shared__ double s_target;
    __shared__ u32 s_thr;
    const int b = blockIdx.y, nb = gridDim.x;
    const u32 km = kmax[b];
    const float inv_t_f = __uint_as_float(samp[0]), top_p = __uint_as_float(samp[3]);
    const double inv_t = (double)inv_t_f;
    const u32* h = hist + (size_t)b * TOPP_KEYS;
    const u32 k0 = blockIdx.x * TOPP_SPAN + threadIdx.x * 4;
    {
        const uint4 c = *(const uint4*)(h + k0);
        const u64 s = topp_mass(k0, c.x, km, inv_t) + topp_mass(k0 + 1, c.y, km, inv_t) +
                      topp_mass(k0 + 2, c.z, km, inv_t) + topp_mass(k0 + 3, c.w, km, inv_t);
        const u64 tot = block_sum(s, sh);
        if (threadIdx.x == 0) part[(size_t)b * nb + blockIdx.x] = tot;
    }
    if (!last_block(counters + b, nb, &flag)) return;
    const bool active = top_p < 1.f && inv_t_f > 0.f && km != 0 && key_value(km) != NEG_INF;
    if (threadIdx.x == 0) {
        s_thr = 0;
        s_blk = -1;
        if (active) {
            u64 total = 0;
            for (int i = 0; i < nb; i++) total += __ldcg(part + (size_t)b * nb + i);
            const double target = __dmul_rn((double)total, (double)top_p);
            u64 above = 0;
            for (int i = nb - 1; i >= 0; i--) {
                const u64 p = __ldcg(part + (size_t)b * nb + i);
                if ((double)(above + p) >= target) {
                    s_blk = i;
                    break;
                }
                above += p;
            }
            s_above = above;
            s_target = target;
        }
    }
    __syncthreads();
    if (s_blk >= 0) {
        const u32 j0 = s_blk * TOPP_SPAN + threadIdx.x * 4;
        const uint4 c = *(const uint4*)(h + j0);
        u64 m[4] = {topp_mass(j0, c.x, km, inv_t), topp_mass(j0 + 1, c.y, km, inv_t),
                    topp_mass(j0 + 2, c.z, km, inv_t), topp_mass(j0 + 3, c.w, km, inv_t)};
        const u64 mine = m[0] + m[1] + m[2] + m[3];
        u64 run = s_above + block_sum_above(mine, sh);
        const double target = s_target;
        // Exactly one key has running (it included) >= target > running (it excluded).
#pragma unroll
        for (int q = 3; q >= 0; q--) {
            const u64 before = run;
            run += m[q];
            if ((double)run >= target) {
                if ((double)before < target) s_thr = j0 + q;
                break;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        thr[b] = s_thr;
        kmax[b] = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling on the GPU: argmax of logits row b (bf16 [B][V]; ties to the lower index; with a
// temperature in samp, of logits / T plus Gumbel noise; with topp_thr, over the tokens whose
// key reaches thr[b] only: Gumbel-max over the nucleus samples the renormalised nucleus),
// then, in the last block of the row: tok[b] = id, pos[b] += 1, hist[b][pos[b]] = id.
// grid (ceil(V / chunk), B), 256 threads; part_v/part_i hold gridDim.x entries per row.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
argmax_next(const u16* __restrict__ logits, int vocab, int chunk, float* __restrict__ part_v,
            int* __restrict__ part_i, int* __restrict__ counters, int* __restrict__ tok,
            int* __restrict__ pos, int* __restrict__ hist, int hist_cap,
            const u32* __restrict__ samp, const u32* __restrict__ topp_thr,
            u32* __restrict__ topp_hist) {
    pdl_enter();
    __shared__ float shv[32];
    __shared__ int shi[32];
    __shared__ int flag;
    const int b = blockIdx.y;
    const int c0 = blockIdx.x * chunk, c1 = min(vocab, c0 + chunk);
    // Nucleus sampling: only tokens whose key reaches the row's threshold take part (0: all).
    // The row's histogram (read by topp_threshold, which ran before) is zeroed here for the
    // next step, each block a slice.
    const u32 min_key = topp_thr ? topp_thr[b] : 0u;
    if (topp_hist) {
        const int span = ((TOPP_KEYS / 4 + gridDim.x - 1) / gridDim.x) * 4;
        uint4* hz = (uint4*)(topp_hist + (size_t)b * TOPP_KEYS);
        const int z0 = blockIdx.x * span, z1 = min(TOPP_KEYS, z0 + span);
        for (int i = z0 / 4 + threadIdx.x; i < z1 / 4; i += blockDim.x) hz[i] = make_uint4(0, 0, 0, 0);
    }
    // Temperature sampling by the Gumbel-max trick: argmax_i (l_i / T + g_i) with g_i standard
    // Gumbel noise is a sample of softmax(l / T). The noise is a hash of (seed, row, position,
    // token id), so a seed gives the same tokens on every launch shape. inv_t == 0: greedy.
    const float inv_t = __uint_as_float(samp[0]);
    const u64 key = (((u64)samp[2] << 32) | samp[1]) ^ ((u64)b << 40) ^ ((u64)pos[b] << 1);
    float v = NEG_INF;
    int bi = 0x7fffffff;
#pragma unroll 8
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        const u16 raw = logits[(size_t)b * vocab + i];
        if (min_key != 0u && logit_key(raw) < min_key) continue;
        float x = bf(raw);
        if (inv_t > 0.f) x = x * inv_t + gumbel_noise(key, i);
        argmax_merge(v, bi, x == x ? x : NEG_INF, i);
    }
    block_argmax(v, bi, shv, shi);
    if (threadIdx.x == 0) {
        part_v[(size_t)b * gridDim.x + blockIdx.x] = v;
        part_i[(size_t)b * gridDim.x + blockIdx.x] = bi;
    }
    if (!last_block(counters + b, gridDim.x, &flag)) return;
    float bv = NEG_INF;
    int best = 0x7fffffff;
    for (int c = threadIdx.x; c < (int)gridDim.x; c += blockDim.x)
        argmax_merge(bv, best, __ldcg(part_v + (size_t)b * gridDim.x + c),
                     __ldcg(part_i + (size_t)b * gridDim.x + c));
    block_argmax(bv, best, shv, shi);
    if (threadIdx.x == 0) {
        if (best == 0x7fffffff) best = 0;  // every logit NaN / -inf
        const int np = pos[b] + 1;
        tok[b] = best;
        pos[b] = np;
        if (np < hist_cap) hist[(size_t)b * hist_cap + np] = best;
    }
}

// ---------------------------------------------------------------------------------------------
// Random weights generated on the device (benchmarks): uniform in [-amp, amp) from a hash of
// (seed, index), so the values do not depend on the launch shape.
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void fill_bf16(u16* __restrict__ p, u64 n, u64 seed, float amp) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u32 h = hash32(seed * 0x9E3779B97F4A7C15ULL + i);
        const float u = (float)(h >> 8) * (1.0f / 16777216.0f);  // [0, 1)
        p[i] = to_bf((2.f * u - 1.f) * amp);
    }
}

extern "C" __global__ void fill_f32(float* __restrict__ p, u64 n, u64 seed, float center, float amp) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u32 h = hash32(seed * 0x9E3779B97F4A7C15ULL + i);
        const float u = (float)(h >> 8) * (1.0f / 16777216.0f);
        p[i] = center + (2.f * u - 1.f) * amp;
    }
}

// Every element of a small int buffer set to `v` (positions before a decode benchmark).
extern "C" __global__ void fill_i32(int* __restrict__ p, int n, int v, int step) {
    pdl_enter();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = v + step * i;
}
