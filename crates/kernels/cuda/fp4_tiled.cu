// Tiled FP4 GEMM for 9 to 256 tokens (tiled.rs `fp4_gemm_tiled`; the runtime takes it from 17
// tokens, `Tuning::tiled_gemm`).
//
// Compiled in the same unit as fp4_gemm.cu, after it (context.rs), so it uses that file's
// weight decode (`compute_chunks` on a `WeightRegs` set), activation swizzle (`xstage_off`)
// and epilogue conventions; only the work split differs.
//
// Why: the decode kernels (fp4_tile) give each block 16 or 32 weight rows and split K between
// its warps, so every warp reads all of its tokens' activations for its own chunks: at 32
// tokens that is 8 bytes of activations through L1 per weight byte, and the 32-token products
// ran no faster than cuBLAS BF16 (MiMo-7B batch-32 decode). Here one block owns 256 weight rows
// (16 warps x 16 rows; the gated form 128 gate rows and their 128 up rows) and 8*TN tokens; the
// whole block shares one copy of each K chunk's activations in shared memory (half a byte of
// activations per weight byte at 32 tokens), and the weights, their scale bytes and the
// activations of the next two chunks stream in by cp.async while this one is computed
// (three stages, 78 KiB at 32 tokens: under the 100 KiB carveout the other kernels use, so
// neighbours of a PDL chain can share the SM). H100 (bench/README.md, docs/kernels-notes.md rounds
// 16-17): 1.29-1.58x cuBLAS BF16 at 32 tokens on the large shapes. Each thread's copy
// addresses are planned once and only advanced in the loop (recomputed, they doubled its
// instructions); its warps now wait mostly on their copies (ncu), one block per SM.
//
// Grid: x = row blocks, y = K splits, z = token blocks of 8*TN. A product with few row blocks
// splits K over blockIdx.y (tiled.rs `tiled_splits`): each split writes its f32 partial tile to
// `parts`, and the last split to arrive (a ticket per row and token block, reset by that block)
// adds the partials in split order, so the result does not depend on which block finishes
// first. Requires K % 128 == 0 (whole chunks: every cp.async source is aligned).

#ifndef MM_STAGES
#define MM_STAGES 3  // tiled.rs STAGES
#endif
#define MM_ROWS 256
#define MM_MAX_SPLITS 8  // tiled.rs MAX_SPLITS

// Bytes of one pipeline stage: weights (warp, tile, row half, lane) x 16 bytes, then the scale
// bytes of every row (8 per row and chunk; MXFP4 uses 4), then the activations (8*TN slots of
// 128 elements, swizzled as xstage_off).
#define MM_W_BYTES (MM_ROWS * 64)
#define MM_S_BYTES (MM_ROWS * 8)
#define MM_X_BYTES(TN) (8 * (TN) * 128 * 2)
#define MM_STAGE_BYTES(TN) (MM_W_BYTES + MM_S_BYTES + MM_X_BYTES(TN))
// Floats between the token rows of the epilogue's tile (tiled.rs TILE_STRIDE).
#define MM_TILE_STRIDE (MM_ROWS + 4)

// Float offset in the padded tile of float4 e of a dense [token][MM_ROWS] tile.
__device__ __forceinline__ int mm_tile_off(int e) {
    return (e / (MM_ROWS / 4)) * MM_TILE_STRIDE + (e % (MM_ROWS / 4)) * 4;
}

// cp.async of BYTES (4 or 8: a row's scale bytes of one chunk) global -> shared (dst: a
// shared-window address) through L1, zero-filled where !valid; the 16-byte copies are
// fp4_gemm.cu's cp_async16_to.
template <int BYTES>
__device__ __forceinline__ void cp_async_small(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src),
                 "n"(BYTES), "r"(valid ? BYTES : 0)
                 : "memory");
}

// Weight row of local row `lr` (0..MM_ROWS) of a block starting at row0, and whether it exists.
// EPI_STORE: rows row0 + lr. Gated: local row wn*32 + i*16 + r is gate row row0 + wn*16 + r
// (i = 0) or the matching up row + inter (i = 1); row0 counts gate rows.
template <int EPI>
__device__ __forceinline__ int mm_row(int lr, int row0, int n, bool& valid) {
    if (EPI == EPI_STORE) {
        const int r = row0 + lr;
        valid = r < n;
        return r;
    }
    const int inter = n >> 1;
    const int wn = lr >> 5, i = (lr >> 4) & 1, r = lr & 15;
    const int gr = row0 + wn * 16 + r;
    valid = gr < inter;
    return gr + i * inter;
}

// Element-wise sum of two partial-sum vectors (split_combine's float4 or float).
__device__ __forceinline__ float4 split_add(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float split_add(float a, float b) { return a + b; }

// The K-split combine of the tiled and bulk kernels (S > 1 splits, this block's `split`): each
// split's block stores its f32 tile of TILE floats, read as vectors T through tile_at(e), dense
// to `parts` and takes the cell's ticket; the last block to arrive adds the splits in index
// order (the same sums whichever block finished first), writes them back through tile_at and
// resets the ticket for the next launch (graph replays). Each thread requests all splits of its
// vector before adding (one L2 round trip per pass, not one per split and element). Returns
// false in the blocks that were not last: they are done.
template <class T, int MAXS, class At>
__device__ __forceinline__ bool split_combine(float* __restrict__ parts,
                                              unsigned int* __restrict__ tickets, int S,
                                              int split, size_t cell, size_t cells, int TILE,
                                              At tile_at) {
    constexpr int W = sizeof(T) / sizeof(float);
    const int tid = threadIdx.x;
    T* mine = (T*)(parts + ((size_t)split * cells + cell) * TILE);
    for (int e = tid; e < TILE / W; e += blockDim.x) __stcg(mine + e, (T)tile_at(e));
    __threadfence();
    __syncthreads();
    __shared__ int split_last;
    if (tid == 0) split_last = atomicAdd(tickets + cell, 1u) == (unsigned int)(S - 1);
    __syncthreads();
    if (!split_last) return false;
    __threadfence();
    for (int e = tid; e < TILE / W; e += blockDim.x) {
        T p[MAXS];
#pragma unroll
        for (int s = 0; s < MAXS; s++)
            if (s < S) p[s] = __ldcg((const T*)(parts + ((size_t)s * cells + cell) * TILE) + e);
        T v{};
#pragma unroll
        for (int s = 0; s < MAXS; s++)
            if (s < S) v = split_add(v, p[s]);
        tile_at(e) = v;
    }
    if (tid == 0) tickets[cell] = 0;
    __syncthreads();
    return true;
}

// The block: MM_ROWS / 16 = 16 warps of one 16-row tile each (8 warps of two measured 1-3 %
// slower on the H100).
// The block's sums into tile[token][local row], rows MM_TILE_STRIDE floats apart (the pad
// makes both the lanes' stores, (8t + g) mod 32, and the epilogue's row-contiguous reads
// conflict-free; [row][token] had 8-way conflicts on the stores and 32-way on the reads): warp
// w's accumulators hold local rows 16w + g (+ 8) and tokens 8j + 2t (+ 1) (mma C fragments).
template <int TN>
__device__ __forceinline__ void mm_tile_from_acc(float* tile, const float (&acc)[1][TN][4]) {
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < TN; j++) {
        const int lr = warp * 16 + g;
        const int c = j * 8 + 2 * t;
        tile[c * MM_TILE_STRIDE + lr] = acc[0][j][0];
        tile[(c + 1) * MM_TILE_STRIDE + lr] = acc[0][j][1];
        tile[c * MM_TILE_STRIDE + lr + 8] = acc[0][j][2];
        tile[(c + 1) * MM_TILE_STRIDE + lr + 8] = acc[0][j][3];
    }
}

// The epilogue's stores: tile (mm_tile_from_acc) times `scale` into bf16 output rows, slot tk to
// row out_row(tk) (< 0: none). EPI_STORE: columns row0 + local row (< n); gated: silu(gate) * up
// into n / 2 columns (local rows 32 i + r and 32 i + 16 + r hold gate and up column row0 + 16 i + r).
template <int BM, int EPI, class OutRow>
__device__ __forceinline__ void mm_store_tile(const float* tile, float scale, u16* __restrict__ y,
                                              int n, int row0, OutRow out_row) {
    constexpr int TILE = MM_ROWS * BM;
    if (EPI == EPI_STORE) {
        for (int e = threadIdx.x; e < TILE; e += blockDim.x) {
            const int tk = e / MM_ROWS, lr = e - tk * MM_ROWS;
            const int col = row0 + lr;
            const int orow = out_row(tk);
            if (orow < 0 || col >= n) continue;
            y[(size_t)orow * n + col] = f32_to_bf16(tile[tk * MM_TILE_STRIDE + lr] * scale);
        }
    } else {
        const int inter = n >> 1;
        for (int e = threadIdx.x; e < TILE / 2; e += blockDim.x) {
            const int tk = e / (MM_ROWS / 2), l = e - tk * (MM_ROWS / 2);
            const int col = row0 + l;
            const int orow = out_row(tk);
            if (orow < 0 || col >= inter) continue;
            const int lr = (l >> 4) * 32 + (l & 15);
            y[(size_t)orow * inter + col] = swiglu_bf16(tile[tk * MM_TILE_STRIDE + lr] * scale,
                                                        tile[tk * MM_TILE_STRIDE + lr + 16] * scale);
        }
    }
}

// The grouped (MoE) block's tile (moe_route_tiles' table, moe.cu): after the PDL wait, returns the
// expert of tile blockIdx.z with slot i's activation row in moe_in[i] (pair / in_div) and output
// row in moe_out[i] (the pair; -1: empty slot), or -1 past the table's tiles (the whole block
// returns). Ends with a barrier.
template <int BM>
__device__ __forceinline__ int mm_moe_tile(const int* __restrict__ sorted,
                                           const int* __restrict__ route, int in_div, int* moe_in,
                                           int* moe_out) {
    pdl_enter();
    const int tile = blockIdx.z;
    if (tile >= __ldcg(route)) return -1;
    const int* ti = route + 1 + 3 * tile;
    const int expert = __ldcg(ti);
    const int start = __ldcg(ti + 1), cnt = __ldcg(ti + 2);
    const int tid = threadIdx.x;
    if (tid < BM) {
        const int q = tid < cnt ? __ldcg(sorted + start + tid) : -1;
        moe_out[tid] = q;
        moe_in[tid] = q < 0 ? -1 : q / in_div;
    }
    __syncthreads();
    return expert;
}

// The K loop of the tiled kernels' MM_STAGES-stage cp.async ring of STAGE-byte stages, whose
// first MM_STAGES - 1 stages the caller has issued and committed: for each of `iters` chunks,
// wait until the chunk's stage is complete (at most the newest MM_STAGES - 2 groups, stages
// it + 1 on, in flight; the barrier also tells every warp that the previous stage's buffer,
// refilled next, is free), issue(chunk, byte offset) the chunk MM_STAGES - 1 ahead into that
// buffer, then compute(byte offset of this chunk's stage). Ends with every copy landed and a
// barrier: the stage buffers are free for the epilogue.
template <int STAGE, class Issue, class Compute>
__device__ __forceinline__ void mm_ring(int iters, Issue issue, Compute compute) {
    u32 rd = 0, wr = (MM_STAGES - 1) * STAGE;
    for (int it = 0; it < iters; it++) {
        cp_async_wait<MM_STAGES - 2>();
        __syncthreads();
        issue(it + MM_STAGES - 1, wr);
        cp_async_commit();
        compute(rd);
        rd = rd == (MM_STAGES - 1) * STAGE ? 0 : rd + STAGE;
        wr = wr == (MM_STAGES - 1) * STAGE ? 0 : wr + STAGE;
    }
    cp_async_wait<0>();
    __syncthreads();
}

// MOE (the grouped form, fp4_mm_moe_*): blockIdx.z is a tile of `route` (moe_route_tiles,
// moe.cu): up to 8*TN pairs of one expert, whose weights, scales and global scale this block
// uses; slot i reads activation row moe_in[i] and writes output row moe_out[i] (-1: empty slot),
// both in the caller's shared memory. No K split there (gridDim.y is 1).
template <int FMT, int TN, int EPI, bool MOE = false>
__device__ __forceinline__ void fp4_mm_body(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                            const float* __restrict__ gscale,
                                            const u16* __restrict__ lut,
                                            const u16* __restrict__ x, u16* __restrict__ y, int m,
                                            int n, int k, float post, float* __restrict__ parts,
                                            unsigned int* __restrict__ tickets,
                                            const int* __restrict__ sorted = 0,
                                            const int* __restrict__ route = 0, int in_div = 1,
                                            int* moe_in = 0, int* moe_out = 0) {
    extern __shared__ __align__(16) u8 mm_smem[];
    constexpr int BM = 8 * TN;
    constexpr int STAGE = MM_STAGE_BYTES(TN);
    constexpr int SB = FMT == FMT_NVFP4 ? 8 : 4;  // scale bytes per row and chunk
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int kb = k >> 1;
    const int bpr = FMT == FMT_NVFP4 ? (k >> 4) : (k >> 5);
    const int nch = k >> 7;
    const int S = gridDim.y, split = blockIdx.y;
    const int cbeg = (int)((long long)split * nch / S);
    const int iters = (int)((long long)(split + 1) * nch / S) - cbeg;
    const int tok0 = MOE ? 0 : blockIdx.z * BM;
    int expert = 0;
    if (MOE) {
        // The tile table comes from the launch before: nothing is read before the wait.
        expert = mm_moe_tile<BM>(sorted, route, in_div, moe_in, moe_out);
        if (expert < 0) return;  // past the tiles this routing made (whole block)
        wp += (size_t)expert * n * kb;
        ws += (size_t)expert * n * bpr;
    }
    const int row0 = blockIdx.x * (EPI == EPI_STORE ? MM_ROWS : MM_ROWS / 2);
    constexpr int NT = 2 * MM_ROWS;              // threads
    constexpr int WP = MM_ROWS * 4 / NT;           // weight pieces per thread and stage

    // This thread's copies per stage, planned once: shared-window destinations within a stage
    // and global sources that advance by one chunk per issue (loop-carried, so the compiler
    // does not recompute row x k products in the loop: that address arithmetic was as many
    // instructions as the chunk's decode and mma). Weights: pieces tid + NT j (j < WP) of the
    // stage's 1024, piece p = (local row group p >> 5: warp, tile, half) x lane (g, t): 16 bytes
    // at t*16 of local row 8 * (p >> 5) + g. Scales: local row tid (threads < MM_ROWS).
    // Activations: piece q = tid (threads < 16 * BM), slot q >> 4, 16 bytes at piece q & 15.
    const u32 sbase = smem_addr(mm_smem);
    const u8* wsrc[WP];
    bool wval[WP];
#pragma unroll
    for (int j = 0; j < WP; j++) {
        const int p = tid + NT * j;
        const int lr = 8 * (p >> 5) + ((p & 31) >> 2);
        const int r = mm_row<EPI>(lr, row0, n, wval[j]);
        wsrc[j] = wp + (size_t)(wval[j] ? r : 0) * kb + (p & 3) * 16 + (size_t)cbeg * 64;
    }
    bool sval;
    const int srow = mm_row<EPI>(tid, row0, n, sval);
    sval = sval && tid < MM_ROWS;
    const u8* ssrc = ws + (size_t)(sval ? srow : 0) * bpr + (size_t)cbeg * SB;
    // Activation pieces tid + NT i (i < XP; 64-token tiles take two per thread).
    constexpr int XP = (BM * 16 + NT - 1) / NT;
    bool xon[XP], xval[XP];
    const u16* xsrc[XP];
    u32 xdst[XP];
#pragma unroll
    for (int i = 0; i < XP; i++) {
        const int q = tid + NT * i;
        xon[i] = q < BM * 16;
        const int xslot = q >> 4, xpiece = q & 15;
        const int xrow = MOE ? (xon[i] ? moe_in[xslot] : -1) : tok0 + xslot;
        xval[i] = MOE ? xrow >= 0 : xon[i] && tok0 + xslot < m;
        xsrc[i] = x + (size_t)(xval[i] ? xrow : 0) * k + (size_t)cbeg * 128 + xpiece * 8;
        xdst[i] = MM_W_BYTES + MM_S_BYTES + 2 * xstage_off(xslot, xpiece);
    }

    // Issues chunk `it`'s weights (and scale bytes) / activations into the stage at byte offset
    // `so`; past the split they issue nothing (an empty group keeps the count).
    const auto issue_w = [&](int it, u32 so) {
        if (it >= iters) return;
#pragma unroll
        for (int j = 0; j < WP; j++) {
            cp_async16_to(sbase + so + (tid + NT * j) * 16, wsrc[j], wval[j]);
            wsrc[j] += 64;
        }
        if (tid < MM_ROWS) cp_async_small<SB>(sbase + so + MM_W_BYTES + tid * 8, ssrc, sval);
        ssrc += SB;
    };
    const auto issue_x = [&](int it, u32 so) {
        if (it >= iters) return;
#pragma unroll
        for (int i = 0; i < XP; i++) {
            if (xon[i]) cp_async16_to(sbase + so + xdst[i], xsrc[i], xval[i]);
            xsrc[i] += 128;
        }
    };

    // Weights never depend on the kernel before this one: the first two stages' weights go out
    // before the PDL wait, the activations after it.
    // (The grouped form learns its expert after the wait: weights and activations go out
    // together.)
    if (!MOE) {
#pragma unroll
        for (int s = 0; s < MM_STAGES - 1; s++) {
            issue_w(s, s * STAGE);
            cp_async_commit();
        }
        pdl_enter();
    }
#pragma unroll
    for (int s = 0; s < MM_STAGES - 1; s++) {
        if (MOE) issue_w(s, s * STAGE);
        issue_x(s, s * STAGE);
        cp_async_commit();
    }

    float acc[1][TN][4];
    zero_acc(acc);
    const int g = lane >> 2, t = lane & 3;
    const u16* dummy[TN];  // compute_chunks reads staged activations only (XST)
#pragma unroll
    for (int j = 0; j < TN; j++) dummy[j] = x;
    const auto issue = [&](int it, u32 so) {
        issue_w(it, so);
        issue_x(it, so);
    };
    mm_ring<STAGE>(iters, issue, [&](u32 rd) {
        const u8* st = mm_smem + rd;
        WeightRegs<1, 1> r;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int grp = warp * 2 + h;  // local rows 8 * grp .. + 8
            r.w[0][0][h] = *(const uint4*)(st + (grp * 32 + lane) * 16);
            const u8* sp = st + MM_W_BYTES + (grp * 8 + g) * 8;
            r.sc[0][0][h] = FMT == FMT_NVFP4 ? (u32) * (const u16*)(sp + 2 * t) : (u32)sp[t];
        }
        compute_chunks<FMT, 1, TN, 1, true>(r, dummy, 0, k, lut, acc,
                                            (const u16*)(st + MM_W_BYTES + MM_S_BYTES));
    });
    // Every warp is done with the stage buffers: they become the tile.

    float* tile = (float*)mm_smem;
    mm_tile_from_acc<TN>(tile, acc);
    __syncthreads();
    constexpr int TILE = MM_ROWS * BM;
    if (!MOE && S > 1) {
        // Partial tiles in global memory are dense, [token][local row].
        const size_t cell = (size_t)blockIdx.z * gridDim.x + blockIdx.x;
        const size_t cells = (size_t)gridDim.z * gridDim.x;
        const auto at = [&](int e) -> float4& { return *(float4*)(tile + mm_tile_off(e)); };
        if (!split_combine<float4, MM_MAX_SPLITS>(parts, tickets, S, split, cell, cells, TILE, at))
            return;
    }
    // post = 2^A undoes the 2^-A left in the scale multipliers (weights.rs): exact.
    const float inv_scale = (1.0f / gscale[expert]) * post;
    mm_store_tile<BM, EPI>(tile, inv_scale, y, n, row0, [&](int tk) {
        return MOE ? moe_out[tk] : (tok0 + tk < m ? tok0 + tk : -1);
    });
}

#define MM_KERNEL(NAME, FMT, TN, EPI)                                                           \
    extern "C" __global__ void __launch_bounds__(2 * MM_ROWS, 1) NAME(                         \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int m, \
        int n, int k, float post, float* parts, unsigned int* tickets) {                         \
        fp4_mm_body<FMT, TN, EPI>(wp, ws, gs, lut, x, y, m, n, k, post, parts, tickets);        \
    }

// fp4_mm_{nv,mx}_t{TN} (y = x W^T) and fp4_mm_sw_{nv,mx}_t{TN} ([gate | up] with SwiGLU).
MM_KERNEL(fp4_mm_nv_t2, FMT_NVFP4, 2, EPI_STORE)
MM_KERNEL(fp4_mm_nv_t4, FMT_NVFP4, 4, EPI_STORE)
MM_KERNEL(fp4_mm_mx_t2, FMT_MXFP4, 2, EPI_STORE)
MM_KERNEL(fp4_mm_mx_t4, FMT_MXFP4, 4, EPI_STORE)
MM_KERNEL(fp4_mm_sw_nv_t2, FMT_NVFP4, 2, EPI_SWIGLU_BF16)
MM_KERNEL(fp4_mm_sw_nv_t4, FMT_NVFP4, 4, EPI_SWIGLU_BF16)
MM_KERNEL(fp4_mm_sw_mx_t2, FMT_MXFP4, 2, EPI_SWIGLU_BF16)
MM_KERNEL(fp4_mm_sw_mx_t4, FMT_MXFP4, 4, EPI_SWIGLU_BF16)

// The grouped (MoE) form: grid (row blocks of one expert, 1, moe_route_tiles' tile bound);
// pair q's activation row is q / in_div (gate/up: its token; down: the pair itself), its
// output row q. tiled.rs `moe_tiled_product`.
#define MM_MOE_KERNEL(NAME, FMT, TN, EPI)                                                       \
    extern "C" __global__ void __launch_bounds__(2 * MM_ROWS, 1) NAME(                         \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y,     \
        int n, int k, float post, const int* sorted, const int* route, int in_div) {           \
        __shared__ int moe_in[8 * (TN)], moe_out[8 * (TN)];                                     \
        fp4_mm_body<FMT, TN, EPI, true>(wp, ws, gs, lut, x, y, 0, n, k, post, 0, 0, sorted,   \
                                        route, in_div, moe_in, moe_out);                       \
    }

// fp4_mm_moe_{nv,mx}_t{4,8} (down projections) and fp4_mm_moe_sw_{nv,mx}_t{4,8} (gate/up +
// SwiGLU): tiles of 32 or 64 pairs.
MM_MOE_KERNEL(fp4_mm_moe_nv_t4, FMT_NVFP4, 4, EPI_STORE)
MM_MOE_KERNEL(fp4_mm_moe_mx_t4, FMT_MXFP4, 4, EPI_STORE)
MM_MOE_KERNEL(fp4_mm_moe_sw_nv_t4, FMT_NVFP4, 4, EPI_SWIGLU_BF16)
MM_MOE_KERNEL(fp4_mm_moe_sw_mx_t4, FMT_MXFP4, 4, EPI_SWIGLU_BF16)
MM_MOE_KERNEL(fp4_mm_moe_nv_t8, FMT_NVFP4, 8, EPI_STORE)
MM_MOE_KERNEL(fp4_mm_moe_mx_t8, FMT_MXFP4, 8, EPI_STORE)
MM_MOE_KERNEL(fp4_mm_moe_sw_nv_t8, FMT_NVFP4, 8, EPI_SWIGLU_BF16)
MM_MOE_KERNEL(fp4_mm_moe_sw_mx_t8, FMT_MXFP4, 8, EPI_SWIGLU_BF16)

// ---------------------------------------------------------------------------------------------
// The BF16 experts' tiled grouped product (moe_bf16.rs `moe_bf16_tiled`, prefill-sized batches
// of the BF16 model): the FP4 kernel's blocks (256 weight rows, a tile of 32 pairs, three-stage
// cp.async pipeline, same epilogue), with 64-element K chunks of bf16 weights (32 KiB a stage)
// that need no decode: A and B fragments come straight from shared memory by ldmatrix. Every
// 128-byte row (a weight row's chunk, a slot's activations) stores its 16-byte unit u at
// u ^ (row & 7), so the eight row addresses of one ldmatrix hit eight bank groups.
// Requires K % 64 == 0.
// ---------------------------------------------------------------------------------------------
#define BM_CH 64
#define BM_W_BYTES (MM_ROWS * 128)
#define BM_X_BYTES(TN) (8 * (TN) * 128)
#define BM_STAGE_BYTES(TN) (BM_W_BYTES + BM_X_BYTES(TN))

// Byte offset of 16-byte unit u of 128-byte row r (swizzled).
__device__ __forceinline__ u32 sw128(int r, int u) { return (u32)(r * 128 + ((u ^ (r & 7)) << 4)); }

// Four 8x8 bf16 matrices from shared memory: lanes 8i..8i+7 give the row addresses of matrix i,
// whose fragment (row lane / 4, elements 2 (lane % 4) and + 1) lands in r[i].
__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

template <int TN, int EPI>
__device__ __forceinline__ void bf16_mm_moe_body(const u16* __restrict__ w,
                                                 const u16* __restrict__ x, u16* __restrict__ y,
                                                 int n, int k, const int* __restrict__ sorted,
                                                 const int* __restrict__ route, int in_div,
                                                 int* moe_in, int* moe_out) {
    static_assert(TN % 2 == 0, "token tiles go in pairs (one ldmatrix.x4)");
    extern __shared__ __align__(16) u8 mm_smem[];
    constexpr int BM = 8 * TN;
    constexpr int STAGE = BM_STAGE_BYTES(TN);
    constexpr int NT = 2 * MM_ROWS;      // threads
    constexpr int WP = MM_ROWS * 8 / NT;  // 16-byte weight pieces per thread and stage
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nch = k / BM_CH;
    const int expert = mm_moe_tile<BM>(sorted, route, in_div, moe_in, moe_out);
    if (expert < 0) return;
    w += (size_t)expert * n * k;
    const int row0 = blockIdx.x * (EPI == EPI_STORE ? MM_ROWS : MM_ROWS / 2);
    const u32 sbase = smem_addr(mm_smem);
    // Copies per stage, planned once: weight piece p = tid + NT j is unit p & 7 of local row
    // p >> 3; activation piece tid (< 8 BM) is unit tid & 7 of slot tid >> 3.
    const u16* wsrc[WP];
    bool wval[WP];
    u32 wdst[WP];
#pragma unroll
    for (int j = 0; j < WP; j++) {
        const int p = tid + NT * j, lr = p >> 3, u = p & 7;
        const int r = mm_row<EPI>(lr, row0, n, wval[j]);
        wsrc[j] = w + (size_t)(wval[j] ? r : 0) * k + u * 8;
        wdst[j] = sw128(lr, u);
    }
    const bool xon = tid < BM * 8;
    const int xslot = tid >> 3, xu = tid & 7;
    const int xrow = xon ? moe_in[xslot] : -1;
    const bool xval = xrow >= 0;
    const u16* xsrc = x + (size_t)(xval ? xrow : 0) * k + xu * 8;
    const u32 xdst = BM_W_BYTES + sw128(xslot, xu);
    const auto issue = [&](int it, u32 so) {
        if (it >= nch) return;
#pragma unroll
        for (int j = 0; j < WP; j++) {
            cp_async16_to(sbase + so + wdst[j], wsrc[j], wval[j]);
            wsrc[j] += BM_CH;
        }
        if (xon) cp_async16_to(sbase + so + xdst, xsrc, xval);
        xsrc += BM_CH;
    };
#pragma unroll
    for (int s = 0; s < MM_STAGES - 1; s++) {
        issue(s, s * STAGE);
        cp_async_commit();
    }
    float acc[1][TN][4];
    zero_acc(acc);
    // ldmatrix rows of this lane: A (the warp's 16 weight rows) matrix lane >> 3 = rows 0-7 /
    // 8-15 at k 0-7, then the same at k 8-15; B (token tiles 2jj, 2jj + 1) matrix lane >> 3 =
    // tile 2jj at k 0-7 / 8-15, then tile 2jj + 1.
    const int ar = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, au = lane >> 4;
    const int bu = (lane >> 3) & 1;
    mm_ring<STAGE>(nch, issue, [&](u32 rd) {
        const u32 st = sbase + rd;
#pragma unroll
        for (int ks = 0; ks < BM_CH / 16; ks++) {
            u32 a0, a1, a2, a3;
            ldmatrix_x4(st + sw128(ar, 2 * ks + au), a0, a1, a2, a3);
#pragma unroll
            for (int jj = 0; jj < TN / 2; jj++) {
                const int bs = 8 * (2 * jj + (lane >> 4)) + (lane & 7);
                u32 b0, b1, b2, b3;
                ldmatrix_x4(st + BM_W_BYTES + sw128(bs, 2 * ks + bu), b0, b1, b2, b3);
                mma_bf16_16816(acc[0][2 * jj], a0, a1, a2, a3, b0, b1);
                mma_bf16_16816(acc[0][2 * jj + 1], a0, a1, a2, a3, b2, b3);
            }
        }
    });
    float* tile = (float*)mm_smem;
    mm_tile_from_acc<TN>(tile, acc);
    __syncthreads();
    mm_store_tile<BM, EPI>(tile, 1.f, y, n, row0, [&](int tk) { return moe_out[tk]; });
}

#define BM_MOE_KERNEL(NAME, TN, EPI)                                                            \
    extern "C" __global__ void __launch_bounds__(2 * MM_ROWS, 1)                                \
        NAME(const u16* w, const u16* x, u16* y, int n, int k, const int* sorted,              \
             const int* route, int in_div) {                                                     \
        __shared__ int moe_in[8 * (TN)], moe_out[8 * (TN)];                                     \
        bf16_mm_moe_body<TN, EPI>(w, x, y, n, k, sorted, route, in_div, moe_in, moe_out);      \
    }

// bf16_mm_moe_t{4,8} (y = x W^T per pair) and bf16_mm_moe_sw_t{4,8} ([gate | up] with SwiGLU):
// tiles of 32 or 64 pairs.
BM_MOE_KERNEL(bf16_mm_moe_t4, 4, EPI_STORE)
BM_MOE_KERNEL(bf16_mm_moe_sw_t4, 4, EPI_SWIGLU_BF16)
BM_MOE_KERNEL(bf16_mm_moe_t8, 8, EPI_STORE)
BM_MOE_KERNEL(bf16_mm_moe_sw_t8, 8, EPI_SWIGLU_BF16)
