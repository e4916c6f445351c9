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
// grid ceil(n / 8), 8 warps; warp w of block b takes row 8b + w whole: lane l holds the row's
// 16-byte pieces l, l + 32, ... (k <= 32 * 8 * BGN_PIECES), all requested before the PDL wait
// (weights are never written by another kernel); the input pieces and the partial sums after
// it. The sum over the row is each lane's pieces in order, then the warp's butterfly: the same
// order for every row and launch (deterministic).
#define BGN_WARPS 8
#define BGN_PIECES 16

extern "C" __global__ void __launch_bounds__(BGN_WARPS * 32)
bf16_gemv_norm_in(const u16* __restrict__ w, const u16* __restrict__ x, u16* __restrict__ y,
                  int n, int k, const float* __restrict__ parts, int nparts, int len,
                  float eps) {
    __shared__ float inv_rms;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * BGN_WARPS + warp;
    const int pieces = k >> 3;
    // Rows past n load row n - 1 (in bounds) and store nothing.
    const u16* wr = w + (size_t)min(row, n - 1) * k;
    uint4 wv[BGN_PIECES];
#pragma unroll
    for (int i = 0; i < BGN_PIECES; i++) {
        const int p = lane + 32 * i;
        wv[i] = p < pieces ? ldg_stream(wr + 8 * p) : make_uint4(0, 0, 0, 0);
    }
    pdl_enter();
    if (warp == 0) {
        float s = 0.f;
        for (int i = lane; i < nparts; i += 32) s += __ldcg(parts + i);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) inv_rms = 1.0f / sqrtf(s / (float)len + eps);
    }
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < BGN_PIECES; i++) {
        const int p = lane + 32 * i;
        if (p < pieces) acc += dot8(wv[i], __ldcg((const uint4*)(x + 8 * p)));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    __syncthreads();
    if (lane == 0 && row < n) y[row] = f32_to_bf16(acc * inv_rms);
}
