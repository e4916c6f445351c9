// Persistent stage-chain probe (probe.rs `StageChain`; `mimo-bench-kernels --layer-probe`).
//
// Compiled in the same unit as fp4_gemm.cu and fp4_bulk.cu, after them: it uses their decode
// and mma (`compute_chunks` on a `WeightRegs` set, activations read from shared memory) and
// their mbarrier helpers.
//
// Why: docs/cuda-backend-notes.md ("What 1,000 tokens/s on Qwen3-30B-A3B would take") plans one
// persistent kernel per decoder layer, one block per SM, whose blocks stream the next stage's
// weights into shared memory while the current stage waits for its input and computes. Its
// open questions are measured here on the products alone: how long a stage's chain is once its
// weights sit in shared memory (grid barrier, input vector from L2, decode and mma from shared
// memory, store), and whether the streams keep DRAM busy across the barriers.
//
// The kernel runs S one-token NVFP4 products in a chain: stage s reads the first k_s elements
// of stage s-1's bf16 output (stage 0 reads x0), so every stage waits for the whole previous
// stage (a grid-wide barrier on a monotone arrival count). A gated stage stores silu(gate) * up
// (swiglu_bf16) of its tile pairs. Block b owns a contiguous run of 16-row tiles of every stage
// (pairs of tiles for a gated stage). The weights are in the probe's tile-major layout: for
// tile T and 128-element chunk c, 1024 bytes of packed words (row r of the tile at r * 64) then,
// in a separate array, 128 scale bytes (row r at r * 8), so a block's tiles are one contiguous
// range and lane (g, t)'s 16-byte pieces of rows g and g + 8 are conflict-free in shared memory.
// Thread 0 copies them with two bulk copies completing on the stage's mbarrier (stage parity),
// at the top of the stage before (prefetch), or, for a `late` stage (an MoE expert stage, whose
// rows are known only once its input is), right after that stage's own barrier.
//
// Stage table: 8 u64 per stage: packed, scales, out, n | k << 32, gated | late << 1,
// f32 bits of post (2^A / global scale), weight smem offset | scale smem offset << 32, 0.
// Shared memory: two mbarriers at 0, the cross-warp sums at SP_RED_OFF, the input row at
// SP_X_OFF (then 8 zero elements: the mma operand of the 7 empty token slots), then the stages'
// weights at the host's offsets (probe.rs: stage s and s + 1 never overlap).
// stamps[((s * G) + b) * 4 + i]: %globaltimer at the stage's top, input in shared memory,
// weights in shared memory, output stored (thread 0 of each block).

#define SP_WARPS 8
#define SP_MAX_TILES 8
#define SP_RED_OFF 128
#define SP_X_OFF (SP_RED_OFF + SP_WARPS * SP_MAX_TILES * 16 * 4)

#define SP_SKIP_COMPUTE 1  // no decode / mma / store (the streams and barriers alone)
#define SP_SKIP_COPY 2     // no weight copies (the chains alone; results are garbage)
#define SP_ALL_LATE 4      // every stage after the first copied only after its own barrier
#define SP_NO_LATE 8       // the late flags ignored: every stage copied during the previous one

struct SpStage {
    const u8* w;
    const u8* s;
    u16* out;
    int n, k, gated, late;
    float post;
    u32 woff, soff;
};

__device__ __forceinline__ SpStage sp_stage(const u64* __restrict__ tab, int s) {
    const u64* d = tab + 8 * s;
    SpStage st;
    st.w = (const u8*)d[0];
    st.s = (const u8*)d[1];
    st.out = (u16*)d[2];
    st.n = (int)(d[3] & 0xffffffffu);
    st.k = (int)(d[3] >> 32);
    st.gated = (int)(d[4] & 1);
    st.late = (int)((d[4] >> 1) & 1);
    st.post = __uint_as_float((u32)d[5]);
    st.woff = (u32)(d[6] & 0xffffffffu);
    st.soff = (u32)(d[6] >> 32);
    return st;
}

// Tiles [t0, t1) of block b of G (whole tile pairs for a gated stage).
__device__ __forceinline__ void sp_tiles(const SpStage& st, int b, int G, int& t0, int& t1) {
    const int tpu = st.gated ? 2 : 1;
    const int units = st.n / 16 / tpu;
    t0 = (int)((long long)b * units / G) * tpu;
    t1 = (int)((long long)(b + 1) * units / G) * tpu;
}

__device__ __forceinline__ void sp_bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
        : "memory");
}

// Thread 0: block b's tiles of stage st into shared memory, completing on `bar`.
__device__ __forceinline__ void sp_issue(const SpStage& st, u32 sbase, u32 bar, int b, int G) {
    int t0, t1;
    sp_tiles(st, b, G, t0, t1);
    const u32 C = (u32)st.k >> 7;
    const u32 wb = (u32)(t1 - t0) * C * 1024u, sb = (u32)(t1 - t0) * C * 128u;
    mbar_expect_tx(bar, wb + sb);
    if (wb) {
        sp_bulk(sbase + st.woff, st.w + (size_t)t0 * C * 1024u, wb, bar);
        sp_bulk(sbase + st.soff, st.s + (size_t)t0 * C * 128u, sb, bar);
    }
}

__device__ __forceinline__ u64 sp_now() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// One chunk of MT tiles for this lane: weights and scale bytes from shared memory, then the
// decode kernels' arithmetic (compute_chunks, activations read from shared memory at xo).
template <int MT>
__device__ __forceinline__ void sp_chunk(const u8* W, const u8* Sc, int C, int c, const u16* xs,
                                         const u16* lut, float (&acc)[MT][1][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    WeightRegs<MT, 1> r;
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const size_t tc = (size_t)i * C + c;
            r.w[0][i][h] = *(const uint4*)(W + tc * 1024 + (g + 8 * h) * 64 + 16 * t);
            r.sc[0][i][h] = *(const u16*)(Sc + tc * 128 + (g + 8 * h) * 8 + 2 * t);
        }
    // Token slot g's fragment at step q: elements c * 128 + 32 t + 8 q of the input for slot 0;
    // the zeros after the input row for the empty slots.
    int xo[4];
#pragma unroll
    for (int q = 0; q < 4; q++) xo[q] = g == 0 ? c * 128 + 32 * t + 8 * q : C * 128;
    const u16* const xptr[1] = {xs};
    compute_chunks<FMT_NVFP4, MT, 1, 1, true, 1>(r, xptr, 0, C * 128, lut, acc, xs, xo);
}

// The warp's chunks (warp, warp + SP_WARPS, ...) of MT tiles, two accumulator sets so that
// consecutive chunks' mma chains are independent; the token-0 sums go to red[warp][row].
template <int MT>
__device__ __forceinline__ void sp_compute(const u8* W, const u8* Sc, int C, const u16* xs,
                                           const u16* lut, float* red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float a0[MT][1][4], a1[MT][1][4];
    zero_acc<MT, 1>(a0);
    zero_acc<MT, 1>(a1);
    for (int c = warp; c < C; c += 2 * SP_WARPS) {
        sp_chunk<MT>(W, Sc, C, c, xs, lut, a0);
        if (c + SP_WARPS < C) sp_chunk<MT>(W, Sc, C, c + SP_WARPS, xs, lut, a1);
    }
    if (t == 0) {
#pragma unroll
        for (int i = 0; i < MT; i++) {
            red[(warp * SP_MAX_TILES + i) * 16 + g] = a0[i][0][0] + a1[i][0][0];
            red[(warp * SP_MAX_TILES + i) * 16 + g + 8] = a0[i][0][2] + a1[i][0][2];
        }
    }
}

// Sum of row r (local, tile r / 16) over the warps, in warp order, times post.
__device__ __forceinline__ float sp_row(const float* red, int r, float post) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < SP_WARPS; w++) v += red[w * SP_MAX_TILES * 16 + r];
    return v * post;
}

extern "C" __global__ void __launch_bounds__(SP_WARPS * 32, 1)
    stage_probe(const u64* __restrict__ tab, int S, const u16* __restrict__ x0,
                const u16* __restrict__ lut, unsigned long long* bar_count,
                unsigned long long base, int flags, u64* __restrict__ stamps) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(1024) u8 sp_smem[];
    __shared__ u16 slut[256];
    const u32 sbase = smem_addr(sp_smem);
    float* red = (float*)(sp_smem + SP_RED_OFF);
    u16* xs = (u16*)(sp_smem + SP_X_OFF);
    const int tid = threadIdx.x, b = blockIdx.x, G = gridDim.x;
    const bool copy = !(flags & SP_SKIP_COPY), compute = !(flags & SP_SKIP_COMPUTE);
    for (int i = tid; i < 256; i += blockDim.x) slut[i] = lut[i];
    if (tid == 0) {
        mbar_init(sbase, 1);
        mbar_init(sbase + 8, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (tid == 0 && copy) sp_issue(sp_stage(tab, 0), sbase, sbase, b, G);
    for (int s = 0; s < S; s++) {
        const SpStage st = sp_stage(tab, s);
        const u64 t_top = sp_now();
        // Stage 0 is never late (nothing precedes it); a late stage's successor is issued
        // after it, so that the late stage's own bytes are asked for first.
        const bool late = s > 0 && ((flags & SP_ALL_LATE) || (st.late && !(flags & SP_NO_LATE)));
        bool next = s + 1 < S, next_late = false;
        SpStage nx = st;
        if (next) {
            nx = sp_stage(tab, s + 1);
            next_late = (flags & SP_ALL_LATE) || (nx.late && !(flags & SP_NO_LATE));
        }
        const u32 bar = sbase + 8 * (s & 1), nbar = sbase + 8 * ((s + 1) & 1);
        if (tid == 0 && copy && next && !late && !next_late) sp_issue(nx, sbase, nbar, b, G);
        if (s > 0) {
            if (tid == 0) {
                const unsigned long long want = base + (unsigned long long)s * G;
                unsigned long long seen;
                do {
                    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];"
                                 : "=l"(seen)
                                 : "l"(bar_count)
                                 : "memory");
                } while (seen < want);
            }
            __syncthreads();
            if (tid == 0 && copy && late) {
                sp_issue(st, sbase, bar, b, G);
                if (next && !next_late) sp_issue(nx, sbase, nbar, b, G);
            }
        }
        // The input row (another block's stores: read through L2), then 8 zeros.
        const u16* src = s == 0 ? x0 : sp_stage(tab, s - 1).out;
        for (int i = tid; i < st.k / 8; i += blockDim.x)
            *(uint4*)(xs + 8 * i) = __ldcg((const uint4*)(src + 8 * i));
        if (tid == 0) *(uint4*)(xs + st.k) = make_uint4(0, 0, 0, 0);
        __syncthreads();
        const u64 t_in = sp_now();
        if (copy) mbar_wait(bar, (u32)(s >> 1) & 1);
        const u64 t_w = sp_now();
        int t0, t1;
        sp_tiles(st, b, G, t0, t1);
        const int nt = t1 - t0, C = st.k >> 7;
        if (compute && nt > 0) {
            const u8* W = sp_smem + st.woff;
            const u8* Sc = sp_smem + st.soff;
            switch (nt) {
                case 1: sp_compute<1>(W, Sc, C, xs, slut, red); break;
                case 2: sp_compute<2>(W, Sc, C, xs, slut, red); break;
                case 3: sp_compute<3>(W, Sc, C, xs, slut, red); break;
                case 4: sp_compute<4>(W, Sc, C, xs, slut, red); break;
                case 5: sp_compute<5>(W, Sc, C, xs, slut, red); break;
                case 6: sp_compute<6>(W, Sc, C, xs, slut, red); break;
                case 7: sp_compute<7>(W, Sc, C, xs, slut, red); break;
                default: sp_compute<8>(W, Sc, C, xs, slut, red); break;
            }
            __syncthreads();
            if (st.gated) {
                if (tid < nt * 8) {
                    const int j = tid >> 4, rr = tid & 15;
                    const float gate = sp_row(red, 32 * j + rr, st.post);
                    const float up = sp_row(red, 32 * j + 16 + rr, st.post);
                    st.out[(t0 / 2 + j) * 16 + rr] = swiglu_bf16(gate, up);
                }
            } else if (tid < nt * 16) {
                st.out[t0 * 16 + tid] = f32_to_bf16(sp_row(red, tid, st.post));
            }
        }
        // Every thread is done with this stage's shared memory and has stored its outputs.
        __syncthreads();
        if (tid == 0) {
            stamps[((size_t)s * G + b) * 4 + 0] = t_top;
            stamps[((size_t)s * G + b) * 4 + 1] = t_in;
            stamps[((size_t)s * G + b) * 4 + 2] = t_w;
            stamps[((size_t)s * G + b) * 4 + 3] = sp_now();
            if (s + 1 < S) {
                __threadfence();
                asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(bar_count) : "memory");
            }
        }
    }
#endif
}
