// Persistent stage-chain probe (crates/kernels/src/cuda/probe/, `StageChain`;
// `mimo-bench-kernels --layer-probe`).
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
// of stage s-1's output (stage 0 reads the bf16 row x0), so every stage waits for the whole
// previous stage. A gated stage stores silu(gate) * up (swiglu_bf16) of its tile pairs. Outputs
// are 32-bit words, the bf16 value in the low half and a tag in the high half, unique to the
// (launch, stage) pair. Two ways to wait (A/B): a grid-wide barrier on a monotone arrival count,
// then one load of the input; or, with SP_FLAGGED, no barrier: each thread loads its share of
// the input until every word carries the stage's tag (data and flag in one word, as NCCL's LL
// protocol does), one L2 round trip instead of two.
//
// Block b owns a contiguous run of 16-row tiles of every product stage (pairs of tiles for a
// gated stage). The weights are in the probe's tile-major layout: for tile T and 128-element
// chunk c, 1024 bytes of packed words (row r of the tile at r * 64) then, in a separate array,
// 128 scale bytes (row r at r * 8), so a block's tiles are one contiguous range and lane
// (g, t)'s 16-byte pieces of rows g and g + 8 are conflict-free in shared memory. Thread 0
// copies them with two bulk copies completing on the stage's mbarrier (stage parity), at the
// top of the stage before (prefetch), or, for a `late` stage (an MoE expert stage, whose rows
// are known only once its input is), once its own input starts to arrive.
//
// Stage table: 8 u64 per stage: packed, scales, out (u32 words), n | k << 32, gated | late << 1
// | kind << 2, f32 bits of post (2^A / global scale), weight smem offset | scale smem offset << 32,
// context | kv heads << 32 (attention kinds).
//
// Attention (decode, one token, head_dim 128, keys in splits of 64) as two more stage kinds:
// SP_ATT_SPLITS reads q (n = heads * 128 elements of the previous output) and, per unit (split z,
// head h; unit z * heads + h), the split's 64 keys and values of h's KV head, copied into shared
// memory like weights (packed = K cache, scales = V cache, [kv heads][context][128] bf16: known
// before q is, so never late); it stores (max, sum, out[128]) of its scores as 130 tagged 64-bit
// words (tag << 32 | f32 bits). SP_ATT_COMBINE (packed = those partials) merges the splits of
// each 32-element slice of a head, one warp per slice, into the bf16 attention output (n words).
// Shared memory: two mbarriers at 0, the cross-warp sums at SP_RED_OFF, the input row at
// SP_X_OFF (then 8 zero elements: the mma operand of the 7 empty token slots), then the stages'
// weights at the host's offsets (probe/stages.rs `place_stages`: stage s and s + 1 never overlap).
// stamps[((s * G) + b) * 4 + i]: %globaltimer at the stage's top, input in shared memory,
// weights in shared memory, output stored (thread 0 of each block).

#define SP_MAX_WARPS 16  // stage_probe: 8 warps; stage_probe_w16: 16 (at most 128 registers)
#define SP_MAX_TILES 8
#define SP_RED_OFF 128
#define SP_X_OFF (SP_RED_OFF + SP_MAX_WARPS * SP_MAX_TILES * 16 * 4)

#define SP_SKIP_COMPUTE 1  // no decode / mma / store (the streams and barriers alone)
#define SP_SKIP_COPY 2     // no weight copies (the chains alone; results are garbage)
#define SP_ALL_LATE 4      // every stage after the first copied only after its own barrier
#define SP_NO_LATE 8       // the late flags ignored: every stage copied during the previous one
#define SP_FLAGGED 16      // no grid barrier: inputs polled until their words carry the tag
#define SP_ROLLED 32       // the tiles one after another (sp_compute_rolled), a small loop body

#define SP_PRODUCT 0
#define SP_ATT_SPLITS 1
#define SP_ATT_COMBINE 2
#define SP_HEAD 128   // head_dim of the attention kinds
#define SP_SPLIT 64   // keys per split
#define SP_PART 130   // words of one split's partial: max, sum, out[128]

struct SpStage {
    const u8* w;
    const u8* s;
    u32* out;
    int n, k, gated, late, kind, ctx, kvh;
    float post;
    u32 woff, soff;
};

__device__ __forceinline__ SpStage sp_stage(const u64* __restrict__ tab, int s) {
    const u64* d = tab + 8 * s;
    SpStage st;
    st.w = (const u8*)d[0];
    st.s = (const u8*)d[1];
    st.out = (u32*)d[2];
    st.n = (int)(d[3] & 0xffffffffu);
    st.k = (int)(d[3] >> 32);
    st.gated = (int)(d[4] & 1);
    st.late = (int)((d[4] >> 1) & 1);
    st.kind = (int)((d[4] >> 2) & 3);
    st.ctx = (int)(d[7] & 0xffffffffu);
    st.kvh = (int)(d[7] >> 32);
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

// Units [u0, u1) of block b of G for the attention kinds (splits: split-major (z, head);
// combine: 32-element slices of the heads).
__device__ __forceinline__ void sp_units(const SpStage& st, int b, int G, int& u0, int& u1) {
    const int heads = st.n / SP_HEAD;
    const int units = st.kind == SP_ATT_SPLITS ? heads * (st.ctx / SP_SPLIT) : heads * 4;
    u0 = (int)((long long)b * units / G);
    u1 = (int)((long long)(b + 1) * units / G);
}

// Thread 0: block b's tiles of stage st (or its units' keys and values) into shared memory,
// completing on `bar`.
__device__ __forceinline__ void sp_issue(const SpStage& st, u32 sbase, u32 bar, int b, int G) {
    if (st.kind != SP_PRODUCT) {
        int u0, u1;
        sp_units(st, b, G, u0, u1);
        const int n = st.kind == SP_ATT_SPLITS ? u1 - u0 : 0;
        const u32 rows = SP_SPLIT * SP_HEAD * 2;  // bytes of one split's keys (or values)
        mbar_expect_tx(bar, 2u * rows * (u32)n);
        const int heads = st.n / SP_HEAD;
        for (int j = 0; j < n; j++) {
            const int u = u0 + j, z = u / heads, h = u % heads, kv = h / (heads / st.kvh);
            const size_t off = ((size_t)kv * st.ctx + (size_t)z * SP_SPLIT) * SP_HEAD * 2;
            sp_bulk(sbase + st.woff + 2u * rows * j, st.w + off, rows, bar);
            sp_bulk(sbase + st.woff + 2u * rows * j + rows, st.s + off, rows, bar);
        }
        return;
    }
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

// Four words of another block's stores, read at L2 on every call. The polling loop needs an
// asm the compiler keeps: __ldcg's asm is not volatile, so a loop around it may be hoisted, or
// removed as a loop without side effects, leaving one (stale) read.
__device__ __forceinline__ uint4 sp_load_relaxed(const u32* p) {
    uint4 v;
    asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
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

// Two chunks c0, c1 of a one-tile block in one compute_chunks call: the chunks as two "tiles"
// and their input pieces as two token slots (slots 0 and 1; the rest read zeros), so that each
// step issues four independent mma (compute_chunks issues its mma in program order, and the
// decode kernels' asm is volatile: two calls in a row would chain). acc[0][0] gets chunk c0,
// acc[1][1] chunk c1; the cross products land in acc[0][1] and acc[1][0], never read. c1 < 0:
// no second chunk (its weights read as zeros).
__device__ __forceinline__ void sp_chunk_pair(const u8* W, const u8* Sc, int C, int c0, int c1,
                                              const u16* xs, const u16* lut,
                                              float (&acc)[2][2][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    WeightRegs<2, 1> r;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int c = i == 0 ? c0 : c1;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (c >= 0) {
                r.w[0][i][h] = *(const uint4*)(W + (size_t)c * 1024 + (g + 8 * h) * 64 + 16 * t);
                r.sc[0][i][h] = *(const u16*)(Sc + (size_t)c * 128 + (g + 8 * h) * 8 + 2 * t);
            } else {
                r.w[0][i][h] = make_uint4(0, 0, 0, 0);
                r.sc[0][i][h] = 0;
            }
        }
    }
    int xo[8];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        xo[q] = g == 0 ? c0 * 128 + 32 * t + 8 * q : C * 128;
        xo[4 + q] = g == 0 && c1 >= 0 ? c1 * 128 + 32 * t + 8 * q : C * 128;
    }
    const u16* const xptr[2] = {xs, xs};
    compute_chunks<FMT_NVFP4, 2, 2, 1, true, 1>(r, xptr, 0, C * 128, lut, acc, xs, xo);
}

// The warp's chunks (warp, warp + NW, ...) of MT tiles (NW warps); the token-0 sums go to
// red[warp][row]. With MT >= 2 each step's mma are already MT independent chains; one tile
// takes its chunks in pairs (sp_chunk_pair).
template <int NW, int MT>
__device__ __forceinline__ void sp_compute(const u8* W, const u8* Sc, int C, const u16* xs,
                                           const u16* lut, float* red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float s0[MT], s8[MT];
    if (MT == 1) {
        float acc[2][2][4];
        zero_acc<2, 2>(acc);
        for (int c = warp; c < C; c += 2 * NW)
            sp_chunk_pair(W, Sc, C, c, c + NW < C ? c + NW : -1, xs, lut, acc);
        s0[0] = acc[0][0][0] + acc[1][1][0];
        s8[0] = acc[0][0][2] + acc[1][1][2];
    } else {
        float acc[MT][1][4];
        zero_acc<MT, 1>(acc);
        for (int c = warp; c < C; c += NW) sp_chunk<MT>(W, Sc, C, c, xs, lut, acc);
#pragma unroll
        for (int i = 0; i < MT; i++) {
            s0[i] = acc[i][0][0];
            s8[i] = acc[i][0][2];
        }
    }
    if (t == 0) {
#pragma unroll
        for (int i = 0; i < MT; i++) {
            red[(warp * SP_MAX_TILES + i) * 16 + g] = s0[i];
            red[(warp * SP_MAX_TILES + i) * 16 + g + 8] = s8[i];
        }
    }
}

// sp_compute with the block's nt tiles taken one after another in a loop that is not unrolled,
// each tile's chunks in pairs (sp_chunk_pair): a loop body of one tile-chunk pair instead of
// MT unrolled tiles (six in gate/up: ~660 instructions per chunk), for the instruction fetch
// (ncu: "no instruction" stalls). Sums per tile in another order than sp_compute's.
template <int NW>
__device__ __forceinline__ void sp_compute_rolled(const u8* W, const u8* Sc, int C, int nt,
                                                  const u16* xs, const u16* lut, float* red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 1
    for (int i = 0; i < nt; i++) {
        float acc[2][2][4];
        zero_acc<2, 2>(acc);
        const u8* Wi = W + (size_t)i * C * 1024;
        const u8* Si = Sc + (size_t)i * C * 128;
#pragma unroll 1
        for (int c = warp; c < C; c += 2 * NW)
            sp_chunk_pair(Wi, Si, C, c, c + NW < C ? c + NW : -1, xs, lut, acc);
        if (t == 0) {
            red[(warp * SP_MAX_TILES + i) * 16 + g] = acc[0][0][0] + acc[1][1][0];
            red[(warp * SP_MAX_TILES + i) * 16 + g + 8] = acc[0][0][2] + acc[1][1][2];
        }
    }
}

// A 64-bit word of another block's stores, read at L2 on every call (see sp_load_relaxed).
__device__ __forceinline__ u64 sp_load_relaxed64(const u64* p) {
    u64 v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// A polled 64-bit partial word: its f32 once the tag is `want` (or at once without flags).
__device__ __forceinline__ float sp_poll_f32(const u64* p, u32 want, bool flagged) {
    u64 v;
    do {
        v = sp_load_relaxed64(p);
    } while (flagged && (u32)(v >> 32) != want);
    return __uint_as_float((u32)v);
}

__device__ __forceinline__ u64 sp_tagged(u32 tag, float v) {
    return ((u64)tag << 32) | __float_as_uint(v);
}

// SP_ATT_SPLITS: the block's units, one after another; q (bf16) in xs, keys and values of unit j
// at woff + j * 32 KiB. Scores by warps (a key per warp at a time, 4 elements per lane), the
// softmax's max and sum by warp 0, P V by threads 0..127 (one output element each).
template <int NW>
__device__ __forceinline__ void sp_attn_splits(const SpStage& st, const u8* smem, int b, int G,
                                               const u16* xs, float* sc, u32 tag) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int heads = st.n / SP_HEAD;
    int u0, u1;
    sp_units(st, b, G, u0, u1);
    u64* part = (u64*)st.out;
    const float scale = rsqrtf((float)SP_HEAD);
    for (int j = 0; j < u1 - u0; j++) {
        const int u = u0 + j, h = u % heads;
        const u16* K = (const u16*)(smem + st.woff + 2 * SP_SPLIT * SP_HEAD * 2 * j);
        const u16* V = K + SP_SPLIT * SP_HEAD;
        const uint2 qv = *(const uint2*)(xs + h * SP_HEAD + 4 * lane);
        for (int key = warp; key < SP_SPLIT; key += NW) {
            const uint2 kv = *(const uint2*)(K + key * SP_HEAD + 4 * lane);
            float d = bf16_to_f32(qv.x & 0xFFFF) * bf16_to_f32(kv.x & 0xFFFF);
            d = fmaf(bf16_to_f32(qv.x >> 16), bf16_to_f32(kv.x >> 16), d);
            d = fmaf(bf16_to_f32(qv.y & 0xFFFF), bf16_to_f32(kv.y & 0xFFFF), d);
            d = fmaf(bf16_to_f32(qv.y >> 16), bf16_to_f32(kv.y >> 16), d);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            if (lane == 0) sc[key] = d * scale;
        }
        __syncthreads();
        if (warp == 0) {
            const float a = sc[lane], c = sc[lane + 32];
            float m = fmaxf(a, c);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            const float pa = expf(a - m), pc = expf(c - m);
            sc[lane] = pa;
            sc[lane + 32] = pc;
            float l = pa + pc;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
            if (lane == 0) {
                sc[SP_SPLIT] = m;
                sc[SP_SPLIT + 1] = l;
            }
        }
        __syncthreads();
        // P V: keys 0..31 by threads 0..127, keys 32..63 by threads 128..255 (half the chain),
        // the second half's sums added through shared memory.
        float o = 0.f;
        if (tid < 2 * SP_HEAD) {
            const int k0 = (tid / SP_HEAD) * (SP_SPLIT / 2), dd = tid % SP_HEAD;
#pragma unroll 8
            for (int key = k0; key < k0 + SP_SPLIT / 2; key++)
                o = fmaf(sc[key], bf16_to_f32(V[key * SP_HEAD + dd]), o);
            if (tid >= SP_HEAD) sc[SP_SPLIT + 2 + dd] = o;
        }
        __syncthreads();
        if (tid < SP_HEAD)
            part[(size_t)u * SP_PART + 2 + tid] = sp_tagged(tag, o + sc[SP_SPLIT + 2 + tid]);
        if (tid == 0) {
            part[(size_t)u * SP_PART] = sp_tagged(tag, sc[SP_SPLIT]);
            part[(size_t)u * SP_PART + 1] = sp_tagged(tag, sc[SP_SPLIT + 1]);
        }
        __syncthreads();
    }
}

// SP_ATT_COMBINE: one warp per 32-element slice of a head: the splits' max and sum (lane z),
// then out = sum_z e^(m_z - M) o_z / sum_z e^(m_z - M) l_z in split order.
template <int NW>
__device__ __forceinline__ void sp_attn_combine(const SpStage& st, int b, int G, u32 want,
                                                bool flagged, u32 tag16) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int heads = st.n / SP_HEAD, ns = st.ctx / SP_SPLIT;
    const u64* part = (const u64*)st.w;
    int s0, s1;
    sp_units(st, b, G, s0, s1);
    for (int sl = s0 + warp; sl < s1; sl += NW) {
        const int h = sl >> 2, d = (sl & 3) * 32 + lane;
        float mz = NEG_INF, lz = 0.f;
        if (lane < ns) {
            const u64* p = part + (size_t)(lane * heads + h) * SP_PART;
            mz = sp_poll_f32(p, want, flagged);
            lz = sp_poll_f32(p + 1, want, flagged);
        }
        float M = mz;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
        const float wz = lane < ns ? expf(mz - M) : 0.f;
        float den = wz * lz;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
        // Every split's element d at once (one L2 round trip, not ns in a row), again while a
        // tag is missing.
        u64 o[32];
        bool ready;
        do {
            ready = true;
#pragma unroll 8
            for (int z = 0; z < ns; z++) {
                o[z] = sp_load_relaxed64(part + (size_t)(z * heads + h) * SP_PART + 2 + d);
            }
            for (int z = 0; z < ns; z++) ready = ready && (u32)(o[z] >> 32) == want;
        } while (flagged && !ready);
        float acc = 0.f;
        for (int z = 0; z < ns; z++)
            acc = fmaf(__shfl_sync(0xffffffffu, wz, z), __uint_as_float((u32)o[z]), acc);
        st.out[h * SP_HEAD + d] = tag16 | f32_to_bf16(acc / den);
    }
}

// Stage s's tag in launch `epoch` (never 0, the tag of a zeroed buffer).
__device__ __forceinline__ u32 sp_tag(u32 epoch, int S, int s) {
    return (u32)(((u64)epoch * S + s) % 65535u) + 1u;
}

// Sum of row r (local, tile r / 16) over the NW warps, in warp order, times post.
template <int NW>
__device__ __forceinline__ float sp_row(const float* red, int r, float post) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < NW; w++) v += red[w * SP_MAX_TILES * 16 + r];
    return v * post;
}

template <int NW>
__device__ __forceinline__ void stage_probe_body(const u64* __restrict__ tab, int S,
                                                 const u16* __restrict__ x0,
                                                 const u16* __restrict__ lut,
                                                 unsigned long long* bar_count,
                                                 unsigned long long base, u32 epoch, int flags,
                                                 u64* __restrict__ stamps) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(1024) u8 sp_smem[];
    __shared__ u16 slut[256];
    const u32 sbase = smem_addr(sp_smem);
    float* red = (float*)(sp_smem + SP_RED_OFF);
    u16* xs = (u16*)(sp_smem + SP_X_OFF);
    const int tid = threadIdx.x, b = blockIdx.x, G = gridDim.x;
    const bool copy = !(flags & SP_SKIP_COPY), compute = !(flags & SP_SKIP_COMPUTE);
    const bool flagged = flags & SP_FLAGGED;
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
        if (s > 0 && !flagged) {
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
        }
        // A late stage's weights (and then its successor's) are asked for by thread 0 once its
        // first piece of the input has arrived (after the barrier, or carrying the tag), or at
        // once by a stage without an input row (the attention combine polls its own).
        bool late_pending = tid == 0 && copy && late;
        auto issue_late = [&]() {
            sp_issue(st, sbase, bar, b, G);
            if (next && !next_late) sp_issue(nx, sbase, nbar, b, G);
            late_pending = false;
        };
        const u32 want = sp_tag(epoch, S, s - 1);
        if (s == 0) {
            for (int i = tid; i < st.k / 8; i += blockDim.x)
                *(uint4*)(xs + 8 * i) = __ldg((const uint4*)(x0 + 8 * i));
        } else {
            // The input row (another block's stores: read through L2), 4 words per load.
            const u32* src = sp_stage(tab, s - 1).out;
            for (int i = tid; i < st.k / 4; i += blockDim.x) {
                uint4 v;
                do {
                    v = sp_load_relaxed(src + 4 * i);
                } while (flagged && ((v.x >> 16) != want || (v.y >> 16) != want ||
                                     (v.z >> 16) != want || (v.w >> 16) != want));
                *(uint2*)(xs + 4 * i) = make_uint2((v.x & 0xFFFFu) | (v.y << 16),
                                                   (v.z & 0xFFFFu) | (v.w << 16));
                if (late_pending) issue_late();
            }
            if (late_pending) issue_late();
        }
        if (tid == 0) *(uint4*)(xs + st.k) = make_uint4(0, 0, 0, 0);
        __syncthreads();
        const u64 t_in = sp_now();
        if (copy) mbar_wait(bar, (u32)(s >> 1) & 1);
        const u64 t_w = sp_now();
        int t0, t1;
        sp_tiles(st, b, G, t0, t1);
        const int nt = st.kind == SP_PRODUCT ? t1 - t0 : 0, C = st.k >> 7;
        const u32 tag = sp_tag(epoch, S, s) << 16;
        if (st.kind == SP_ATT_SPLITS) {
            if (compute) {
                sp_attn_splits<NW>(st, sp_smem, b, G, xs, red, tag >> 16);
            } else {
                int u0, u1;
                sp_units(st, b, G, u0, u1);
                for (int i = tid; i < (u1 - u0) * SP_PART; i += blockDim.x)
                    ((u64*)st.out)[(size_t)u0 * SP_PART + i] = sp_tagged(tag >> 16, 0.f);
            }
        } else if (st.kind == SP_ATT_COMBINE) {
            if (compute) {
                sp_attn_combine<NW>(st, b, G, want, flagged, tag);
            } else {
                int u0, u1;
                sp_units(st, b, G, u0, u1);
                for (int i = tid; i < (u1 - u0) * 32; i += blockDim.x) st.out[u0 * 32 + i] = tag;
            }
        }
        if (!compute && nt > 0) {
            // Zeros with the tag, so that flagged waits end.
            const int outs = st.gated ? nt * 8 : nt * 16;
            if (tid < outs) st.out[(st.gated ? t0 * 8 : t0 * 16) + tid] = tag;
        }
        if (compute && nt > 0) {
            const u8* W = sp_smem + st.woff;
            const u8* Sc = sp_smem + st.soff;
            if (flags & SP_ROLLED) {
                sp_compute_rolled<NW>(W, Sc, C, nt, xs, slut, red);
            } else {
                switch (nt) {
                    case 1: sp_compute<NW, 1>(W, Sc, C, xs, slut, red); break;
                    case 2: sp_compute<NW, 2>(W, Sc, C, xs, slut, red); break;
                    case 3: sp_compute<NW, 3>(W, Sc, C, xs, slut, red); break;
                    case 4: sp_compute<NW, 4>(W, Sc, C, xs, slut, red); break;
                    case 5: sp_compute<NW, 5>(W, Sc, C, xs, slut, red); break;
                    case 6: sp_compute<NW, 6>(W, Sc, C, xs, slut, red); break;
                    case 7: sp_compute<NW, 7>(W, Sc, C, xs, slut, red); break;
                    default: sp_compute<NW, 8>(W, Sc, C, xs, slut, red); break;
                }
            }
            __syncthreads();
            if (st.gated) {
                if (tid < nt * 8) {
                    const int j = tid >> 4, rr = tid & 15;
                    const float gate = sp_row<NW>(red, 32 * j + rr, st.post);
                    const float up = sp_row<NW>(red, 32 * j + 16 + rr, st.post);
                    st.out[(t0 / 2 + j) * 16 + rr] = tag | swiglu_bf16(gate, up);
                }
            } else if (tid < nt * 16) {
                st.out[t0 * 16 + tid] = tag | f32_to_bf16(sp_row<NW>(red, tid, st.post));
            }
        }
        // Every thread is done with this stage's shared memory and has stored its outputs.
        __syncthreads();
        if (tid == 0) {
            stamps[((size_t)s * G + b) * 4 + 0] = t_top;
            stamps[((size_t)s * G + b) * 4 + 1] = t_in;
            stamps[((size_t)s * G + b) * 4 + 2] = t_w;
            stamps[((size_t)s * G + b) * 4 + 3] = sp_now();
            if (s + 1 < S && !flagged) {
                __threadfence();
                asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(bar_count) : "memory");
            }
        }
    }
#endif
}

#define SP_KERNEL(NAME, NW)                                                                       \
    extern "C" __global__ void __launch_bounds__(NW * 32, 1)                                      \
        NAME(const u64* __restrict__ tab, int S, const u16* __restrict__ x0,                      \
             const u16* __restrict__ lut, unsigned long long* bar_count, unsigned long long base, \
             u32 epoch, int flags, u64* __restrict__ stamps) {                                    \
        stage_probe_body<NW>(tab, S, x0, lut, bar_count, base, epoch, flags, stamps);             \
    }
SP_KERNEL(stage_probe, 8)
SP_KERNEL(stage_probe_w16, 16)
