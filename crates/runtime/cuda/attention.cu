// Attention kernels of the GPU decoder (mimo_runtime::cuda): decode (flash-decoding splits, the
// warp kernel, the grouped tensor-core kernel), prefill on the tensor cores, and their helpers
// (head preparation, the KV cache write, the split combine). Compiled by NVRTC as one program
// with ops.cu, after it (ops.rs `OPS_SRC`): it uses ops.cu's block reductions, `last_block`
// and short names, and common.cuh's helpers.

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
