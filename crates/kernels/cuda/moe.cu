// Mixture-of-experts combine. With the grouped FP4 kernels of fp4_gemm.cu (which route
// themselves from the top-k ids and apply SwiGLU while loading) it computes one MoE layer from
// the router's top-k output on the device, without a host round trip.

// Compiled after common.cuh (typedefs, bf16 conversions, pdl_enter).

// out[t][h] = sum_{j < top_k} w[t][j] * yd[t*top_k + j][h], summed in j order in f32.
// Pairs whose expert id was invalid contribute nothing.
extern "C" __global__ void moe_combine(const u16* __restrict__ yd, const float* __restrict__ w,
                                       const int* __restrict__ topk_ids, u16* __restrict__ out,
                                       int T, int top_k, int hidden, int E) {
    pdl_enter();
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * hidden) return;
    const size_t t = idx / hidden;
    const size_t h = idx - t * hidden;
    float s = 0.f;
    for (int j = 0; j < top_k; j++) {
        const size_t p = t * top_k + j;
        const int e = topk_ids[p];
        if (e < 0 || e >= E) continue;
        s += w[p] * bf16_to_f32(yd[p * hidden + h]);
    }
    out[idx] = f32_to_bf16(s);
}
