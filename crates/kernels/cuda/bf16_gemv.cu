// BF16 weight x BF16 activation GEMV for decode (1 to 8 tokens), f32 accumulation: the BF16
// baseline's small-M products, which cuBLAS runs at ~1.2 TB/s on the attention projections of
// a MoE model (2048 x 5120, 4096 x 2048: a few microseconds of fixed cost per call, and no
// programmatic launch), and the one-token expert products of a BF16 MoE layer.
//
// Compiled after common.cuh (typedefs, bf16 conversions, pdl_enter, ldg_stream, dot8, swiglu2).
//
// Layout: W row-major [n][k] with k a multiple of 8. A block owns `rb` consecutive rows, each cut
// into 256-element chunks (512 bytes: one 16-byte piece per lane; the last chunk of a row is
// partial where k is not a multiple of 256). Warp w takes the slab's chunks w, w + 8, w + 16, ... in groups of GV_PPT,
// the next group's loads issued before the current group is used (two groups in flight). A
// chunk lies in one row, and a warp's chunks only move forward through the rows, so each warp
// keeps per-token sums for its current row and, when the row changes, reduces them over the
// warp and stores one partial per (row, warp) in shared memory; the block then adds the 8
// partials of each row in warp order. Every token's sum is formed in the same order whatever
// the number of tokens, so a token's output does not depend on the batch (deterministic, no
// atomics).
//
// Dense mode: the first group of weights is requested before pdl_enter (weights are never
// written by another kernel). Pair mode (one-token MoE experts): block row blockIdx.y = pair p,
// expert ids[p] (an id outside [0, E) leaves the pair's output unwritten; the combine skips
// it), input row p / in_div, output row p; the expert is known only after the wait.

#define GV_WARPS 8
#define GV_PPT 4
#define GV_MAX_RB 32

template <int MT, bool SW>
__device__ __forceinline__ void gv_chunk(float (&acc)[MT], uint4 wv, const u16* __restrict__ x,
                                         int m, int k, int c) {
#pragma unroll
    for (int t = 0; t < MT; t++) {
        if (t < m) {
            uint4 xv;
            if (SW) {
                const uint4 g = *(const uint4*)(x + c), u = *(const uint4*)(x + k + c);
                xv = make_uint4(swiglu2(g.x, u.x), swiglu2(g.y, u.y), swiglu2(g.z, u.z),
                                swiglu2(g.w, u.w));
            } else {
                xv = *(const uint4*)(x + (size_t)t * k + c);
            }
            acc[t] += dot8(wv, xv);
        }
    }
}

// This lane's 16-byte piece of chunk ch of the slab wb (rows of k, cpr chunks each; the last
// chunk of a row is partial where k is not a multiple of 256), zeros past the slab or the row.
__device__ __forceinline__ uint4 gv_load(const u16* __restrict__ wb, int k, int cpr, int total,
                                         int ch) {
    const int row = ch / cpr, c = (ch - row * cpr) * 256 + (threadIdx.x & 31) * 8;
    return ch < total && c < k ? ldg_stream(wb + (size_t)row * k + c) : make_uint4(0, 0, 0, 0);
}

// Warp-reduces acc and stores the row's partial (lane 0), then clears acc.
template <int MT>
__device__ __forceinline__ void gv_flush(float (&acc)[MT], float* red, int row, int warp,
                                         int lane) {
#pragma unroll
    for (int t = 0; t < MT; t++) {
        float v = acc[t];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[(row * GV_WARPS + warp) * MT + t] = v;
        acc[t] = 0.f;
    }
}

// y[t][row0 + r] for r < rows, t < m: the block's slab wb (rows x k) times the input rows
// x[t] (x: row 0 of the block's input; SW: one [gate | up] row of 2k, SwiGLU applied while
// loading). `loaded`: the first group, already requested by the caller.
template <int MT, bool SW>
__device__ __forceinline__ void gv_block(const u16* __restrict__ wb, const u16* __restrict__ x,
                                         u16* __restrict__ y, int m, int ystride, int k,
                                         int rows, const uint4 (&first)[GV_PPT], float* red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int cpr = (k + 255) >> 8, total = rows * cpr;
    for (int i = threadIdx.x; i < rows * GV_WARPS * MT; i += blockDim.x) red[i] = 0.f;
    __syncthreads();
    float acc[MT];
#pragma unroll
    for (int t = 0; t < MT; t++) acc[t] = 0.f;
    int cur = -1;
    uint4 wv[GV_PPT];
#pragma unroll
    for (int i = 0; i < GV_PPT; i++) wv[i] = first[i];
    for (int j0 = warp; j0 < total; j0 += GV_WARPS * GV_PPT) {
        // The next group's loads go out before this group is used.
        uint4 nx[GV_PPT];
        const int j1 = j0 + GV_WARPS * GV_PPT;
#pragma unroll
        for (int i = 0; i < GV_PPT; i++) nx[i] = gv_load(wb, k, cpr, total, j1 + i * GV_WARPS);
#pragma unroll
        for (int i = 0; i < GV_PPT; i++) {
            const int ch = j0 + i * GV_WARPS;
            if (ch < total) {
                const int row = ch / cpr;  // warp-uniform
                if (row != cur) {
                    if (cur >= 0) gv_flush<MT>(acc, red, cur, warp, lane);
                    cur = row;
                }
                const int c = (ch - row * cpr) * 256 + lane * 8;
                if (c < k) gv_chunk<MT, SW>(acc, wv[i], x, m, k, c);
            }
        }
#pragma unroll
        for (int i = 0; i < GV_PPT; i++) wv[i] = nx[i];
    }
    if (cur >= 0) gv_flush<MT>(acc, red, cur, warp, lane);
    __syncthreads();
    for (int i = threadIdx.x; i < rows * MT; i += blockDim.x) {
        const int r = i / MT, t = i - r * MT;
        if (t < m) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < GV_WARPS; w++) s += red[(r * GV_WARPS + w) * MT + t];
            y[(size_t)t * ystride + r] = f32_to_bf16(s);
        }
    }
}

// The warp's first group of the slab wb (rows x k).
__device__ __forceinline__ void gv_first(const u16* __restrict__ wb, int k, int rows,
                                         uint4 (&first)[GV_PPT]) {
    const int warp = threadIdx.x >> 5;
    const int cpr = (k + 255) >> 8;
#pragma unroll
    for (int i = 0; i < GV_PPT; i++) first[i] = gv_load(wb, k, cpr, rows * cpr, warp + i * GV_WARPS);
}

// Dense: y[m][n] = x[m][k] . W[n][k]^T, m <= MT. grid (ceil(n / rb)), 256 threads.
#define BF16_GEMV_DENSE(MT)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        bf16_gemv_t##MT(const u16* __restrict__ w, const u16* __restrict__ x,                   \
                        u16* __restrict__ y, int m, int n, int k, int rb) {                     \
        __shared__ float red[GV_MAX_RB * GV_WARPS * MT];                                        \
        const int row0 = blockIdx.x * rb, rows = min(rb, n - row0);                             \
        const u16* wb = w + (size_t)row0 * k;                                                   \
        uint4 first[GV_PPT];                                                                    \
        gv_first(wb, k, rows, first);                                                           \
        pdl_enter();                                                                            \
        gv_block<MT, false>(wb, x, y + row0, m, n, k, rows, first, red);                        \
    }

BF16_GEMV_DENSE(1)
BF16_GEMV_DENSE(2)
BF16_GEMV_DENSE(4)
BF16_GEMV_DENSE(8)

// Pairs: y[p][n] = W[ids[p]] . x[p / in_div] (SW: the input row is [gate | up] of 2k and
// SwiGLU is applied while loading). grid (ceil(n / rb), P), 256 threads.
#define BF16_GEMV_PAIRS(NAME, SW)                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        NAME(const u16* __restrict__ w, const u16* __restrict__ x, u16* __restrict__ y, int n,  \
             int k, int rb, const int* __restrict__ ids, int E, int in_div) {                   \
        __shared__ float red[GV_MAX_RB * GV_WARPS];                                             \
        pdl_enter();                                                                            \
        const int p = blockIdx.y, e = ids[p];                                                   \
        if (e < 0 || e >= E) return;                                                            \
        const int row0 = blockIdx.x * rb, rows = min(rb, n - row0);                             \
        const u16* wb = w + ((size_t)e * n + row0) * k;                                         \
        uint4 first[GV_PPT];                                                                    \
        gv_first(wb, k, rows, first);                                                           \
        const u16* xr = x + (size_t)(p / in_div) * (SW ? 2 : 1) * k;                            \
        gv_block<1, SW>(wb, xr, y + (size_t)p * n + row0, 1, n, k, rows, first, red);          \
    }

BF16_GEMV_PAIRS(bf16_gemv_pairs, false)
BF16_GEMV_PAIRS(bf16_gemv_pairs_sw, true)
