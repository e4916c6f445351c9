// Mixture-of-experts glue kernels: routing table, SwiGLU and the weighted combine.
// Together with the grouped FP4 kernels (fp4_gemm.cu) they compute one MoE layer from the
// router's top-k output on the device, without a host round trip.

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Builds, from topk_ids [P] (P = tokens * top_k, pair p = token * top_k + slot):
//   active_count[0]         number of experts with at least one pair
//   active_expert[i]        the i-th such expert, in increasing expert order
//   offsets[i..=count]      start of expert i's pairs in pair_list
//   pair_list[P]            pairs grouped by expert, each group in increasing p
//   bad[0]                  number of ids outside [0, E) (those pairs are left out)
// One block; E <= blockDim.x * 64. Counting uses integer atomics (order-free); the lists are
// filled by one thread per expert scanning in p order, so the output is deterministic.
extern "C" __global__ void moe_route(const int* __restrict__ topk_ids, int P, int E,
                                     int* __restrict__ active_count, int* __restrict__ active_expert,
                                     int* __restrict__ offsets, int* __restrict__ pair_list,
                                     int* __restrict__ bad) {
    extern __shared__ int sh[];
    int* cnt = sh;        // [E]
    int* start = sh + E;  // [E]
    __shared__ int nbad;
    if (threadIdx.x == 0) nbad = 0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        const int e = topk_ids[p];
        if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
        else atomicAdd(&nbad, 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0, na = 0;
        for (int e = 0; e < E; e++) {
            start[e] = run;
            if (cnt[e] > 0) {
                active_expert[na] = e;
                offsets[na] = run;
                na++;
                run += cnt[e];
            }
        }
        offsets[na] = run;
        active_count[0] = na;
        bad[0] = nbad;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        if (cnt[e] == 0) continue;
        int pos = start[e];
        for (int p = 0; p < P; p++)
            if (topk_ids[p] == e) pair_list[pos++] = p;
    }
}

// act[p][i] = silu(gu[p][i]) * gu[p][inter + i], gu = [P][2*inter] (gate rows first, then up).
extern "C" __global__ void moe_silu_mul(const u16* __restrict__ gu, u16* __restrict__ act, int P,
                                        int inter) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)P * inter) return;
    const size_t p = idx / inter;
    const size_t i = idx - p * inter;
    const float g = bf16_to_f32(gu[p * 2 * inter + i]);
    const float u = bf16_to_f32(gu[p * 2 * inter + inter + i]);
    const float s = g / (1.0f + __expf(-g));
    act[idx] = f32_to_bf16(s * u);
}

// out[t][h] = sum_{j < top_k} w[t][j] * yd[t*top_k + j][h], summed in j order in f32.
// Pairs whose expert id was invalid contribute nothing.
extern "C" __global__ void moe_combine(const u16* __restrict__ yd, const float* __restrict__ w,
                                       const int* __restrict__ topk_ids, u16* __restrict__ out,
                                       int T, int top_k, int hidden, int E) {
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
