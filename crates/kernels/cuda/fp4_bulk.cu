// Bulk-copy FP4 GEMV/GEMM for 1 to 32 tokens on Hopper (bulk.rs `fp4_gemm_bulk`).
//
// Compiled in the same unit as fp4_gemm.cu, after it (context.rs), so it uses that file's
// weight decode and mma (`compute_chunks` on a `WeightRegs` set; activations in the bulk
// layout, XL = 1) and epilogue conventions; what differs is how the bytes arrive.
//
// Why: the decode kernels keep their loads in flight in registers (two groups of 16-byte loads
// per warp, 128 registers), which caps the bytes in flight per SM (docs/kernels-notes.md rounds
// 10 and 13: 79-86 % of copy bandwidth at one token); at 16 tokens each warp also reads its own
// copy of the activations, ~2 bytes through L1 per weight byte. Here one producer thread per
// block streams K chunks of 512 elements (the block's weight rows, their scale bytes and the
// tokens' activations) into a ring of shared-memory stages with the bulk tensor copy engine
// (`cp.async.bulk.tensor`, tensor maps made by bulk.rs), each stage completing on an mbarrier;
// the consumer warps only decode and multiply, and release a stage through a second mbarrier.
// Bytes in flight are the ring's size (up to 216 KiB per SM; the automatic shape fills 128 KiB,
// two or three stages, which round 24 measured faster than more), not registers, and all the
// block's warps share one copy of the activations.
//
// What it reaches (H100, docs/kernels-notes.md round 18): the stream alone (consumers that
// skip the arithmetic, -DMIMO_BK_NO_COMPUTE, wrong results) moves 4096 x 14336 at one token in
// 12.2 us, at copy bandwidth; with the decode and mma it takes 18 us, against 14 us for the
// decode kernels, whose loop issues ~25 % fewer instructions per weight byte. At 16 tokens,
// where the decode kernels re-read the activations, it is 16-20 % faster on the large products,
// and at 32 tokens 20-37 % faster than the tiled kernel (bulk.rs BULK_MIN_MI, BULK_MIN_ROWS;
// the runtime takes it there, Tuning::bulk_gemm).
//
// Block: RB row tiles of 16 rows (R = 16 RB weight rows) in groups of MT (one warp's tiles;
// the kernels below take MT = 1: two tiles per warp measured slower everywhere and were
// removed, docs/kernels-notes.md round 18) and KW consumer warps per group (warp w: group
// w % (RB / MT), K share w / (RB / MT): the
// stage's four 128-element chunks dealt round-robin over the KW warps, continuing across
// stages), then the producer warp. Grid: x = row blocks, y = K splits (the tiled kernel's
// deterministic last-block reduction, in split order). The gated form (EPI_SWIGLU_BF16) loads
// R / 2 gate rows and the matching R / 2 up rows (two boxes each) and writes silu(gate) * up.
// Stage layout (1024-byte aligned): activations, four boxes of 8*TN tokens x 128 elements
// (128-byte swizzle, see compute_chunks XL = 1) of which the copies fill the first M tokens;
// weights, R rows x 256 bytes; scale bytes, R rows x 32 (NVFP4) or 16 (MXFP4). Rows past N
// and elements past K are filled with zeros by the copy engine. Requires sm_90.

#define BK_CHUNK 512       // K elements per stage (bulk.rs CHUNK)
#define BK_SUBS 4          // compute_chunks chunks (128 elements) per stage
#define BK_MAX_SPLITS 8    // bulk.rs MAX_SPLITS

// cuda.h's CUtensorMap (NVRTC has no cuda.h): 128 opaque bytes, 64-byte aligned, passed by
// value as a __grid_constant__ parameter so that the copy engine reads it from parameter space.
struct __align__(64) TensorMap {
    unsigned long long v[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// The producer's arrival, announcing `bytes` of copies that complete this phase.
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            " selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}
__device__ __forceinline__ void tma_load_2d(u32 dst, const TensorMap* map, int c0, int c1,
                                            u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
        "l"((u64)map), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}
__device__ __forceinline__ void tma_load_3d(u32 dst, const TensorMap* map, int c0, int c1,
                                            int c2, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(dst),
        "l"((u64)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}

// Bytes of one stage (bulk.rs `stage_bytes`): activations, weights, scale bytes, rounded up to
// the 1024-byte alignment of the swizzled activation boxes.
__host__ __device__ __forceinline__ int bk_stage_bytes(int rows, int tok, int sb) {
    return (BK_SUBS * tok * 256 + rows * 256 + rows * sb + 1023) & ~1023;
}

template <int FMT, int TN, int MT, int EPI>
__device__ __forceinline__ void fp4_bulk_body(const TensorMap* tw, const TensorMap* ts,
                                              const TensorMap* tx,
                                              const float* __restrict__ gscale,
                                              const u16* __restrict__ lut, u16* __restrict__ y,
                                              int m, int n, int k, float post, int rb, int stages,
                                              int xrows, float* __restrict__ parts,
                                              unsigned int* __restrict__ tickets) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(1024) u8 bk_smem_raw[];
    constexpr int TOK = 8 * TN;
    constexpr int SB = FMT == FMT_NVFP4 ? 32 : 16;  // scale bytes per row and stage
    constexpr int XB = TOK * 256;                   // one activation box (128 elements)
    const int R = 16 * rb;
    const int C = (blockDim.x >> 5) - 1;  // consumer warps
    const int groups = rb / MT;  // row-tile groups (one warp's MT tiles)
    const int kw = C / groups;
    const int STAGE = bk_stage_bytes(R, TOK, SB);
    const int WOFF = BK_SUBS * XB, SOFF = WOFF + R * 256;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nst = (k + BK_CHUNK - 1) / BK_CHUNK;
    const int S = gridDim.y, split = blockIdx.y;
    const int sbeg = (int)((long long)split * nst / S);
    const int iters = (int)((long long)(split + 1) * nst / S) - sbeg;
    // EPI_STORE: rows row0 .. row0 + R. Gated ([gate | up], n = 2 inter): local rows 0 .. R/2
    // are gate rows row0 + l, the rest the matching up rows inter + row0 + l (two boxes each);
    // row0 counts gate rows.
    const int row0 = blockIdx.x * (EPI == EPI_STORE ? R : R / 2);
    const int inter = n >> 1;

    // The dynamic shared memory's start rounded up to 1024 bytes (the swizzle's period; bulk.rs
    // asks for 1 KiB more than the stages need).
    const u32 raw = smem_addr(bk_smem_raw);
    const u32 base = (raw + 1023) & ~1023u;
    u8* const smem = bk_smem_raw + (base - raw);
    const u32 full0 = base + stages * STAGE;  // stages x 8 bytes, then the empty barriers
    const u32 empty0 = full0 + stages * 8;
    // The scale-multiplier table in shared memory (written once per context: no PDL hazard).
    __shared__ u16 bk_lut[256];
    for (int i = tid; i < 256; i += blockDim.x) bk_lut[i] = lut[i];
    if (tid == 0) {
        for (int s = 0; s < stages; s++) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, C);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    const int g = lane >> 2, t = lane & 3;
    float acc[MT][TN][4];
    zero_acc(acc);

    if (warp == C) {
        // Producer: one thread issues every copy. Weights and scale bytes never depend on the
        // kernel before this one, so the first `stages` of them go out before the PDL wait,
        // the activations after it.
        if (lane == 0) {
            // The activation boxes hold xrows tokens (M, or more with zero fill): the rows past
            // them are never written, and the products of those token columns never stored.
            const u32 bytes = BK_SUBS * xrows * 256 + R * 256 + R * SB;
            const auto issue_ws = [&](int it, u32 so) {
                const int c = sbeg + it;
                const u32 bar = full0 + 8 * (it % stages);
                tma_load_2d(so + WOFF, tw, c * (BK_CHUNK / 2), row0, bar);
                tma_load_2d(so + SOFF, ts, c * SB, row0, bar);
                if (EPI != EPI_STORE) {
                    tma_load_2d(so + WOFF + (R / 2) * 256, tw, c * (BK_CHUNK / 2), inter + row0,
                                bar);
                    tma_load_2d(so + SOFF + (R / 2) * SB, ts, c * SB, inter + row0, bar);
                }
            };
            const auto issue_x = [&](int it, u32 so) {
#pragma unroll
                for (int j = 0; j < BK_SUBS; j++)
                    tma_load_3d(so + j * XB, tx, 0, (sbeg + it) * (BK_CHUNK / 64) + 2 * j, 0,
                                full0 + 8 * (it % stages));
            };
            const int pre = iters < stages ? iters : stages;
            for (int it = 0; it < pre; it++) {
                mbar_expect_tx(full0 + 8 * it, bytes);
                issue_ws(it, base + it * STAGE);
            }
            pdl_enter();
            for (int it = 0; it < pre; it++) issue_x(it, base + it * STAGE);
            int slot = 0, round = 1;
            for (int it = stages; it < iters; it++) {
                // Stage `slot`'s previous contents (round - 1) released by every consumer.
                mbar_wait(empty0 + 8 * slot, (round - 1) & 1);
                mbar_expect_tx(full0 + 8 * slot, bytes);
                issue_ws(it, base + slot * STAGE);
                issue_x(it, base + slot * STAGE);
                if (++slot == stages) {
                    slot = 0;
                    round++;
                }
            }
        }
        __syncwarp();  // the warp whole again before the block barrier below
    } else {
        // Consumer warp: row tiles tg * MT .. + MT, chunks kwi, kwi + kw, ... of the block's
        // sequence (BK_SUBS per stage). Within a stage the next chunk's weights and scale bytes
        // are read from shared memory before this one is computed.
        const int tg = warp % groups, kwi = warp / groups;
        const u16* dummy[TN];  // compute_chunks reads staged activations only (XST)
#pragma unroll
        for (int j = 0; j < TN; j++) dummy[j] = bk_lut;
        // Lane-constant offsets, computed once (inside the loop the compiler recomputed them
        // for every chunk): weight and scale bytes of this lane's rows in a stage, and the
        // activation fragments' element offsets in a chunk's box (lane (g, t) reads elements
        // 32t + 8q .. +8 of token 8j + g: half t >> 1, 16-byte unit ((t & 1) << 2) | q of
        // 128-byte row 2(8j + g) + (t >> 1), stored at unit ^ (row & 7): the 128-byte swizzle).
        int woff[MT][2], soff[MT][2], xo[4 * TN];
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int lr = (tg * MT + i) * 16 + h * 8 + g;
                woff[i][h] = WOFF + lr * 256 + t * 16;
                soff[i][h] = SOFF + lr * SB + (FMT == FMT_NVFP4 ? t * 2 : t);
            }
#pragma unroll
        for (int j = 0; j < TN; j++) {
            const int row = 2 * (8 * j + g) + (t >> 1);
#pragma unroll
            for (int q = 0; q < 4; q++)
                xo[4 * j + q] = row * 64 + (((((t & 1) << 2) | q) ^ (row & 7)) << 3);
        }
        const auto load = [&](WeightRegs<MT, 1>& r, const u8* st, int j) {
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    r.w[0][i][h] = *(const uint4*)(st + woff[i][h] + j * 64);
                    r.sc[0][i][h] = FMT == FMT_NVFP4 ? (u32) * (const u16*)(st + soff[i][h] + j * 8)
                                                     : (u32)st[soff[i][h] + j * 4];
                }
        };
        // Chunks past K (the last stage of an NVFP4 K % 512 = 256) are computed too: the copy
        // engine filled their weights, scale bytes and activations with zeros, so they add 0.
        const auto compute = [&](const WeightRegs<MT, 1>& r, const u8* st, int j) {
#ifndef MIMO_BK_NO_COMPUTE  // diagnostic: the stream alone (wrong results)
            compute_chunks<FMT, MT, TN, 1, true, 1>(r, dummy, 0, k, bk_lut, acc,
                                                   (const u16*)(st + j * XB), xo);
#else
            acc[0][0][0] += __uint_as_float(r.w[0][0][0].x & 1);
#endif
        };
        int next = kwi;  // the next chunk (index over the block's stages x BK_SUBS) of this warp
        int slot = 0, round = 0;
        for (int it = 0; it < iters; it++) {
            mbar_wait(full0 + 8 * slot, round & 1);
            const u8* st = smem + slot * STAGE;
            int j = next - it * BK_SUBS;
            if (j < BK_SUBS) {
                WeightRegs<MT, 1> ra;
                load(ra, st, j);
                for (;;) {
                    const int jn = j + kw;
                    if (jn >= BK_SUBS) {
                        compute(ra, st, j);
                        break;
                    }
                    WeightRegs<MT, 1> rn;
                    load(rn, st, jn);
                    compute(ra, st, j);
                    ra = rn;
                    j = jn;
                }
                next = it * BK_SUBS + j + kw;
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(empty0 + 8 * slot);
            if (++slot == stages) {
                slot = 0;
                round++;
            }
        }
    }
    // Every copy has landed and been read (each consumer waited on every stage): the stage
    // buffers become the f32 tiles, one [token][R + 4] tile per K share (the pad keeps the
    // lanes' stores conflict-free: bulk.rs tests it).
    __syncthreads();
    pdl_enter();  // before the first global write (a no-op for the producer thread)
    const int TS = R + 4;
    float* tile = (float*)smem;
    if (warp < C) {
        const int tg = warp % groups, kwi = warp / groups;
        float* mine = tile + kwi * TOK * TS;
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int j = 0; j < TN; j++) {
                const int lr = (tg * MT + i) * 16 + g;
                const int c = j * 8 + 2 * t;
                mine[c * TS + lr] = acc[i][j][0];
                mine[(c + 1) * TS + lr] = acc[i][j][1];
                mine[c * TS + lr + 8] = acc[i][j][2];
                mine[(c + 1) * TS + lr + 8] = acc[i][j][3];
            }
    }
    __syncthreads();
    // The K shares added in index order into share 0 (each element by one thread).
    const int TILE = R * TOK;
    for (int e = tid; e < TILE; e += blockDim.x) {
        const int tk = e / R, lr = e - tk * R;
        float v = tile[tk * TS + lr];
        for (int s = 1; s < kw; s++) v += tile[(s * TOK + tk) * TS + lr];
        tile[tk * TS + lr] = v;
    }
    __syncthreads();
    if (S > 1) {
        // Partial tiles in global memory are dense, [token][local row] (fp4_tiled.cu).
        const auto at = [&](int e) -> float& { return tile[(e / R) * TS + e % R]; };
        if (!split_combine<float, BK_MAX_SPLITS>(parts, tickets, S, split, blockIdx.x, gridDim.x,
                                                 TILE, at))
            return;
    }
    // post = 2^A undoes the 2^-A left in the scale multipliers (weights.rs): exact.
    const float inv_scale = (1.0f / gscale[0]) * post;
    if (EPI == EPI_STORE) {
        for (int e = tid; e < TILE; e += blockDim.x) {
            const int tk = e / R, lr = e - tk * R;
            const int col = row0 + lr;
            if (tk >= m || col >= n) continue;
            y[(size_t)tk * n + col] = f32_to_bf16(tile[tk * TS + lr] * inv_scale);
        }
    } else {
        // Gate row l and up row R/2 + l (gate rows past inter read up rows: never stored).
        const int H = R / 2;
        for (int e = tid; e < H * TOK; e += blockDim.x) {
            const int tk = e / H, l = e - tk * H;
            const int col = row0 + l;
            if (tk >= m || col >= inter) continue;
            y[(size_t)tk * inter + col] = swiglu_bf16(tile[tk * TS + l] * inv_scale,
                                                      tile[tk * TS + H + l] * inv_scale);
        }
    }
#endif
}

#ifndef MIMO_HELPERS_ONLY  // (see fp4_gemm.cu)
#define BK_KERNEL(NAME, FMT, TN, MT, EPI, LB)                                                 \
    extern "C" __global__ void __launch_bounds__(LB, 1)                                       \
        NAME(const __grid_constant__ TensorMap tw, const __grid_constant__ TensorMap ts,      \
             const __grid_constant__ TensorMap tx, const float* gs, const u16* lut, u16* y,   \
             int m, int n, int k, float post, int rb, int stages, int xrows, float* parts,    \
             unsigned int* tickets) {                                                         \
        fp4_bulk_body<FMT, TN, MT, EPI>(&tw, &ts, &tx, gs, lut, y, m, n, k, post, rb, stages, \
                                        xrows, parts, tickets);                               \
    }

// fp4_bulk_{nv,mx}_t{TN}_m1: y = x W^T for up to 8 * TN tokens, one row tile per warp;
// fp4_bulk_sw_*: [gate | up] with the SwiGLU epilogue of the decode kernels (EPI_SWIGLU_BF16).
BK_KERNEL(fp4_bulk_nv_t1_m1, FMT_NVFP4, 1, 1, EPI_STORE, 1024)
BK_KERNEL(fp4_bulk_nv_t2_m1, FMT_NVFP4, 2, 1, EPI_STORE, 1024)
BK_KERNEL(fp4_bulk_mx_t1_m1, FMT_MXFP4, 1, 1, EPI_STORE, 1024)
BK_KERNEL(fp4_bulk_mx_t2_m1, FMT_MXFP4, 2, 1, EPI_STORE, 1024)
BK_KERNEL(fp4_bulk_sw_nv_t1_m1, FMT_NVFP4, 1, 1, EPI_SWIGLU_BF16, 1024)
BK_KERNEL(fp4_bulk_sw_nv_t2_m1, FMT_NVFP4, 2, 1, EPI_SWIGLU_BF16, 1024)
BK_KERNEL(fp4_bulk_sw_mx_t1_m1, FMT_MXFP4, 1, 1, EPI_SWIGLU_BF16, 1024)
BK_KERNEL(fp4_bulk_sw_mx_t2_m1, FMT_MXFP4, 2, 1, EPI_SWIGLU_BF16, 1024)
// 32 tokens: at most 16 consumer warps (544 threads: the activation fragments of four token
// tiles need more than the 64 registers of a 1,024-thread block).
BK_KERNEL(fp4_bulk_nv_t4_m1, FMT_NVFP4, 4, 1, EPI_STORE, 544)
BK_KERNEL(fp4_bulk_mx_t4_m1, FMT_MXFP4, 4, 1, EPI_STORE, 544)
BK_KERNEL(fp4_bulk_sw_nv_t4_m1, FMT_NVFP4, 4, 1, EPI_SWIGLU_BF16, 544)
BK_KERNEL(fp4_bulk_sw_mx_t4_m1, FMT_MXFP4, 4, 1, EPI_SWIGLU_BF16, 544)
#endif  // MIMO_HELPERS_ONLY
