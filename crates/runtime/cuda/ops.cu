// Non-GEMM operations of the GPU decoder (mimo_runtime::cuda), compiled at run time by NVRTC;
// attention.cu (the attention kernels) follows this file in the same program.
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
