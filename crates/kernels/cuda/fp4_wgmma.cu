// Warpgroup FP4 GEMM for 16 to 2048+ tokens on Hopper (wgmma.rs `fp4_gemm_wgmma`): the weights
// are the A operand of `wgmma.mma_async` (64 weight rows per warpgroup, from registers), the
// tokens its N (16-256 per block), the activations its B operand (from shared memory).
//
// Compiled in the same unit as fp4_gemm.cu (for `e2m1x8_to_bf16`'s bit layout, `bf16x2_mul`,
// the cp.async helpers) and fp4_tiled.cu (`split_combine`, `cp_async_small`).
//
// Why: the tiled kernel (fp4_tiled.cu) issues one `mma.sync` per 16 rows x 8 tokens x 16 K
// and its products ran at 0.82-1.00x cuBLAS BF16 at 64 tokens and far below from 256; a
// warpgroup instruction does 64 rows x N tokens at once, asynchronously, while the warps decode
// the next chunk's weights into the other of two register sets. H100 (docs/kernels-notes.md
// round 26): 4096 x 14336 at 64 tokens 33.8 us chained, 1.29x cuBLAS BF16 (tiled kernel 52,
// FP8 path 65); the runtime takes it for 33-128 tokens.
//
// Block: two warpgroups (256 threads), 128 weight rows (warpgroup wg: rows 64 wg ..), BN tokens
// (blockIdx.z), K in chunks of 128 through an S_-stage cp.async ring. A stage holds
//   - the activations: two slabs (K 0-63, 64-127 of the chunk) of BN rows x 128 bytes in the
//     canonical 128-byte-swizzled K-major layout of a wgmma operand (unit u of row r at
//     u ^ (r & 7); 8-row groups 1024 bytes apart), so the B descriptors point straight at them;
//   - the packed weights: 128 rows x 64 bytes, 16-byte unit u of row r at u ^ ((r >> 1) & 3)
//     (the 8 rows a warp's quads read at once fall in 8 distinct bank groups);
//   - the scale bytes: 8 per row (MXFP4: the first 4).
// The A fragment of a k16 step s (elements 16 s .. 16 s + 15 of the chunk, natural order:
// the activations need no permutation): lane (g, t) holds rows g and g + 8 of its warp's 16,
// elements 2t, 2t+1 (word 2s of the row) and 2t+8, 2t+9 (word 2s+1). Pair t of a word is
// decoded alone with two rotations (e2m1x8_to_bf16's four cases as one formula with per-lane
// amounts), so every weight is decoded exactly once per block.
// Requires K % 128 == 0. Grid: x = row blocks, y = K splits, z = token blocks.

#define WG_ROWS 128
#define WG_THREADS 256
#define WG_MAX_SPLITS 8  // tiled.rs MAX_SPLITS: tiled_splits' bound, as MM_MAX_SPLITS
#define WG_TILE_STRIDE (WG_ROWS + 4)
#define WG_W_BYTES (WG_ROWS * 64)
#define WG_S_BYTES (WG_ROWS * 8)

template <int BN>
__host__ __device__ constexpr int wg_stage_bytes() {
    return BN * 256 + WG_W_BYTES + WG_S_BYTES;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// D (64 x N, f32) += A (64 x 16, bf16 registers) * B (16 x N, bf16, shared memory, `desc`).
__device__ __forceinline__ void wgmma_bf16(float (&d)[8], u32 a0, u32 a1, u32 a2, u32 a3,
                                          u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7"
        "}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_bf16(float (&d)[16], u32 a0, u32 a1, u32 a2, u32 a3,
                                          u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
        "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_bf16(float (&d)[32], u32 a0, u32 a1, u32 a2, u32 a3,
                                          u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_bf16(float (&d)[64], u32 a0, u32 a1, u32 a2, u32 a3,
                                          u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_bf16(float (&d)[128], u32 a0, u32 a1, u32 a2, u32 a3,
                                          u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Orders this thread's generic-proxy writes of shared memory (st.shared, cp.async) before later
// async-proxy reads (wgmma's descriptors), once a barrier follows.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Descriptor of a K-major, 128-byte-swizzled wgmma operand at shared address `addr` (8-row
// groups 1024 bytes apart; the leading offset is unused for this layout).
__device__ __forceinline__ u64 wg_desc(u32 addr) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) |
           ((u64)1 << 62);
}

// Lane t's pair (elements 2t, 2t+1) of a re-packed word as bf16x2 * 2^-126 (e2m1x8_to_bf16's
// p_t): magnitude bits rotated by ra, sign bit by rb (t = 0..3: (0, 0), (6, 6), (3, 2),
// (28, 1)); no wrapped bit reaches either mask.
__device__ __forceinline__ u32 rotl32(u32 q, u32 r) {
    u32 d;
    asm("shf.l.wrap.b32 %0, %1, %1, %2;" : "=r"(d) : "r"(q), "r"(r));
    return d;
}
__device__ __forceinline__ u32 e2m1_pair(u32 q, u32 ra, u32 rb) {
    return (rotl32(q, ra) & MAG_MASK) | (rotl32(q, rb) & SIGN_MASK);
}
#endif

template <int FMT, int BN, int S_>
__device__ __forceinline__ void fp4_wg_body(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                            const float* __restrict__ gscale,
                                            const u16* __restrict__ lut,
                                            const u16* __restrict__ x, u16* __restrict__ y, int m,
                                            int n, int k, float post, float* __restrict__ parts,
                                            unsigned int* __restrict__ tickets) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) u8 wg_smem_raw[];
    __shared__ u16 slut[256];
    // Per warp, the bf16x2 scale multipliers of its 16 rows' 8 k16 steps for the chunk being
    // decoded (row r: steps 0-3 in [r][0], 4-7 in [r][1]; a third slot of padding keeps the 8
    // rows a warp's quads read at once on distinct banks).
    __shared__ uint4 wscale[WG_THREADS / 32][16][3];
    static_assert(S_ >= 3, "the ring keeps one chunk in flight beside the one computed");
    constexpr int STAGE = wg_stage_bytes<BN>();
    constexpr int XOFF = 0, WOFF = BN * 256, SOFF = WOFF + WG_W_BYTES;
    constexpr int SB = FMT == FMT_NVFP4 ? 8 : 4;  // scale bytes per row and chunk
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int kb = k >> 1;
    const int bpr = FMT == FMT_NVFP4 ? (k >> 4) : (k >> 5);
    const int nch = k >> 7;
    const int S = gridDim.y, split = blockIdx.y;
    const int cbeg = (int)((long long)split * nch / S);
    const int iters = (int)((long long)(split + 1) * nch / S) - cbeg;
    const int row0 = blockIdx.x * WG_ROWS, tok0 = blockIdx.z * BN;

    // The dynamic shared memory's start rounded up to 1024 bytes (the swizzle's period;
    // wgmma.rs asks for 1 KiB more than the stages need).
    const u32 raw = smem_addr(wg_smem_raw);
    const u32 base = (raw + 1023) & ~1023u;
    u8* const smem = wg_smem_raw + (base - raw);

    // This thread's copies per stage, planned once (sources advance by one chunk per issue).
    // Activations: piece q = tid + 256 i of BN x 16 (slot q >> 4, 16-byte piece q & 15).
    constexpr int XP = BN * 16 / WG_THREADS;
    const u16* xsrc[XP];
    u32 xdst[XP];
    bool xval[XP];
#pragma unroll
    for (int i = 0; i < XP; i++) {
        const int q = tid + WG_THREADS * i, slot = q >> 4, c = q & 15;
        xval[i] = tok0 + slot < m;
        xsrc[i] = x + (size_t)(xval[i] ? tok0 + slot : 0) * k + (size_t)cbeg * 128 + c * 8;
        xdst[i] = XOFF + (c >> 3) * (BN * 128) + slot * 128 + (((c & 7) ^ (slot & 7)) << 4);
    }
    // Weights: pieces tid and tid + 256 of 512 (row p >> 2, unit p & 3).
    const u8* wsrc[2];
    u32 wdst[2];
    bool wval[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int p = tid + WG_THREADS * j, lr = p >> 2, u = p & 3;
        wval[j] = row0 + lr < n;
        wsrc[j] = wp + (size_t)(wval[j] ? row0 + lr : 0) * kb + (size_t)cbeg * 64 + u * 16;
        wdst[j] = WOFF + lr * 64 + ((u ^ ((lr >> 1) & 3)) << 4);
    }
    // Scale bytes: row tid (threads < 128).
    const bool sval = tid < WG_ROWS && row0 + tid < n;
    const u8* ssrc = ws + (size_t)(sval ? row0 + tid : 0) * bpr + (size_t)cbeg * SB;

    const auto issue_w = [&](int it, u32 so) {
        if (it >= iters) return;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            cp_async16_to(base + so + wdst[j], wsrc[j], wval[j]);
            wsrc[j] += 64;
        }
        if (tid < WG_ROWS) cp_async_small<SB>(base + so + SOFF + tid * 8, ssrc, sval);
        ssrc += SB;
    };
    const auto issue_x = [&](int it, u32 so) {
        if (it >= iters) return;
#pragma unroll
        for (int i = 0; i < XP; i++) {
            cp_async16_to(base + so + xdst[i], xsrc[i], xval[i]);
            xsrc[i] += 128;
        }
    };

    // Weights never depend on the kernel before this one: the first stages' weights go out
    // before the PDL wait, the activations after it.
    slut[tid] = lut[tid];  // 256 threads, 256 entries
#pragma unroll
    for (int s = 0; s < S_ - 1; s++) {
        issue_w(s, s * STAGE);
        cp_async_commit();
    }
    pdl_enter();
#pragma unroll
    for (int s = 0; s < S_ - 1; s++) {
        issue_x(s, s * STAGE);
        cp_async_commit();
    }

    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++) acc[i] = 0.f;
    // Rows of this lane: local rows lr0 and lr0 + 8.
    const int lr0 = (warp >> 2) * 64 + (warp & 3) * 16 + g;
    const u32 ra = t == 0 ? 0 : t == 1 ? 6 : t == 2 ? 3 : 28;
    const u32 rb = t == 0 ? 0 : t == 1 ? 6 : t == 2 ? 2 : 1;
    // Byte offsets of the lane's two rows' units in a stage (unit u at u ^ sw).
    const u32 w0 = WOFF + lr0 * 64, w1 = WOFF + (lr0 + 8) * 64;
    const u32 sw0 = (lr0 >> 1) & 3, sw1 = ((lr0 + 8) >> 1) & 3;

    // The A fragments of a whole chunk (8 k16 steps x 4 registers) from the stage at byte
    // offset `so`: decoded in one go, so that the chunk's 8 products issue back to back.
    const auto decode = [&](u32 so, u32 (&a)[8][4]) {
        const u8* st = smem + so;
#ifdef WG_DIAG_NODECODE
        // Diagnostic build (MIMO_NVRTC_FLAGS=-DWG_DIAG_NODECODE): fixed A fragments, no weight
        // or scale reads, to time the ring and the products alone. Wrong results.
#pragma unroll
        for (int s = 0; s < 8; s++)
#pragma unroll
            for (int r = 0; r < 4; r++) a[s][r] = 0x3F803F80u ^ (u32)(s + r) ^ so;
        return;
#endif
        // The warp's scale multipliers, each looked up once: lane L takes row L / 2 of the
        // warp's 16, steps 4 (L % 2) .. + 3 (the four lanes of a quad would otherwise each look
        // up the same 16).
        {
            const int r = lane >> 1, hh = lane & 1;
            const u8* sp = st + SOFF + ((warp >> 2) * 64 + (warp & 3) * 16 + r) * 8;
            const u32 sb = FMT == FMT_NVFP4 ? *(const u32*)(sp + 4 * hh)
                                            : (u32) * (const u16*)(sp + 2 * hh);
            u32 mv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const u32 m = slut[(sb >> (8 * (FMT == FMT_NVFP4 ? i : i >> 1))) & 0xFF];
                mv[i] = m | (m << 16);
            }
            wscale[warp][r][hh] = make_uint4(mv[0], mv[1], mv[2], mv[3]);
        }
        __syncwarp();
        const uint4 sg[2] = {wscale[warp][g][0], wscale[warp][g][1]};
        const uint4 sh8[2] = {wscale[warp][g + 8][0], wscale[warp][g + 8][1]};
#pragma unroll
        for (int u = 0; u < 4; u++) {
            // Unit u of both rows: words 4u .. 4u + 3 = k16 steps 2u and 2u + 1.
            const uint4 q0 = *(const uint4*)(st + w0 + ((u ^ sw0) << 4));
            const uint4 q1 = *(const uint4*)(st + w1 + ((u ^ sw1) << 4));
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int s = 2 * u + h;
                const uint4 v0 = sg[s >> 2], v1 = sh8[s >> 2];
                const int c = s & 3;
                const u32 s0 = c == 0 ? v0.x : c == 1 ? v0.y : c == 2 ? v0.z : v0.w;
                const u32 s1 = c == 0 ? v1.x : c == 1 ? v1.y : c == 2 ? v1.z : v1.w;
                const u32 lo0 = h == 0 ? q0.x : q0.z, hi0 = h == 0 ? q0.y : q0.w;
                const u32 lo1 = h == 0 ? q1.x : q1.z, hi1 = h == 0 ? q1.y : q1.w;
                a[s][0] = bf16x2_mul(e2m1_pair(lo0, ra, rb), s0);
                a[s][1] = bf16x2_mul(e2m1_pair(lo1, ra, rb), s1);
                a[s][2] = bf16x2_mul(e2m1_pair(hi0, ra, rb), s0);
                a[s][3] = bf16x2_mul(e2m1_pair(hi1, ra, rb), s1);
            }
        }
    };

    // The ring: the products of chunk j (decoded beforehand into register set j % 2) go out as
    // 8 asynchronous wgmma; while they run, the warps wait for chunk j + 1, refill the buffer of
    // chunk j - 1 and decode chunk j + 1 into the other register set. A set is rewritten only
    // once the products that read it are done (wait_group 1: all but the newest group), as
    // wgmma requires.
    u32 aset[2][8][4];
    u32 rd = 0, wr = (S_ - 1) * STAGE;
    const auto step = [](u32 b) { return b == (S_ - 1) * STAGE ? 0u : b + STAGE; };
    const auto products = [&](const u32 (&a)[8][4], u32 so) {
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 8; s++) {
            const u32 xb = base + so + XOFF + (s >> 2) * (BN * 128) + (s & 3) * 32;
#ifndef WG_DIAG_NOMMA  // diagnostic build: no products (wrong results), to time the rest
            wgmma_bf16(acc, a[s][0], a[s][1], a[s][2], a[s][3], wg_desc(xb));
#else
            acc[s] += __uint_as_float(a[s][0] ^ a[s][1] ^ a[s][2] ^ a[s][3] ^ xb);
#endif
        }
        wgmma_commit();
    };
    // After chunk j's products went out: chunk j + 1 landed for everyone, chunk j - 1's
    // products done everywhere (its register set and buffer are free), chunk j + S - 1 issued.
    const auto advance = [&](int j) {
        cp_async_wait<S_ - 3>();
        fence_proxy_async();
        wgmma_wait<1>();
        __syncthreads();
        issue_w(j + S_ - 1, wr);
        issue_x(j + S_ - 1, wr);
        cp_async_commit();
        wr = step(wr);
    };
    cp_async_wait<S_ - 2>();  // chunk 0
    fence_proxy_async();
    __syncthreads();
    if (iters > 0) decode(rd, aset[0]);
    for (int it = 0; it < iters; it += 2) {
        products(aset[0], rd);
        advance(it);
        rd = step(rd);
        if (it + 1 >= iters) break;
        decode(rd, aset[1]);
        products(aset[1], rd);
        advance(it + 1);
        rd = step(rd);
        if (it + 2 < iters) decode(rd, aset[0]);
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
    __syncthreads();  // the stage buffers become the f32 tile [token][local row]

    float* tile = (float*)smem;
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
        const int c = 8 * j + 2 * t;
        tile[c * WG_TILE_STRIDE + lr0] = acc[4 * j];
        tile[(c + 1) * WG_TILE_STRIDE + lr0] = acc[4 * j + 1];
        tile[c * WG_TILE_STRIDE + lr0 + 8] = acc[4 * j + 2];
        tile[(c + 1) * WG_TILE_STRIDE + lr0 + 8] = acc[4 * j + 3];
    }
    __syncthreads();
    constexpr int TILE = WG_ROWS * BN;
    if (S > 1) {
        const size_t cell = (size_t)blockIdx.z * gridDim.x + blockIdx.x;
        const size_t cells = (size_t)gridDim.z * gridDim.x;
        const auto at = [&](int e) -> float4& {
            return *(float4*)(tile + (e / (WG_ROWS / 4)) * WG_TILE_STRIDE + (e % (WG_ROWS / 4)) * 4);
        };
        if (!split_combine<float4, WG_MAX_SPLITS>(parts, tickets, S, split, cell, cells, TILE, at))
            return;
    }
    // post = 2^A undoes the 2^-A left in the scale multipliers (weights.rs): exact.
    const float inv_scale = (1.0f / gscale[0]) * post;
    for (int e = tid; e < TILE; e += WG_THREADS) {
        const int tk = e / WG_ROWS, lr = e - tk * WG_ROWS;
        if (tok0 + tk >= m || row0 + lr >= n) continue;
        y[(size_t)(tok0 + tk) * n + row0 + lr] =
            f32_to_bf16(tile[tk * WG_TILE_STRIDE + lr] * inv_scale);
    }
#endif
}

#define WG_KERNEL(NAME, FMT, BN, ST)                                                            \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) NAME(                          \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int m, \
        int n, int k, float post, float* parts, unsigned int* tickets) {                         \
        fp4_wg_body<FMT, BN, ST>(wp, ws, gs, lut, x, y, m, n, k, post, parts, tickets);         \
    }

// fp4_wg_{nv,mx}_n{BN}_s{ST}: y = x W^T with BN tokens per block and an ST-stage ring (wgmma.rs
// WGMMA_CONFIGS: the deeper rings hold more weight bytes in flight, the shallower ones let two
// blocks share an SM).
WG_KERNEL(fp4_wg_nv_n16_s8, FMT_NVFP4, 16, 8)
WG_KERNEL(fp4_wg_mx_n16_s8, FMT_MXFP4, 16, 8)
WG_KERNEL(fp4_wg_nv_n16_s4, FMT_NVFP4, 16, 4)
WG_KERNEL(fp4_wg_mx_n16_s4, FMT_MXFP4, 16, 4)
WG_KERNEL(fp4_wg_nv_n32_s8, FMT_NVFP4, 32, 8)
WG_KERNEL(fp4_wg_mx_n32_s8, FMT_MXFP4, 32, 8)
WG_KERNEL(fp4_wg_nv_n32_s4, FMT_NVFP4, 32, 4)
WG_KERNEL(fp4_wg_mx_n32_s4, FMT_MXFP4, 32, 4)
WG_KERNEL(fp4_wg_nv_n64_s6, FMT_NVFP4, 64, 6)
WG_KERNEL(fp4_wg_mx_n64_s6, FMT_MXFP4, 64, 6)
WG_KERNEL(fp4_wg_nv_n64_s4, FMT_NVFP4, 64, 4)
WG_KERNEL(fp4_wg_mx_n64_s4, FMT_MXFP4, 64, 4)
WG_KERNEL(fp4_wg_nv_n128_s4, FMT_NVFP4, 128, 4)
WG_KERNEL(fp4_wg_mx_n128_s4, FMT_MXFP4, 128, 4)
WG_KERNEL(fp4_wg_nv_n128_s3, FMT_NVFP4, 128, 3)
WG_KERNEL(fp4_wg_mx_n128_s3, FMT_MXFP4, 128, 3)
WG_KERNEL(fp4_wg_nv_n256_s3, FMT_NVFP4, 256, 3)
WG_KERNEL(fp4_wg_mx_n256_s3, FMT_MXFP4, 256, 3)
