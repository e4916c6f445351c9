// One-token BF16 product whose input is the output side of a folded norm (fold.rs NormIn):
// y[r] = bf16((W[r] . x) / rms), x = bf16(w * v) of a residual row v not normalised yet, and
// 1 / rms = 1 / sqrt(sum(v^2) / len + eps) from the producer's partial sums, added by warp 0 in
// index order (the FP4 consumers' formula, fp4_gemm.cu). For the BF16 Linear layers of a mixed
// checkpoint (k_proj / v_proj or the whole attention kept dense by the converter) inside a batch-1
// decode whose norms are folded: the separate add_rmsnorm launch and cuBLAS's non-programmatic
// launches would otherwise break the chain.
//
// Compiled after fp4_gemm.cu (common.cuh: pdl_enter, ldg_stream, dot8, f32_to_bf16).
//
// grid ceil(n / (8 RW)), 8 warps; warp w of block b takes rows (8b + w) RW .. + RW whole: lane l
// holds each row's 16-byte pieces l, l + 32, ... (k <= 32 * 8 * BGN_PIECES / RW), all requested
// before the PDL wait (weights are never written by another kernel); the input pieces and the
// partial sums after it. RW = 2 halves the blocks, so that a larger product still runs as one
// wave with every load in flight at once. The sum over a row is each lane's pieces in order,
// then the warp's butterfly: the same order for every row, RW and launch (deterministic).
#define BGN_WARPS 8
#define BGN_PIECES 16

template <int RW>
__device__ __forceinline__ void bf16_gemv_norm_in_body(const u16* __restrict__ w,
                                                       const u16* __restrict__ x,
                                                       u16* __restrict__ y, int n, int k,
                                                       const float* __restrict__ parts,
                                                       int nparts, int len, float eps) {
    constexpr int P = BGN_PIECES / RW;
    __shared__ float inv_rms;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * BGN_WARPS + warp) * RW;
    const int pieces = k >> 3;
    uint4 wv[RW][P];
#pragma unroll
    for (int r = 0; r < RW; r++) {
        // Rows past n load row n - 1 (in bounds) and store nothing.
        const u16* wr = w + (size_t)min(row0 + r, n - 1) * k;
#pragma unroll
        for (int i = 0; i < P; i++) {
            const int p = lane + 32 * i;
            wv[r][i] = p < pieces ? ldg_stream(wr + 8 * p) : make_uint4(0, 0, 0, 0);
        }
    }
    pdl_enter();
    if (warp == 0) {
        float s = 0.f;
        for (int i = lane; i < nparts; i += 32) s += __ldcg(parts + i);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) inv_rms = 1.0f / sqrtf(s / (float)len + eps);
    }
    float acc[RW];
#pragma unroll
    for (int r = 0; r < RW; r++) acc[r] = 0.f;
#pragma unroll
    for (int i = 0; i < P; i++) {
        const int p = lane + 32 * i;
        if (p < pieces) {
            const uint4 xv = __ldcg((const uint4*)(x + 8 * p));
#pragma unroll
            for (int r = 0; r < RW; r++) acc[r] += dot8(wv[r][i], xv);
        }
    }
#pragma unroll
    for (int r = 0; r < RW; r++)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < RW; r++)
        if (lane == 0 && row0 + r < n) y[row0 + r] = f32_to_bf16(acc[r] * inv_rms);
}

#define BF16_GEMV_NORM_IN(NAME, RW)                                                             \
    extern "C" __global__ void __launch_bounds__(BGN_WARPS * 32)                                \
        NAME(const u16* w, const u16* x, u16* y, int n, int k, const float* parts, int nparts, \
             int len, float eps) {                                                              \
        bf16_gemv_norm_in_body<RW>(w, x, y, n, k, parts, nparts, len, eps);                     \
    }
BF16_GEMV_NORM_IN(bf16_gemv_norm_in, 1)
BF16_GEMV_NORM_IN(bf16_gemv_norm_in_r2, 2)
