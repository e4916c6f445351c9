// One-token BF16 product whose input is the output side of a folded norm (fold.rs NormIn):
// y[r] = bf16((W[r] . x) / rms), x = bf16(w * v) of a residual row v not normalised yet, and
// 1 / rms = 1 / sqrt(sum(v^2) / len + eps) from the producer's partial sums, added by warp 0 in
// index order (the FP4 consumers' formula, fp4_gemm.cu). For the BF16 Linear layers of a mixed
// checkpoint (k_proj / v_proj or the whole attention kept dense by the converter) inside a batch-1
// decode whose norms are folded: the separate add_rmsnorm launch and cuBLAS's non-programmatic
// launches would otherwise break the chain.
//
// Compiled after fp4_gemm.cu (common.cuh: pdl_enter, ldg_stream, dot8, f32_to_bf16; fp4_gemm.cu:
// fp4_dense_body and Fold for the combined kernels at the end).
//
// grid ceil(n / (8 RW)), 8 warps; warp w of block b takes rows (8b + w) RW .. + RW whole: lane l
// holds each row's 16-byte pieces l, l + 32, ... (k <= 32 * 8 * BGN_PIECES / RW), all requested
// before the PDL wait (weights are never written by another kernel); the input pieces and the
// partial sums after it. RW = 2 halves the blocks, so that a larger product still runs as one
// wave with every load in flight at once. The sum over a row is each lane's pieces in order,
// then the warp's butterfly: the same order for every row, RW and launch (deterministic).
#define BGN_WARPS 8
#define BGN_PIECES 16

// `block`: the block's index among those of this product (blockDim.x / 32 warps each).
template <int RW>
__device__ __forceinline__ void bf16_gemv_norm_in_body(const u16* __restrict__ w,
                                                       const u16* __restrict__ x,
                                                       u16* __restrict__ y, int n, int k,
                                                       const float* __restrict__ parts,
                                                       int nparts, int len, float eps,
                                                       int block) {
    constexpr int P = BGN_PIECES / RW;
    __shared__ float inv_rms;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (block * (int)(blockDim.x >> 5) + warp) * RW;
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
        bf16_gemv_norm_in_body<RW>(w, x, y, n, k, parts, nparts, len, eps, blockIdx.x);         \
    }
BF16_GEMV_NORM_IN(bf16_gemv_norm_in, 1)
BF16_GEMV_NORM_IN(bf16_gemv_norm_in_r2, 2)

// An FP4 folded-norm consumer and a BF16 one of the same input in one launch (fold.rs
// fp4_bf16_gemv_norm_in): blocks [0, fp4_blocks) are fp4_gemm.cu's DENSE_FOLD_KERNEL over the
// FP4 weight, the rest bf16_gemv_norm_in_body (one row per warp, the FP4 launch's warps per
// block) over bw [bn, k] into by. For a mixed checkpoint whose q_proj is FP4 and k|v one BF16
// matrix (Qkv::QKv): one launch per layer where there were two.
#define FP4_BF16_NORM_IN(NAME, FMT, MT, G)                                                      \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                    \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int m, \
        int n, int k, float post, int flags, const float* in_parts, int in_n, int in_len,        \
        float in_eps, const u16* bw, u16* by, int bn, int fp4_blocks) {                          \
        if ((int)blockIdx.x >= fp4_blocks) {                                                     \
            bf16_gemv_norm_in_body<1>(bw, x, by, bn, k, in_parts, in_n, in_len, in_eps,          \
                                      (int)blockIdx.x - fp4_blocks);                             \
            return;                                                                              \
        }                                                                                        \
        const Fold fo{in_parts, in_n, in_len, in_eps, 0, 0, 0, 0};                               \
        fp4_dense_body<FMT, MT, 1, G, EPI_STORE, false, true>(wp, ws, gs, lut, x, y, m, n, k,    \
                                                              post, flags, fo);                  \
    }
FP4_BF16_NORM_IN(fp4_gemm_nv_m1_t1_g1_fold_bf16, FMT_NVFP4, 1, 1)
FP4_BF16_NORM_IN(fp4_gemm_nv_m1_t1_g2_fold_bf16, FMT_NVFP4, 1, 2)
FP4_BF16_NORM_IN(fp4_gemm_nv_m2_t1_g1_fold_bf16, FMT_NVFP4, 2, 1)
FP4_BF16_NORM_IN(fp4_gemm_nv_m2_t1_g2_fold_bf16, FMT_NVFP4, 2, 2)
FP4_BF16_NORM_IN(fp4_gemm_mx_m1_t1_g1_fold_bf16, FMT_MXFP4, 1, 1)
FP4_BF16_NORM_IN(fp4_gemm_mx_m1_t1_g2_fold_bf16, FMT_MXFP4, 1, 2)
FP4_BF16_NORM_IN(fp4_gemm_mx_m2_t1_g1_fold_bf16, FMT_MXFP4, 2, 1)
FP4_BF16_NORM_IN(fp4_gemm_mx_m2_t1_g2_fold_bf16, FMT_MXFP4, 2, 2)
