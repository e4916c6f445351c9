// FP4 (NVFP4 / MXFP4) weight x BF16 activation kernels for Hopper, compiled at run time by NVRTC.
//
// No CUDA headers are included: bf16 values travel as raw 16-bit patterns and the few
// instructions we need (mma.sync, fma.bf16x2, cvt.rn.bf16.f32) are written as inline PTX, so
// NVRTC needs no include path.
//
// Layouts (see docs/DESIGN.md, `Fp4Matrix`):
//   packed  [E][N][K/2] u8, element 2i in the LOW nibble of byte i, 2i+1 in the HIGH nibble
//   scales  [E][N][K/B] u8, B = 16 (NVFP4, E4M3) or 32 (MXFP4, E8M0)
//   gscale  [E] f32 (NVFP4: w = fp4 * e4m3(scale) / gscale; MXFP4: 1.0)
//   x       [rows][K] bf16, y [rows][N] bf16, row-major.
// K must be a multiple of 32 (16-byte aligned weight rows); N and M are arbitrary.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define FMT_NVFP4 0
#define FMT_MXFP4 1

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// a * b on two packed bf16 lanes (fma with -0 keeps the sign of an exact zero product).
__device__ __forceinline__ u32 bf16x2_mul(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}

// Magnitudes of E2M1 codes 0..7 as bf16 (0, .5, 1, 1.5, 2, 3, 4, 6), split into low and high
// bytes so that two PRMT instructions act as an 8-entry lookup table for four nibbles at once.
#define E2M1_LO_A 0xC0800000u  // low bytes of codes 3,2,1,0
#define E2M1_LO_B 0xC0804000u  // low bytes of codes 7,6,5,4
#define E2M1_HI_A 0x3F3F3F00u  // high bytes of codes 3,2,1,0
#define E2M1_HI_B 0x40404040u  // high bytes of codes 7,6,5,4

// Four E2M1 nibbles (bits 0..15 of h, nibble i = element i) -> two bf16x2 words:
// v01 = (e0, e1), v23 = (e2, e3), exact.
__device__ __forceinline__ void e2m1x4_to_bf16(u32 h, u32& v01, u32& v23) {
    u32 sel = h & 0x7777u;
    u32 lo = __byte_perm(E2M1_LO_A, E2M1_LO_B, sel);
    u32 hi = __byte_perm(E2M1_HI_A, E2M1_HI_B, sel);
    v01 = __byte_perm(lo, hi, 0x5140);
    v23 = __byte_perm(lo, hi, 0x7362);
    // sign of nibble i is bit 4i+3 of h; bf16 sign bits are 15 and 31.
    v01 |= ((h << 12) & 0x00008000u) | ((h << 24) & 0x80000000u);
    v23 |= ((h << 4) & 0x00008000u) | ((h << 16) & 0x80000000u);
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                               u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ldg_stream(const void* p) {
    // Weights are read exactly once: keep them out of L1.
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// ---------------------------------------------------------------------------------------------
// Decode / small-M kernel: tensor-core FP4 dequant-GEMM.
//
// Block = S warps (blockDim.x = 32*S, S <= 16) computing rows [row0, row0 + 16*MT) for up to 8*TN tokens.
// The K dimension is cut into chunks of 128 elements (64 bytes of each weight row); warp w
// takes chunks [wG, wG+G), [wG+SG, ...), ... (split-K inside the block), partial sums are reduced in shared
// memory in a fixed order, so the result is deterministic. G consecutive chunks are loaded
// together (G*2*MT 16-byte loads per lane in flight before the first use).
//
// Within a chunk, lane (g = lane/4, t = lane%4) loads 16 bytes (32 elements, k in
// [kc + 32t, kc + 32t + 32)) of rows g and g+8 of each m16 tile. mma.sync m16n8k16 only needs
// the A and B k-indices to agree, so logical k-slots {2t, 2t+1, 2t+8, 2t+9} of step
// (q, half) are mapped to physical elements kc + 32t + 8q + 4*half + {0,1,2,3}; the activation
// fragment of token g is then 8 contiguous bytes of x.
// ---------------------------------------------------------------------------------------------

struct TokenMap {
    int in_row[64];   // activation row of each token slot (-1: empty slot)
    int out_row[64];  // output row of each token slot
};

// Token slots of a dense product: slot i of block z is token z*8*TN + i (if < m).
struct DenseTokens {
    int tok0, m;
    __device__ __forceinline__ int in_row(int i) const { return tok0 + i < m ? tok0 + i : -1; }
    __device__ __forceinline__ int out_row(int i) const { return in_row(i); }
};

// Token slots gathered in shared memory (grouped MoE).
struct SharedTokens {
    const TokenMap* tm;
    __device__ __forceinline__ int in_row(int i) const { return tm->in_row[i]; }
    __device__ __forceinline__ int out_row(int i) const { return tm->out_row[i]; }
};

// Epilogues. EPI_STORE: y[out_row][row] = bf16(acc / gscale), y has n columns.
// EPI_SWIGLU (MT == 2): tile 0 holds gate rows r, tile 1 the matching up rows r + lim;
// y[out_row][r] = bf16(silu(gate) * up), y has lim columns (the expert's intermediate width).
#define EPI_STORE 0
#define EPI_SWIGLU 1

// Loads the packed weights and scale bytes of chunks [c0, c0 + G) for this lane (rows g and
// g+8 of each tile); chunks past the end of K and rows outside the tile read as zero.
template <int FMT, int MT, int G>
__device__ __forceinline__ void load_weights(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                             int n, int k, int kb, int bpr, int row0, int tstride,
                                             int lim, int c0, int g, int t, uint4 (&w)[G][MT][2],
                                             u32 (&sc)[G][MT][2]) {
#pragma unroll
    for (int u = 0; u < G; u++) {
        const int k0 = ((c0 + u) << 7) + (t << 5);  // first element of this lane's piece
        const bool kval = k0 < k;
#pragma unroll
        for (int i = 0; i < MT; i++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int l = g + h * 8;
                const int r = row0 + i * tstride + l;
                if (kval && row0 + l < lim && r < n) {
                    w[u][i][h] = ldg_stream(wp + (size_t)r * kb + (k0 >> 1));
                    if (FMT == FMT_NVFP4) {
                        sc[u][i][h] = __ldg((const u16*)(ws + (size_t)r * bpr + (k0 >> 4)));
                    } else {
                        sc[u][i][h] = __ldg(ws + (size_t)r * bpr + (k0 >> 5));
                    }
                } else {
                    w[u][i][h] = make_uint4(0, 0, 0, 0);
                    sc[u][i][h] = 0;
                }
            }
        }
    }
}

// Rows: tile i, local row l (0..15) is weight row row0 + i*tstride + l, used where
// row0 + l < lim and the row is < n. Dense: tstride 16, lim n. Gated: tstride = lim = inter.
template <int FMT, int MT, int TN, int G, int EPI, class Tokens>
__device__ __forceinline__ void fp4_tile(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                         float gscale, const u16* __restrict__ lut,
                                         const u16* __restrict__ x, u16* __restrict__ y, int n,
                                         int k, int row0, int tstride, int lim,
                                         const Tokens& tok, float* red) {
    const int S = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int kb = k >> 1;                                   // bytes per weight row
    const int bpr = FMT == FMT_NVFP4 ? (k >> 4) : (k >> 5);  // scale bytes per row
    const int nchunks = (k + 127) >> 7;

    float acc[MT][TN][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < TN; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.f;

    int xrow[TN];
#pragma unroll
    for (int j = 0; j < TN; j++) xrow[j] = tok.in_row(j * 8 + g);

    // Each warp takes G consecutive chunks per iteration (G * 16 * MT rows * 64 bytes of
    // weights). The weights of the next iteration are requested before the current one is
    // computed (register double buffering), so loads stay in flight during the arithmetic.
    uint4 w[G][MT][2];
    u32 sc[G][MT][2];
    const int c_first = warp * G;
    load_weights<FMT, MT, G>(wp, ws, n, k, kb, bpr, row0, tstride, lim, c_first, g, t, w, sc);
    for (int c0 = c_first; c0 < nchunks; c0 += S * G) {
        uint4 wn[G][MT][2];
        u32 scn[G][MT][2];
        load_weights<FMT, MT, G>(wp, ws, n, k, kb, bpr, row0, tstride, lim, c0 + S * G, g, t, wn,
                                 scn);
        uint4 xv[G][TN][4];
#pragma unroll
        for (int u = 0; u < G; u++) {
            const int k0 = ((c0 + u) << 7) + (t << 5);
            const bool kval = k0 < k;
#pragma unroll
            for (int j = 0; j < TN; j++) {
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    if (kval && xrow[j] >= 0) {
                        xv[u][j][q] = __ldg((const uint4*)(x + (size_t)xrow[j] * k + k0 + 8 * q));
                    } else {
                        xv[u][j][q] = make_uint4(0, 0, 0, 0);
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < G; u++) {
            // Block scales as bf16x2 (both lanes equal); NVFP4 pieces hold two 16-element blocks.
            // The 512-byte table is read through L1 (no shared-memory prologue before the loads).
            u32 s2[MT][2][2];
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    if (FMT == FMT_NVFP4) {
                        const u32 a = __ldg(lut + (sc[u][i][h] & 0xFF));
                        const u32 b = __ldg(lut + ((sc[u][i][h] >> 8) & 0xFF));
                        s2[i][h][0] = a | (a << 16);
                        s2[i][h][1] = b | (b << 16);
                    } else {
                        const u32 a = __ldg(lut + (sc[u][i][h] & 0xFF));
                        s2[i][h][0] = a | (a << 16);
                        s2[i][h][1] = s2[i][h][0];
                    }
                }
#pragma unroll
            for (int q = 0; q < 4; q++) {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    u32 a[MT][4];
#pragma unroll
                    for (int i = 0; i < MT; i++) {
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const uint4 wv = w[u][i][h];
                            const u32 word = q == 0 ? wv.x : q == 1 ? wv.y : q == 2 ? wv.z : wv.w;
                            u32 v01, v23;
                            e2m1x4_to_bf16(half ? (word >> 16) : word, v01, v23);
                            const u32 s = s2[i][h][q >> 1];
                            a[i][h] = bf16x2_mul(v01, s);      // reg 0/1: row g/g+8, slots 2t,2t+1
                            a[i][2 + h] = bf16x2_mul(v23, s);  // reg 2/3: slots 2t+8, 2t+9
                        }
                    }
#pragma unroll
                    for (int j = 0; j < TN; j++) {
                        const uint4 xq = xv[u][j][q];
                        const u32 b0 = half ? xq.z : xq.x;
                        const u32 b1 = half ? xq.w : xq.y;
#pragma unroll
                        for (int i = 0; i < MT; i++) {
                            mma_bf16_16816(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b0, b1);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < G; u++)
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    w[u][i][h] = wn[u][i][h];
                    sc[u][i][h] = scn[u][i][h];
                }
    }

    // Split-K reduction: red[warp][row 0..16MT)[token 0..8TN)
    const int ROWS = 16 * MT, TOK = 8 * TN;
    float* mine = red + warp * ROWS * TOK;
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) {
            const int r = i * 16 + g;
            const int c = j * 8 + 2 * t;
            mine[r * TOK + c] = acc[i][j][0];
            mine[r * TOK + c + 1] = acc[i][j][1];
            mine[(r + 8) * TOK + c] = acc[i][j][2];
            mine[(r + 8) * TOK + c + 1] = acc[i][j][3];
        }
    __syncthreads();
    const float inv_scale = 1.0f / gscale;
    if (EPI == EPI_STORE) {
        for (int e = threadIdx.x; e < ROWS * TOK; e += blockDim.x) {
            // Consecutive threads take consecutive rows of one token: coalesced stores to y.
            const int tk = e / ROWS;
            const int r = e - tk * ROWS;
            const int orow = tok.out_row(tk);
            const int col = row0 + r;
            if (orow < 0 || col >= n) continue;
            float sum = 0.f;
            for (int s = 0; s < S; s++) sum += red[(s * ROWS + r) * TOK + tk];
            y[(size_t)orow * n + col] = f32_to_bf16(sum * inv_scale);
        }
    } else {
        for (int e = threadIdx.x; e < 16 * TOK; e += blockDim.x) {
            const int tk = e / 16;
            const int r = e - tk * 16;
            const int orow = tok.out_row(tk);
            const int col = row0 + r;
            if (orow < 0 || col >= lim) continue;
            float gate = 0.f, up = 0.f;
            for (int s = 0; s < S; s++) {
                gate += red[(s * ROWS + r) * TOK + tk];
                up += red[(s * ROWS + 16 + r) * TOK + tk];
            }
            gate *= inv_scale;
            up *= inv_scale;
            y[(size_t)orow * lim + col] = f32_to_bf16(gate / (1.0f + __expf(-gate)) * up);
        }
    }
}

template <int FMT, int MT, int TN, int G>
__device__ __forceinline__ void fp4_dense_body(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                               const float* __restrict__ gscale,
                                               const u16* __restrict__ lut,
                                               const u16* __restrict__ x, u16* __restrict__ y,
                                               int m, int n, int k) {
    extern __shared__ float red[];
    const DenseTokens tok{(int)blockIdx.z * 8 * TN, m};
    fp4_tile<FMT, MT, TN, G, EPI_STORE>(wp, ws, gscale[0], lut, x, y, n, k, blockIdx.x * 16 * MT,
                                        16, n, tok, red);
}

// Grouped MoE variant: one launch covers every (token, expert) pair of a layer, straight from
// the router's top-k ids on the device. blockIdx.y = slot: the block serves the slot-th expert
// (in increasing id order) that has at least one pair, found by the block itself; blocks whose
// slot is past the number of active experts exit. The block then walks the ids in order and
// takes its expert's pairs 8*TN at a time (deterministic order). blockIdx.x = row tile.
// in_div: activation row of pair p is p / in_div (top_k for the first projection, whose input
// is the token; 1 for the second, whose input is the pair's own intermediate row).
// EPI_SWIGLU: the weight is [2*inter, k] (gate rows, then up rows); tile 0 takes gate rows
// [16x, 16x+16), tile 1 the matching up rows, and y gets silu(gate) * up, [P][inter].
#define MOE_MAX_EXPERTS 1024

template <int FMT, int MT, int TN, int G, int EPI>
__device__ __forceinline__ void fp4_moe_body(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                             const float* __restrict__ gscale,
                                             const u16* __restrict__ lut,
                                             const u16* __restrict__ x, u16* __restrict__ y, int n,
                                             int k, const int* __restrict__ ids, int P, int E,
                                             int in_div, int* __restrict__ bad) {
    extern __shared__ float red[];
    __shared__ TokenMap tm;
    __shared__ unsigned char present[MOE_MAX_EXPERTS];
    __shared__ int s_expert, s_pos, s_fill;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int e = threadIdx.x; e < E; e += blockDim.x) present[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        const int e = ids[p];
        if (e >= 0 && e < E) present[e] = 1;
    }
    __syncthreads();
    if (warp == 0) {
        int want = blockIdx.y, found = -1;
        for (int base = 0; base < E && found < 0; base += 32) {
            unsigned m = __ballot_sync(0xffffffffu, base + lane < E && present[base + lane]);
            const int c = __popc(m);
            if (want < c) {
                for (int i = 0; i < want; i++) m &= m - 1;
                found = base + __ffs(m) - 1;
            } else {
                want -= c;
            }
        }
        if (lane == 0) {
            s_expert = found;
            s_pos = 0;
        }
        if (bad != 0 && blockIdx.x == 0 && blockIdx.y == 0) {
            int nb = 0;
            for (int base = 0; base < P; base += 32) {
                const int p = base + lane;
                const int e = p < P ? ids[p] : 0;
                nb += __popc(__ballot_sync(0xffffffffu, p < P && (e < 0 || e >= E)));
            }
            if (lane == 0) bad[0] = nb;
        }
    }
    __syncthreads();
    const int e = s_expert;
    if (e < 0) return;
    const size_t wbytes = (size_t)n * (k >> 1);
    const size_t sbytes = (size_t)n * (FMT == FMT_NVFP4 ? (k >> 4) : (k >> 5));
    const int inter = n / 2;
    const int row0 = EPI == EPI_SWIGLU ? blockIdx.x * 16 : blockIdx.x * 16 * MT;
    const int tstride = EPI == EPI_SWIGLU ? inter : 16;
    const int lim = EPI == EPI_SWIGLU ? inter : n;
    const SharedTokens tok{&tm};
    while (true) {
        if (warp == 0) {
            // Collect up to 8*TN pairs of expert e, resuming at s_pos.
            int pos = s_pos, fill = 0;
            while (pos < P && fill < 8 * TN) {
                const int p = pos + lane;
                const bool hit = p < P && ids[p] == e;
                const unsigned m = __ballot_sync(0xffffffffu, hit);
                const int c = __popc(m);
                const int take = min(c, 8 * TN - fill);
                const int before = __popc(m & ((1u << lane) - 1u));
                if (hit && before < take) {
                    tm.in_row[fill + before] = p / in_div;
                    tm.out_row[fill + before] = p;
                }
                fill += take;
                if (take < c) {
                    unsigned mm = m;
                    for (int i = 0; i < take; i++) mm &= mm - 1;
                    pos += __ffs(mm) - 1;  // first hit not taken
                    break;
                }
                pos += 32;
            }
            for (int i = fill + lane; i < 8 * TN; i += 32) {
                tm.in_row[i] = -1;
                tm.out_row[i] = -1;
            }
            if (lane == 0) {
                s_pos = pos;
                s_fill = fill;
            }
        }
        __syncthreads();
        if (s_fill == 0) break;
        fp4_tile<FMT, MT, TN, G, EPI>(wp + (size_t)e * wbytes, ws + (size_t)e * sbytes, gscale[e],
                                      lut, x, y, n, k, row0, tstride, lim, tok, red);
        __syncthreads();  // the reduction is done with tm and red before the next group
    }
}

#define DENSE_KERNEL(NAME, FMT, MT, TN, G)                                                     \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                    \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int m, \
        int n, int k) {                                                                          \
        fp4_dense_body<FMT, MT, TN, G>(wp, ws, gs, lut, x, y, m, n, k);                          \
    }

#define MOE_KERNEL(NAME, FMT, MT, G, EPI)                                                       \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                     \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int n, \
        int k, const int* ids, int P, int E, int in_div, int* bad) {                              \
        fp4_moe_body<FMT, MT, 2, G, EPI>(wp, ws, gs, lut, x, y, n, k, ids, P, E, in_div, bad);    \
    }

// Variants: fp4_gemm_{nv,mx}_m{MT}_t{TN}_g{G} (see gemm.rs for the dispatcher).
#define DENSE_VARIANTS(FMTNAME, FMT)                     \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m1_t1_g1, FMT, 1, 1, 1) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m1_t1_g2, FMT, 1, 1, 2) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m1_t1_g4, FMT, 1, 1, 4) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m2_t1_g1, FMT, 2, 1, 1) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m2_t1_g2, FMT, 2, 1, 2) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m1_t2_g1, FMT, 1, 2, 1) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m1_t2_g2, FMT, 1, 2, 2) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m2_t2_g1, FMT, 2, 2, 1) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m2_t2_g2, FMT, 2, 2, 2) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m1_t4_g1, FMT, 1, 4, 1) \
    DENSE_KERNEL(fp4_gemm_##FMTNAME##_m2_t4_g1, FMT, 2, 4, 1)

DENSE_VARIANTS(nv, FMT_NVFP4)
DENSE_VARIANTS(mx, FMT_MXFP4)
// fp4_moe_{nv,mx}_g{G}: plain grouped product (down projection);
// fp4_moe_{nv,mx}_g{G}_swiglu: gate/up projection with SwiGLU in the epilogue.
MOE_KERNEL(fp4_moe_nv_g1, FMT_NVFP4, 1, 1, EPI_STORE)
MOE_KERNEL(fp4_moe_nv_g2, FMT_NVFP4, 1, 2, EPI_STORE)
MOE_KERNEL(fp4_moe_nv_g1_swiglu, FMT_NVFP4, 2, 1, EPI_SWIGLU)
MOE_KERNEL(fp4_moe_nv_g2_swiglu, FMT_NVFP4, 2, 2, EPI_SWIGLU)
MOE_KERNEL(fp4_moe_mx_g1, FMT_MXFP4, 1, 1, EPI_STORE)
MOE_KERNEL(fp4_moe_mx_g2, FMT_MXFP4, 1, 2, EPI_STORE)
MOE_KERNEL(fp4_moe_mx_g1_swiglu, FMT_MXFP4, 2, 1, EPI_SWIGLU)
MOE_KERNEL(fp4_moe_mx_g2_swiglu, FMT_MXFP4, 2, 2, EPI_SWIGLU)

// ---------------------------------------------------------------------------------------------
// Dequantize to a dense bf16 [N][K] matrix (prefill path through cuBLAS). One thread per
// 32 elements (16 packed bytes). Value = e2m1 * scale / gscale computed in f32 (the CPU
// reference order: multiplier = scale / gscale first), rounded to bf16.
// ---------------------------------------------------------------------------------------------
template <int FMT>
__device__ __forceinline__ void dequant_body(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                             const float* __restrict__ gscale,
                                             const u16* __restrict__ scale_lut, u16* __restrict__ out,
                                             int n, int k) {
    const size_t pieces = (size_t)n * (k >> 5);
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= pieces) return;
    const size_t row = idx / (k >> 5);
    const int pk = (int)(idx - row * (k >> 5)) * 32;
    const uint4 w = ldg_stream(wp + row * (k >> 1) + (pk >> 1));
    const u32 words[4] = {w.x, w.y, w.z, w.w};
    const float gs = gscale[0];
    float mult[2];
    if (FMT == FMT_NVFP4) {
        const u8* s = ws + row * (k >> 4) + (pk >> 4);
        mult[0] = bf16_to_f32(scale_lut[s[0]]) / gs;
        mult[1] = bf16_to_f32(scale_lut[s[1]]) / gs;
    } else {
        mult[0] = bf16_to_f32(scale_lut[ws[row * (k >> 5) + (pk >> 5)]]);
        mult[1] = mult[0];
    }
    u32 o[16];
#pragma unroll
    for (int q = 0; q < 4; q++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            u32 v01, v23;
            e2m1x4_to_bf16(half ? (words[q] >> 16) : words[q], v01, v23);
            const float mlt = mult[q >> 1];
            // e2m1 values are exact in bf16; widen, scale in f32, round once.
            const float e0 = __uint_as_float(v01 << 16), e1 = __uint_as_float(v01 & 0xFFFF0000u);
            const float e2 = __uint_as_float(v23 << 16), e3 = __uint_as_float(v23 & 0xFFFF0000u);
            o[q * 4 + half * 2] = (u32)f32_to_bf16(e0 * mlt) | ((u32)f32_to_bf16(e1 * mlt) << 16);
            o[q * 4 + half * 2 + 1] =
                (u32)f32_to_bf16(e2 * mlt) | ((u32)f32_to_bf16(e3 * mlt) << 16);
        }
    }
    uint4* dst = (uint4*)(out + row * k + pk);
    dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
    dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
    dst[2] = make_uint4(o[8], o[9], o[10], o[11]);
    dst[3] = make_uint4(o[12], o[13], o[14], o[15]);
}

extern "C" __global__ void fp4_dequant_nv(const u8* wp, const u8* ws, const float* gs,
                                          const u16* lut, u16* out, int n, int k) {
    dequant_body<FMT_NVFP4>(wp, ws, gs, lut, out, n, k);
}
extern "C" __global__ void fp4_dequant_mx(const u8* wp, const u8* ws, const float* gs,
                                          const u16* lut, u16* out, int n, int k) {
    dequant_body<FMT_MXFP4>(wp, ws, gs, lut, out, n, k);
}

// Plain 16-byte-per-thread grid-stride copy: measures the copy bandwidth the kernels are held to.
extern "C" __global__ void util_copy_u4(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                        unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
