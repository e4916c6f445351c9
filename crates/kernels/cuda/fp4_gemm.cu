// FP4 (NVFP4 / MXFP4) weight x BF16 activation kernels for Hopper, compiled at run time by NVRTC.
//
// Compiled after common.cuh (typedefs, bf16 conversions, mma_bf16_16816, pdl_enter); no CUDA
// headers.
//
// Layouts (see docs/DESIGN.md, `Fp4Matrix`):
//   packed  [E][N][K/2] u8 in 32-bit words of 8 elements each; inside a word the bits are
//           re-packed at upload for a cheap decode (see e2m1x8_to_bf16 / weights.rs)
//   scales  [E][N][K/B] u8, B = 16 (NVFP4, E4M3) or 32 (MXFP4, E8M0)
//   gscale  [E] f32 (NVFP4: w = fp4 * e4m3(scale) / gscale; MXFP4: 1.0)
//   lut     GEMM kernels: bf16 of scale * 2^(126 - A) per scale byte, post = 2^A (weights.rs);
//           dequantization kernel: bf16 of the scale itself
//   x       [rows][K] bf16, y [rows][N] bf16, row-major.
// K must be a multiple of 32 (16-byte aligned weight rows); N and M are arbitrary.

#define FMT_NVFP4 0
#define FMT_MXFP4 1

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

// a * b on two packed bf16 lanes (fma with -0 keeps the sign of an exact zero product).
__device__ __forceinline__ u32 bf16x2_mul(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}

// Zeroes the mma accumulators of MT row tiles x TN token tiles (every FP4 kernel's start).
template <int MT, int TN>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][TN][4]) {
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < TN; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.f;
}

// E2M1 decode on the upload layout (GpuFp4Weight::from_parts re-packs the bits of every 32-bit
// word of 8 elements e0..e7, see `repack_word` in weights.rs). Pair p = (e[2p], e[2p+1]) becomes
// one bf16x2 word; e[2p] sits in bits 0..15 and e[2p+1] in the same bits + 16, so one shift and
// one mask move a whole pair. In each half, with m0..m2 the magnitude bits (m0 = mantissa) and
// S the sign of an E2M1 code:
//   P0: m at 6..8,   S at 15  -> q & 0x81C081C0
//   P1: m at 0..2,   S at 9   -> (q << 6) & 0x81C081C0
//   P2: m at 3..5,   S at 13  -> ((q << 3) & 0x01C001C0) | ((q << 2) & 0x80008000)
//   P3: m at 10..12, S at 14  -> ((q >> 4) & 0x01C001C0) | ((q << 1) & 0x80008000)
// The result has S at bit 15 and the magnitude in bits 6..8 (bf16 exponent bits 7..8, mantissa
// bit 6): that bf16 is exactly e2m1 * 2^-126 (bf16 subnormals at exponent 0 match E2M1's
// subnormal 0 / 0.5). The 2^126 is folded into the block-scale multiplier (weights.rs), so the
// product that reaches the tensor cores is a normal bf16. 11 instructions per 8 values instead
// of ~24 for the byte-table decode of round 1.
#define PAIR_MASK 0x81C081C0u
#define MAG_MASK 0x01C001C0u
#define SIGN_MASK 0x80008000u
__device__ __forceinline__ void e2m1x8_to_bf16(u32 q, u32& p0, u32& p1, u32& p2, u32& p3) {
    p0 = q & PAIR_MASK;
    p1 = (q << 6) & PAIR_MASK;
    p2 = ((q << 3) & MAG_MASK) | ((q << 2) & SIGN_MASK);
    p3 = ((q >> 4) & MAG_MASK) | ((q << 1) & SIGN_MASK);
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
// EPI_SWIGLU_BF16 (dense gate/up, fp4_gemm_swiglu): the same, with gate and up first rounded to
// bf16 and silu taken with expf: bit for bit what EPI_STORE followed by the runtime's swiglu
// kernel (ops.cu) gives, one launch and one round trip of the [gate | up] row fewer.
#define EPI_STORE 0
#define EPI_SWIGLU 1
#define EPI_SWIGLU_BF16 2

// EPI_SWIGLU_BF16 of one output (also the tiled kernels', fp4_tiled.cu): gate and up rounded
// to bf16 as stored by EPI_STORE and read back by the runtime's swiglu kernel, silu with expf.
__device__ __forceinline__ u16 swiglu_bf16(float gate, float up) {
    gate = bf16_to_f32(f32_to_bf16(gate));
    up = bf16_to_f32(f32_to_bf16(up));
    return f32_to_bf16(gate / (1.0f + expf(-gate)) * up);
}

// Dense kernel flags (gemm.rs): bit 0 = prefetch the block's weights into L2 before pdl_enter.
#define FLAG_PREFETCH 1

// An RMSNorm folded into one-token dense products (gemm.rs: NormIn / NormOut; the batch-1
// decode of dense FP4 layers). RMSNorm(v) . W^T = (bf16(w * v) . W^T) / rms(v): the norm's only
// cross-row step is one scalar per token, so a producer writes the unnormalised row and the
// partial sums of v^2 of its blocks, and the consumer scales its products by 1 / rms.
// Consumer (in_parts != 0): x holds bf16(w * v); the sum of v^2 comes as in_n partial sums,
// added by warp 0 in a fixed order; the products are multiplied by 1 / sqrt(sum / in_len +
// in_eps) (add_rmsnorm's formula) before the epilogue. One float of dynamic shared memory past
// the partials and staging buffers carries that factor to the block.
// Producer (resid != 0, EPI_STORE, one token): y is not written; instead v = resid[col] +
// bf16(product) (what add_rmsnorm adds for a stored delta), resid[col] = v, out_h[col] =
// bf16(out_w[col] * v), and out_parts[block] = the sum of v^2 over the block's columns in
// column order.
struct Fold {
    const float* in_parts = 0;
    int in_n = 0, in_len = 0;
    float in_eps = 0.f;
    float* resid = 0;
    const float* out_w = 0;
    u16* out_h = 0;
    float* out_parts = 0;
};

// Weight registers of one iteration of a warp: G chunks x MT row tiles x rows (g, g+8).
template <int MT, int G>
struct WeightRegs {
    uint4 w[G][MT][2];
    u32 sc[G][MT][2];
};

// Loads the packed weights and scale bytes of G consecutive chunks for this lane from the
// lane's row pointers (which point at the first chunk); pieces past the end of K read as zero.
// Rows outside the tile were clamped to a valid row when the pointers were made: their sums
// land in accumulator rows the epilogue never stores.
template <int FMT, int MT, int G>
__device__ __forceinline__ void load_weights(const u8* const (&wptr)[MT][2],
                                             const u8* const (&sptr)[MT][2], int kpiece, int k,
                                             WeightRegs<MT, G>& r) {
#pragma unroll
    for (int u = 0; u < G; u++) {
        const bool kval = kpiece + u * 128 < k;  // first element of this lane's piece
#pragma unroll
        for (int i = 0; i < MT; i++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (kval) {
                    r.w[u][i][h] = ldg_stream(wptr[i][h] + u * 64);
                    if (FMT == FMT_NVFP4) {
                        r.sc[u][i][h] = __ldg((const u16*)(sptr[i][h] + u * 8));
                    } else {
                        r.sc[u][i][h] = __ldg(sptr[i][h] + u * 4);
                    }
                } else {
                    r.w[u][i][h] = make_uint4(0, 0, 0, 0);
                    r.sc[u][i][h] = 0;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation staging (the _xs kernels, 16 tokens; gemm.rs: Tuning::x_stage). Loaded straight
// from global memory, the activation fragments of one mma step are 16 bytes per lane at a
// 64-byte stride (lane t reads elements 32t + 8q of its token at step q): each warp request
// touches two 128-byte lines per token for 16 bytes of each sector used, and at 16 tokens the
// L1 moved ~4 bytes of activations per weight byte (ncu: L1/TEX 78 % busy, 70 % hit rate, on
// 4096 x 14336). Staged, each warp copies the activations of its own next chunks into its own
// shared-memory buffer with coalesced 16-byte cp.async (256 contiguous bytes per token and
// chunk), one iteration ahead, and reads fragments back conflict-free: no block barrier, the
// copy overlaps the compute. (The grouped MoE kernels, whose experts see few tokens each, were
// slower staged: bench/results/kernels-h100-xstage-experiment.json.)
// Layout of one chunk: slot s (token) x 2 lines of 64 elements; 16-byte piece c of the slot's
// 128 elements goes to line c >> 3, unit (c & 7) ^ ((c >> 3) << 1) ^ (s & 1): the 8 lanes of a
// quarter warp (two slots, t = 0..3 at one step q) then hit 8 distinct bank groups.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

// 16 bytes global -> shared (dst: a shared-window address), zero-filled where !valid (src-size
// 0: nothing is read).
__device__ __forceinline__ void cp_async16_to(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async16(u16* dst, const u16* src, bool valid) {
    cp_async16_to(smem_addr(dst), src, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Element offset of piece c (8 elements) of slot s inside a staged chunk.
__device__ __forceinline__ int xstage_off(int s, int c) {
    return s * 128 + (c >> 3) * 64 + (((c & 7) ^ ((c >> 3) << 1) ^ (s & 1)) << 3);
}

// One warp: the activations of G chunks from element kc on into buf (lane takes pieces lane +
// 32i: slot (lane >> 4) + 2i, piece lane & 15). Empty slots (a partly filled token tile, an
// expert with few pairs) read nothing and hold zeros: their outputs are never stored.
template <int TN, int G, class Tokens>
__device__ __forceinline__ void stage_x(u16* buf, const u16* __restrict__ x, const Tokens& tok,
                                        int kc, int k) {
    const int lane = threadIdx.x & 31, c = lane & 15;
#pragma unroll
    for (int u = 0; u < G; u++) {
        const int e = kc + u * 128 + 8 * c;
        const bool valid = e < k;
#pragma unroll
        for (int i = 0; i < 4 * TN; i++) {
            const int slot = (lane >> 4) + 2 * i;
            const int xr = tok.in_row(slot);
            cp_async16(buf + u * (8 * TN * 128) + xstage_off(slot, c),
                       x + (size_t)(xr < 0 ? 0 : xr) * k + (valid ? e : 0), valid && xr >= 0);
        }
    }
}

// Activations loaded up front while TN * MT is below this (an A/B knob through
// MIMO_NVRTC_FLAGS, context.rs; 2 measured slower on the H100: kernels-notes round 12).
#ifndef MIMO_X_UPFRONT_MAX_TM
#define MIMO_X_UPFRONT_MAX_TM 4
#endif

// One iteration's arithmetic: G chunks starting at element kpiece0 - 32t of every row.
// XL: the layout of staged activations (XST). 0: the _xs kernels' and the tiled kernel's
// (`xstage_off`, 8*TN slots of 128 elements per chunk); 1: the bulk kernel's (fp4_bulk.cu),
// one chunk of 128 elements as the bulk tensor copy writes it with the 128-byte swizzle: token
// r's two 64-element halves are 128-byte rows 2r and 2r + 1, 16-byte unit u of row R stored at
// unit u ^ (R & 7). G must be 1 there.
template <int FMT, int MT, int TN, int G, bool XST = false, int XL = 0>
__device__ __forceinline__ void compute_chunks(const WeightRegs<MT, G>& r,
                                               const u16* const (&xptr)[TN], int kpiece, int k,
                                               const u16* __restrict__ lut,
                                               float (&acc)[MT][TN][4],
                                               const u16* xs = 0, const int* xo = 0) {
    static_assert(XL == 0 || (XST && G == 1), "the bulk layout holds one chunk");
    // Activations: loaded for the whole iteration up front where registers allow; the wide
    // variants (TN * MT >= 4) load them per word step instead (they spilled otherwise).
    // Groups of more than two chunks load them per word step too (registers).
    // Staged activations (XST: xs is this warp's buffer) are read per word step from shared
    // memory.
    constexpr bool X_UPFRONT = !XST && TN * MT < MIMO_X_UPFRONT_MAX_TM && G <= 2;
    constexpr int XG = X_UPFRONT ? G : 1;
    uint4 xv[XG][TN][4];
    // The bulk layout's fragments (xo: this lane's element offsets of token tile j, step q at
    // xo[4j + q], see fp4_bulk.cu), all requested before the first use by volatile loads, which
    // the compiler keeps ahead of the (volatile) mma: read one step at a time, each read's
    // latency stood in the mma chain.
    uint4 xb[XL == 1 ? TN : 1][4];
    if (XL == 1) {
        const u32 base = smem_addr(xs);
#pragma unroll
        for (int j = 0; j < TN; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                uint4& v = xb[XL == 1 ? j : 0][q];
                asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                             : "r"(base + 2 * xo[4 * j + q]));
            }
    }
    if (X_UPFRONT) {
#pragma unroll
        for (int u = 0; u < XG; u++) {
            const bool kval = kpiece + u * 128 < k;
#pragma unroll
            for (int j = 0; j < TN; j++) {
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    xv[u][j][q] = kval ? __ldg((const uint4*)(xptr[j] + kpiece + u * 128 + 8 * q))
                                       : make_uint4(0, 0, 0, 0);
                }
            }
        }
    }
#pragma unroll
    for (int u = 0; u < G; u++) {
        // Block scale multipliers as bf16x2 (both lanes equal); NVFP4 pieces hold two
        // 16-element blocks. The 512-byte table is read through L1 (XL = 1: shared memory).
        u32 s2[MT][2][2];
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                // The bulk kernel (XL = 1) passes its shared-memory copy of the table (a shorter
                // lookup in each chunk's chain: 18.7 -> 18.1 us at one token, H100 round 18).
                if (FMT == FMT_NVFP4) {
                    const u32 a = XL == 1 ? lut[r.sc[u][i][h] & 0xFF]
                                          : __ldg(lut + (r.sc[u][i][h] & 0xFF));
                    const u32 b = XL == 1 ? lut[(r.sc[u][i][h] >> 8) & 0xFF]
                                          : __ldg(lut + ((r.sc[u][i][h] >> 8) & 0xFF));
                    s2[i][h][0] = a | (a << 16);
                    s2[i][h][1] = b | (b << 16);
                } else {
                    const u32 a = XL == 1 ? lut[r.sc[u][i][h] & 0xFF]
                                          : __ldg(lut + (r.sc[u][i][h] & 0xFF));
                    s2[i][h][0] = a | (a << 16);
                    s2[i][h][1] = s2[i][h][0];
                }
            }
#pragma unroll
        for (int q = 0; q < 4; q++) {
            // All 8 elements of word q of both rows, decoded once for the two mma steps.
            u32 pr[MT][2][4];
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const uint4 wv = r.w[u][i][h];
                    const u32 word = q == 0 ? wv.x : q == 1 ? wv.y : q == 2 ? wv.z : wv.w;
                    e2m1x8_to_bf16(word, pr[i][h][0], pr[i][h][1], pr[i][h][2], pr[i][h][3]);
                }
            uint4 xj[TN];
#pragma unroll
            for (int j = 0; j < TN; j++) {
                if (XST && XL == 1) {
                    xj[j] = xb[XL == 1 ? j : 0][q];
                } else if (XST) {
                    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
                    xj[j] = *(const uint4*)(xs + (u * TN + j) * (8 * 128) + xstage_off(g, 4 * t + q));
                } else if (X_UPFRONT) {
                    xj[j] = xv[X_UPFRONT ? u : 0][j][q];
                } else {
                    const bool kval = kpiece + u * 128 < k;
                    xj[j] = kval ? __ldg((const uint4*)(xptr[j] + kpiece + u * 128 + 8 * q))
                                 : make_uint4(0, 0, 0, 0);
                }
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                u32 a[MT][4];
#pragma unroll
                for (int i = 0; i < MT; i++) {
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const u32 s = s2[i][h][q >> 1];
                        // reg 0/1: row g/g+8, slots 2t,2t+1 = elements (4half, 4half+1);
                        // reg 2/3: slots 2t+8, 2t+9 = elements (4half+2, 4half+3).
                        a[i][h] = bf16x2_mul(pr[i][h][2 * half], s);
                        a[i][2 + h] = bf16x2_mul(pr[i][h][2 * half + 1], s);
                    }
                }
#pragma unroll
                for (int j = 0; j < TN; j++) {
                    const uint4 xq = xj[j];
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
}

// Rows: tile i, local row l (0..15) is weight row row0 + i*tstride + l, used where
// row0 + l < lim and the row is < n. Dense: tstride 16, lim n. Gated: tstride = lim = inter.
// The main loop: adds to acc the products of this warp's K chunks (c_first, then every
// `stride` chunks, G at a time) of rows [row0, ...) (see fp4_tile) with the tokens' activations.
template <int FMT, int MT, int TN, int G, class Tokens, bool XST = false>
__device__ __forceinline__ void fp4_accumulate(const u8* __restrict__ wp,
                                               const u8* __restrict__ ws,
                                               const u16* __restrict__ lut,
                                               const u16* __restrict__ x, int n, int k, int row0,
                                               int tstride, int lim, const Tokens& tok,
                                               int c_first, int stride,
                                               float (&acc)[MT][TN][4], u16* xsw = 0) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int kb = k >> 1;                                   // bytes per weight row
    const int bpr = FMT == FMT_NVFP4 ? (k >> 4) : (k >> 5);  // scale bytes per row
    const int nchunks = (k + 127) >> 7;

    // Activation rows of this lane's tokens; empty slots read token row 0 instead (their
    // output columns are never stored), so the loop needs no token checks.
    const u16* xptr[TN];
#pragma unroll
    for (int j = 0; j < TN; j++) {
        const int xr = tok.in_row(j * 8 + g);
        xptr[j] = x + (size_t)(xr < 0 ? 0 : xr) * k;  // + kpiece (which includes 32t)
    }

    // Each warp takes G consecutive chunks per iteration (G * 16 * MT rows * 64 bytes of
    // weights), then skips `stride` chunks. Pointers advance by a constant per iteration (no
    // per-load address arithmetic); rows outside the tile are clamped to an existing row.
    const u8* wptr[MT][2];
    const u8* sptr[MT][2];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int l = g + h * 8;
            int r = row0 + i * tstride + l;
            // Clamp to a row that exists: tile i's first row where it is < n (gated: the up
            // row matching row0), else the block's first row (dense: the second tile of the
            // last block can lie wholly past n).
            if (!(row0 + l < lim && r < n)) r = row0 + i * tstride < n ? row0 + i * tstride : row0;
            wptr[i][h] = wp + (size_t)r * kb + c_first * 64 + t * 16;
            sptr[i][h] = ws + (size_t)r * bpr + (FMT == FMT_NVFP4 ? c_first * 8 + t * 2
                                                                  : c_first * 4 + t);
        }
    const int wstep = stride * 64;
    const int sstep = stride * (FMT == FMT_NVFP4 ? 8 : 4);
    const int kstep = stride * 128;

    // Register double buffering, unrolled by two (no register moves): the weights of the next
    // iteration are requested before the current one is computed.
    WeightRegs<MT, G> ra, rb;
    int kp = c_first * 128 + (t << 5);  // first element of this lane's piece
    load_weights<FMT, MT, G>(wptr, sptr, kp, k, ra);
    // Weights are never written by another kernel: in a PDL chain the first loads above go out
    // while the previous kernel finishes; activations (and every store) come after the wait.
    // Callers that read routing data first have waited already (a second wait returns at once).
    pdl_enter();
    const int kend = nchunks << 7;
    // XST: two staging buffers of G chunks; the next iteration's activations are copied while
    // this one's are used (see stage_x).
    u16* xa = xsw;
    u16* xb = XST ? xsw + G * 8 * TN * 128 : 0;
    if (XST) {
        stage_x<TN, G>(xa, x, tok, kp - (t << 5), k);
        cp_async_commit();
    }
    // One iteration: request the next one's weights into `next` (and its activations into
    // xnext), compute this one from `cur` (xcur); false once K is done.
    const auto step = [&](WeightRegs<MT, G>& next, const WeightRegs<MT, G>& cur, u16* xnext,
                          const u16* xcur) {
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                wptr[i][h] += wstep;
                sptr[i][h] += sstep;
            }
        load_weights<FMT, MT, G>(wptr, sptr, kp + kstep, k, next);
        if (XST) {
            if (kp + kstep - (t << 5) < kend)
                stage_x<TN, G>(xnext, x, tok, kp + kstep - (t << 5), k);
            cp_async_commit();
            cp_async_wait<1>();
            __syncwarp();
        }
        compute_chunks<FMT, MT, TN, G, XST>(cur, xptr, kp, k, lut, acc, xcur);
        if (XST) __syncwarp();  // every lane is done with xcur before it is staged again
        kp += kstep;
        return kp - (t << 5) < kend;
    };
    // Unrolled by two, so the two register sets swap roles without moves.
    if (kp - (t << 5) < kend)
        while (step(rb, ra, xb, xa) && step(ra, rb, xa, xb)) {
        }
}

template <int FMT, int MT, int TN, int G, int EPI, class Tokens, bool XST = false,
          bool FOLD = false>
__device__ __forceinline__ void fp4_tile(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                         float gscale, float post,
                                         const u16* __restrict__ lut,
                                         const u16* __restrict__ x, u16* __restrict__ y, int n,
                                         int k, int row0, int tstride, int lim,
                                         const Tokens& tok, float* red,
                                         const Fold& fo = Fold()) {
    const int S = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    float acc[MT][TN][4];
    zero_acc(acc);
    // XST: this warp's two staging buffers follow the split-K partials in dynamic shared memory.
    u16* xsw = XST ? (u16*)(red + S * 16 * MT * 8 * TN) + warp * (2 * G * 8 * TN * 128) : 0;
    fp4_accumulate<FMT, MT, TN, G, Tokens, XST>(wp, ws, lut, x, n, k, row0, tstride, lim, tok,
                                                warp * G, S * G, acc, xsw);
    const int ROWS = 16 * MT, TOK = 8 * TN;
    // Fold consumer: warp 0 sums the partial sums in index order (lane 0's result is used)
    // and leaves 1 / rms in shared memory for after the barrier below. They are read here, after
    // the main loop: requested before it (cp.async after the PDL wait), they cost the loop of the
    // largest shapes its registers (spills).
    float* pre = red + S * ROWS * TOK + (XST ? S * G * 8 * TN * 128 : 0);
    if (FOLD && fo.in_parts != 0 && warp == 0) {
        float s = 0.f;
        for (int i = lane; i < fo.in_n; i += 32) s += __ldcg(fo.in_parts + i);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) pre[0] = 1.0f / sqrtf(s / (float)fo.in_len + fo.in_eps);
    }
    // Fold producer (one token, columns row0 + lane of warp 0): the residual and norm weight,
    // requested before the reduction below so that they arrive under it.
    float rv = 0.f, nw = 0.f;
    if (FOLD && EPI == EPI_STORE && fo.resid != 0 && warp == 0 && lane < ROWS && row0 + lane < n) {
        rv = fo.resid[row0 + lane];
        nw = fo.out_w[row0 + lane];
    }

    // Split-K reduction: red[warp][row 0..16MT)[token 0..8TN)
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
    // post = 2^A undoes the 2^-A left in the scale multipliers (weights.rs): exact.
    const float inv_scale = FOLD && fo.in_parts != 0 ? (1.0f / gscale) * post * pre[0]
                                                     : (1.0f / gscale) * post;
    if (FOLD && EPI == EPI_STORE && fo.resid != 0) {
        if (warp != 0) return;
        const int col = row0 + lane;
        float sq = 0.f;
        if (lane < ROWS && col < n) {
            float sum = 0.f;
            for (int s = 0; s < S; s++) sum += red[(s * ROWS + lane) * TOK];
            const float v = rv + bf16_to_f32(f32_to_bf16(sum * inv_scale));
            fo.resid[col] = v;
            fo.out_h[col] = f32_to_bf16(nw * v);
            sq = v * v;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
        if (lane == 0) fo.out_parts[blockIdx.x] = sq;
    } else if (EPI == EPI_STORE) {
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
            if (EPI == EPI_SWIGLU_BF16) {
                y[(size_t)orow * lim + col] = swiglu_bf16(gate, up);
            } else {
                y[(size_t)orow * lim + col] = f32_to_bf16(gate / (1.0f + __expf(-gate)) * up);
            }
        }
    }
    trace_mark();
}

// FLAG_PREFETCH: have L2 fetch weight rows [row0, row0 + rows) and their scale bytes (one
// thread; the weights do not depend on the previous kernel, so this goes before the PDL wait).
template <int FMT>
__device__ __forceinline__ void prefetch_rows(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                              int row0, int rows, int k) {
    if (rows <= 0) return;
    const size_t bpr = FMT == FMT_NVFP4 ? (size_t)(k >> 4) : (size_t)(k >> 5);
    prefetch_l2_range(wp + (size_t)row0 * (k >> 1), (size_t)rows * (k >> 1));
    prefetch_l2_range(ws + (size_t)row0 * bpr, (size_t)rows * bpr);
}

// The rows of a dense block: EPI_STORE takes MT adjacent tiles from row blockIdx.x * 16 * MT;
// the gated epilogues (MT == 2) gate rows [16x, 16x + 16) and the matching up rows n / 2 on.
template <int MT, int EPI>
__device__ __forceinline__ void dense_rows(int n, int& row0, int& tstride, int& lim) {
    if (EPI == EPI_STORE) {
        row0 = blockIdx.x * 16 * MT;
        tstride = 16;
        lim = n;
    } else {
        row0 = blockIdx.x * 16;
        tstride = n / 2;
        lim = n / 2;
    }
}

template <int FMT, int MT, int EPI>
__device__ __forceinline__ void dense_prefetch(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                               int n, int k, int row0, int tstride, int lim) {
    if (EPI == EPI_STORE) {
        // One contiguous range: the MT tiles are adjacent.
        prefetch_rows<FMT>(wp, ws, row0, min(16 * MT, n - row0), k);
    } else {
        const int rows = min(16, lim - row0);
        prefetch_rows<FMT>(wp, ws, row0, rows, k);
        prefetch_rows<FMT>(wp, ws, row0 + tstride, rows, k);
    }
}

template <int FMT, int MT, int TN, int G, int EPI, bool XST = false, bool FOLD = false>
__device__ __forceinline__ void fp4_dense_body(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                               const float* __restrict__ gscale,
                                               const u16* __restrict__ lut,
                                               const u16* __restrict__ x, u16* __restrict__ y,
                                               int m, int n, int k, float post, int flags,
                                               const Fold& fo = Fold()) {
    extern __shared__ float red[];
    const DenseTokens tok{(int)blockIdx.z * 8 * TN, m};
    int row0, tstride, lim;
    dense_rows<MT, EPI>(n, row0, tstride, lim);
    if ((flags & FLAG_PREFETCH) && threadIdx.x == 0 && blockIdx.z == 0)
        dense_prefetch<FMT, MT, EPI>(wp, ws, n, k, row0, tstride, lim);
    // pdl_enter: inside fp4_accumulate, after the first weight loads.
    fp4_tile<FMT, MT, TN, G, EPI, DenseTokens, XST, FOLD>(wp, ws, gscale[0], post, lut, x, y, n, k,
                                                          row0, tstride, lim, tok, red, fo);
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

// Warp-wide: bad[0] = number of ids outside [0, E) (called by one warp of one block).
__device__ __forceinline__ void count_bad_ids(const int* __restrict__ ids, int P, int E,
                                              int* __restrict__ bad) {
    const int lane = threadIdx.x & 31;
    int nb = 0;
    for (int base = 0; base < P; base += 32) {
        const int p = base + lane;
        const int e = p < P ? ids[p] : 0;
        nb += __popc(__ballot_sync(0xffffffffu, p < P && (e < 0 || e >= E)));
    }
    if (lane == 0) bad[0] = nb;
}

// DIRECT (one token, moe.rs): blockIdx.y is a pair, not an expert slot; the block computes that
// pair alone, with no routing scan (a token's top-k experts are distinct, so no weight read is
// shared anyway).
template <int FMT, int MT, int TN, int G, int EPI, bool DIRECT>
__device__ __forceinline__ void fp4_moe_body(const u8* __restrict__ wp, const u8* __restrict__ ws,
                                             const float* __restrict__ gscale,
                                             const u16* __restrict__ lut,
                                             const u16* __restrict__ x, u16* __restrict__ y, int n,
                                             int k, const int* __restrict__ ids, int P, int E,
                                             int in_div, int* __restrict__ bad, float post,
                                             const float* __restrict__ logits = 0,
                                             const u8* __restrict__ next_wp = 0,
                                             const u8* __restrict__ next_ws = 0) {
    extern __shared__ float red[];
    __shared__ TokenMap tm;
    __shared__ unsigned char present[DIRECT ? 1 : MOE_MAX_EXPERTS];
    __shared__ int s_expert, s_fill;
    // DIRECT with logits (one token): the block takes the router's top-k itself.
    __shared__ __align__(16) float r_prob[DIRECT ? MOE_ROUTER_MAX_EXPERTS : 4];
    __shared__ float r_selp[DIRECT ? 16 : 1];
    __shared__ int r_selid[DIRECT ? 16 : 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    pdl_enter();
    if (DIRECT && logits != 0) {
        moe_topk_from_logits(logits, E, P, r_prob, r_selp, r_selid);
        trace_mark();
    }
    const size_t wbytes = (size_t)n * (k >> 1);
    const size_t sbytes = (size_t)n * (FMT == FMT_NVFP4 ? (k >> 4) : (k >> 5));
    const int inter = n / 2;
    // Row tiles: grouped blocks loop over tiles blockIdx.x, + gridDim.x, ... of their expert
    // (one routing prologue for several tiles); direct blocks take one.
    const int row_step = EPI == EPI_SWIGLU ? 16 : 16 * MT;
    const int row0 = blockIdx.x * row_step;
    const int tstride = EPI == EPI_SWIGLU ? inter : 16;
    const int lim = EPI == EPI_SWIGLU ? inter : n;
    const SharedTokens tok{&tm};
    if (DIRECT) {
        if (warp == 0) {
            for (int i = lane; i < 8 * TN; i += 32) {
                tm.in_row[i] = -1;
                tm.out_row[i] = -1;
            }
            __syncwarp();
            if (lane == 0) {
                const int p = blockIdx.y;
                const int e = logits != 0 ? r_selid[p] : ids[p];
                s_expert = e >= 0 && e < E ? e : -1;
                tm.in_row[0] = p / in_div;
                tm.out_row[0] = p;
            }
            if (bad != 0 && logits == 0 && blockIdx.x == 0 && blockIdx.y == 0)
                count_bad_ids(ids, P, E, bad);
        }
        __syncthreads();
        const int e = s_expert;
        if (e < 0) return;
        fp4_tile<FMT, MT, TN, G, EPI>(wp + (size_t)e * wbytes, ws + (size_t)e * sbytes, gscale[e],
                                      post, lut, x, y, n, k, row0, tstride, lim, tok, red);
        // The down projection's weights of this block's expert (`next_wp`: [E][k][n / 4] bytes,
        // `next_ws` its scales; the SwiGLU gate/up's n = 2 * inter, k = hidden): each of the
        // expert's row-tile blocks asks L2 for its share once its own loads are done, so the
        // down kernel after it reads them from L2 (asked at a block's start, such prefetches
        // queue ahead of the block's own loads).
        if (EPI == EPI_SWIGLU && next_wp != 0 && threadIdx.x == 0) {
            const size_t dw = (size_t)k * (n >> 2);
            const size_t ds = (size_t)k * (FMT == FMT_NVFP4 ? (n >> 5) : (n >> 6));
            L2Ranges r = {};
            r.ptr[0] = (u64)(next_wp + (size_t)e * dw);
            r.bytes[0] = dw;
            r.ptr[1] = (u64)(next_ws + (size_t)e * ds);
            r.bytes[1] = ds;
            prefetch_l2_share(r, blockIdx.x, gridDim.x);
        }
        return;
    }
    const int e = moe_slot_expert(ids, P, E, blockIdx.y, present, &s_expert);
    if (warp == 0 && bad != 0 && blockIdx.x == 0 && blockIdx.y == 0) count_bad_ids(ids, P, E, bad);
    if (e < 0) return;
    int pos = 0;  // warp 0's cursor in ids
    while (true) {
        if (warp == 0) {
            const int fill = moe_collect_pairs(ids, P, e, in_div, 8 * TN, tm.in_row, tm.out_row, pos);
            for (int i = fill + lane; i < 8 * TN; i += 32) {
                tm.in_row[i] = -1;
                tm.out_row[i] = -1;
            }
            if (lane == 0) s_fill = fill;
        }
        __syncthreads();
        if (s_fill == 0) break;
        for (int r0 = row0; r0 < lim; r0 += gridDim.x * row_step) {
            fp4_tile<FMT, MT, TN, G, EPI>(wp + (size_t)e * wbytes, ws + (size_t)e * sbytes,
                                          gscale[e], post, lut, x, y, n, k, r0, tstride, lim, tok,
                                          red);
            __syncthreads();  // the reduction is done with red (and tm) before the next use
        }
    }
}


// One token's down projection with the weighted top-k combine fused in (moe.rs, tokens == 1):
//   out[r] = bf16( sum_j w[j] * (W[ids[j]] row r . act[j]) * post / gscale[ids[j]] ), j in order
// (pairs with an invalid id contribute nothing). Block = S warps and 16 output rows, SPLIT
// warps per pair (S a multiple of it): warp s takes pairs s / SPLIT, s / SPLIT + S / SPLIT, ...
// and of each the K chunks of its share (groups s % SPLIT, s % SPLIT + SPLIT, ...), so each
// pair's own scale multiplies its own accumulators; the warps' sums are added in warp order:
// deterministic for a given SPLIT, no atomics. A split shortens each warp's chain of dependent
// load rounds (768 of K, six chunks: three two-chunk rounds with one warp per pair; with two,
// chunks 0-1 and 4-5 for one warp, 2-3 for the other). SPLIT is a template argument: as a kernel
// argument it cost the one-warp kernel ~3.5 % of a Qwen3-30B-A3B decode step
// (docs/kernels-notes.md round 21).
struct OneToken {
    int row;
    __device__ __forceinline__ int in_row(int i) const { return i == 0 ? row : -1; }
    __device__ __forceinline__ int out_row(int i) const { return in_row(i); }
};

template <int FMT, int G, bool FOLD = false, int SPLIT = 1>
__device__ __forceinline__ void fp4_moe_down_t1_body(
    const u8* __restrict__ wp, const u8* __restrict__ ws, const float* __restrict__ gscale,
    const u16* __restrict__ lut, const u16* __restrict__ act, const float* __restrict__ topw,
    const int* __restrict__ ids, u16* __restrict__ out, int n, int k, int P, int E, float post,
    const u16* __restrict__ pending = 0, const Fold& fo = Fold(),
    const float* __restrict__ logits = 0, int renorm = 0) {
    extern __shared__ float red[];  // [S][16]
    __shared__ __align__(16) float r_prob[MOE_ROUTER_MAX_EXPERTS];
    __shared__ float r_selp[16];
    __shared__ int r_selid[16];
    // No pdl_enter here: fp4_accumulate waits after its first weight loads. The ids come from
    // the router, the kernel before the previous one (the gate/up projection), which has
    // finished before this grid can start; they are read through L2 (__ldcg). The activations
    // (the gate/up output) and topw are read after the wait.
    const int S = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const size_t wbytes = (size_t)n * (k >> 1);
    const size_t sbytes = (size_t)n * (FMT == FMT_NVFP4 ? (k >> 4) : (k >> 5));
    float tot_lo = 0.f, tot_hi = 0.f;  // rows g and g + 8 of token column 0 (lanes t == 0)
    // With logits (one token), the router's top-k is taken here, before the wait: the router
    // is the kernel before the previous one, as for the ids.
    if (logits != 0) moe_topk_from_logits(logits, E, P, r_prob, r_selp, r_selid);
    trace_mark();
    const int sub = warp % SPLIT;
    for (int p = warp / SPLIT; p < P; p += S / SPLIT) {
        const int e = logits != 0 ? r_selid[p] : __ldcg(ids + p);
        if (e < 0 || e >= E) continue;
        float acc[1][1][4] = {{{0.f, 0.f, 0.f, 0.f}}};
        const OneToken tok{p};
        fp4_accumulate<FMT, 1, 1, G>(wp + (size_t)e * wbytes, ws + (size_t)e * sbytes, lut, act, n,
                                     k, row0, 16, n, tok, sub * G, SPLIT * G, acc);
        const float tw = logits != 0 ? router_weight(r_selp, p, P, renorm) : topw[p];
        const float f = tw * ((1.0f / gscale[e]) * post);
        tot_lo += f * acc[0][0][0];
        tot_hi += f * acc[0][0][2];
    }
    pdl_enter();  // a warp whose pairs were all invalid has not waited yet: before any store
    if (t == 0) {
        red[warp * 16 + g] = tot_lo;
        red[warp * 16 + g + 8] = tot_hi;
    }
    __syncthreads();
    if (FOLD) {
        // Output side of a folded norm (fold.rs): v = resid + pending + bf16(sum), the order in
        // which add_rmsnorm adds a pending attention output and then this delta; the residual,
        // bf16(w * v) and the block's sum of v^2 (rows in order) instead of out.
        if (warp != 0) return;
        const int row = row0 + lane;
        float sq = 0.f;
        if (lane < 16 && row < n) {
            float sum = 0.f;
            for (int s = 0; s < S; s++) sum += red[s * 16 + lane];
            float v = fo.resid[row];
            if (pending != 0) v += bf16_to_f32(pending[row]);
            v += bf16_to_f32(f32_to_bf16(sum));
            fo.resid[row] = v;
            fo.out_h[row] = f32_to_bf16(fo.out_w[row] * v);
            sq = v * v;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
        if (lane == 0) fo.out_parts[blockIdx.x] = sq;
        trace_mark();
        return;
    }
    if (threadIdx.x < 16 && row0 + (int)threadIdx.x < n) {
        float sum = 0.f;
        for (int s = 0; s < S; s++) sum += red[s * 16 + threadIdx.x];
        out[row0 + threadIdx.x] = f32_to_bf16(sum);
    }
    trace_mark();
}

// The kernels of this file (the variants below). A unit that only needs the device functions
// above (the stage-chain probe, compile.rs STAGE_PROBE_SRC) defines MIMO_HELPERS_ONLY and
// skips their instantiation, most of this file's compile time.
#ifndef MIMO_HELPERS_ONLY
// XST: activations staged in shared memory (see stage_x; gemm.rs: Tuning::x_stage).
// LB: the most threads a block of the kernel may have (512; 64 for the staged 32-token kernels,
// which only fit the default shared memory with at most two warps, so they may hold more
// registers instead of spilling).
#define DENSE_KERNEL_EPI_LB(NAME, FMT, MT, TN, G, EPI, XST, LB)                                \
    extern "C" __global__ void __launch_bounds__(LB) NAME(                                     \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int m, \
        int n, int k, float post, int flags) {                                                   \
        fp4_dense_body<FMT, MT, TN, G, EPI, XST>(wp, ws, gs, lut, x, y, m, n, k, post, flags);   \
    }
// One-token kernels with a folded norm (Fold; fold.rs): the same body, compiled apart so that
// the kernels without one keep their code; the trailing arguments are the Fold's fields.
#define DENSE_FOLD_KERNEL(NAME, FMT, MT, G, EPI)                                                \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                    \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int m, \
        int n, int k, float post, int flags, const float* in_parts, int in_n, int in_len,        \
        float in_eps, float* resid, const float* out_w, u16* out_h, float* out_parts) {          \
        const Fold fo{in_parts, in_n, in_len, in_eps, resid, out_w, out_h, out_parts};           \
        fp4_dense_body<FMT, MT, 1, G, EPI, false, true>(wp, ws, gs, lut, x, y, m, n, k, post,    \
                                                        flags, fo);                              \
    }
#define DENSE_KERNEL_EPI(NAME, FMT, MT, TN, G, EPI, XST) \
    DENSE_KERNEL_EPI_LB(NAME, FMT, MT, TN, G, EPI, XST, 512)
#define DENSE_KERNEL(NAME, FMT, MT, TN, G) DENSE_KERNEL_EPI(NAME, FMT, MT, TN, G, EPI_STORE, false)
#define DENSE_KERNEL_XS(NAME, FMT, MT, TN, G) DENSE_KERNEL_EPI(NAME, FMT, MT, TN, G, EPI_STORE, true)

// TN: token tiles per pass (8 pairs each): 2 for the grouped kernels, 1 for the direct ones and
// the grouped *_p8 ones (fewer registers where experts see few pairs each).
#define MOE_KERNEL_TN(NAME, FMT, MT, TN, G, EPI, DIRECT)                                        \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                     \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int n, \
        int k, const int* ids, int P, int E, int in_div, int* bad, float post) {                  \
        fp4_moe_body<FMT, MT, TN, G, EPI, DIRECT>(wp, ws, gs, lut, x, y, n, k, ids, P,         \
                                                             E, in_div, bad, post);               \
    }
#define MOE_KERNEL(NAME, FMT, MT, G, EPI, DIRECT) \
    MOE_KERNEL_TN(NAME, FMT, MT, DIRECT ? 1 : 2, G, EPI, DIRECT)

// The one-token kernels take the router's logits last (null: its top-k ids and weights).
// SPLIT: warps per pair (top_k x SPLIT warps per block, at most 16).
#define MOE_DOWN_T1_KERNEL(NAME, FMT, G, SPLIT)                                                 \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                     \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* act,             \
        const float* topw, const int* ids, u16* out, int n, int k, int P, int E, float post,     \
        const float* logits, int renorm) {                                                       \
        fp4_moe_down_t1_body<FMT, G, false, SPLIT>(wp, ws, gs, lut, act, topw, ids, out, n, k, P, \
                                                   E, post, 0, Fold(), logits, renorm);          \
    }
#define MOE_T1_KERNEL(NAME, FMT)                                                                 \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                     \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* x, u16* y, int n, \
        int k, const int* ids, int P, int E, int in_div, int* bad, float post,                   \
        const float* logits, const u8* next_wp, const u8* next_ws) {                            \
        fp4_moe_body<FMT, 2, 1, 1, EPI_SWIGLU, true>(wp, ws, gs, lut, x, y, n, k, ids, P, E,   \
                                                     in_div, bad, post, logits, next_wp,         \
                                                     next_ws);                                   \
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

// fp4_gemm_sw_{nv,mx}_t{TN}_g{G}: dense [gate | up] product with the SwiGLU epilogue
// (EPI_SWIGLU_BF16, two row tiles; gemm.rs: fp4_gemm_swiglu).
#define GATED_VARIANTS(FMTNAME, FMT)                                                      \
    DENSE_KERNEL_EPI(fp4_gemm_sw_##FMTNAME##_t1_g1, FMT, 2, 1, 1, EPI_SWIGLU_BF16, false) \
    DENSE_KERNEL_EPI(fp4_gemm_sw_##FMTNAME##_t1_g2, FMT, 2, 1, 2, EPI_SWIGLU_BF16, false) \
    DENSE_KERNEL_EPI(fp4_gemm_sw_##FMTNAME##_t2_g1, FMT, 2, 2, 1, EPI_SWIGLU_BF16, false) \
    DENSE_KERNEL_EPI(fp4_gemm_sw_##FMTNAME##_t4_g1, FMT, 2, 4, 1, EPI_SWIGLU_BF16, false)

GATED_VARIANTS(nv, FMT_NVFP4)
GATED_VARIANTS(mx, FMT_MXFP4)

// fp4_gemm_{nv,mx}_m{MT}_t1_g{G}_fold and fp4_gemm_sw_{nv,mx}_t1_g{G}_fold: the one-token shapes
// with a folded norm (gemm.rs: fold_kernel_name).
#define FOLD_VARIANTS(FMTNAME, FMT)                                                   \
    DENSE_FOLD_KERNEL(fp4_gemm_##FMTNAME##_m1_t1_g1_fold, FMT, 1, 1, EPI_STORE)       \
    DENSE_FOLD_KERNEL(fp4_gemm_##FMTNAME##_m1_t1_g2_fold, FMT, 1, 2, EPI_STORE)       \
    DENSE_FOLD_KERNEL(fp4_gemm_##FMTNAME##_m2_t1_g1_fold, FMT, 2, 1, EPI_STORE)       \
    DENSE_FOLD_KERNEL(fp4_gemm_##FMTNAME##_m2_t1_g2_fold, FMT, 2, 2, EPI_STORE)       \
    DENSE_FOLD_KERNEL(fp4_gemm_sw_##FMTNAME##_t1_g1_fold, FMT, 2, 1, EPI_SWIGLU_BF16) \
    DENSE_FOLD_KERNEL(fp4_gemm_sw_##FMTNAME##_t1_g2_fold, FMT, 2, 2, EPI_SWIGLU_BF16)

FOLD_VARIANTS(nv, FMT_NVFP4)
FOLD_VARIANTS(mx, FMT_MXFP4)

// The one-token shape of products too wide for the placement padding (the lm_head: more than
// 16 blocks per SM), compiled apart so that it keeps the driver's shared-memory carveout while
// the other kernels ask for placement.rs's (gemm.rs: dense_product).
DENSE_KERNEL(fp4_gemm_nv_m2_t1_g2_wide, FMT_NVFP4, 2, 1, 2)
DENSE_KERNEL(fp4_gemm_mx_m2_t1_g2_wide, FMT_MXFP4, 2, 1, 2)

// fp4_gemm_sw_{nv,mx}_t2_g1_xs: the gated 16-token variant with staged activations (the
// automatic shape never stages 32 tokens).
DENSE_KERNEL_EPI(fp4_gemm_sw_nv_t2_g1_xs, FMT_NVFP4, 2, 2, 1, EPI_SWIGLU_BF16, true)
DENSE_KERNEL_EPI(fp4_gemm_sw_mx_t2_g1_xs, FMT_MXFP4, 2, 2, 1, EPI_SWIGLU_BF16, true)

// fp4_gemm_{nv,mx}_m{MT}_t{TN}_g{G}_xs: the 16- and 32-token variants with staged activations.
#define XS_VARIANTS(FMTNAME, FMT)                                \
    DENSE_KERNEL_XS(fp4_gemm_##FMTNAME##_m1_t2_g1_xs, FMT, 1, 2, 1) \
    DENSE_KERNEL_XS(fp4_gemm_##FMTNAME##_m1_t2_g2_xs, FMT, 1, 2, 2) \
    DENSE_KERNEL_XS(fp4_gemm_##FMTNAME##_m2_t2_g1_xs, FMT, 2, 2, 1) \
    DENSE_KERNEL_XS(fp4_gemm_##FMTNAME##_m2_t2_g2_xs, FMT, 2, 2, 2) \
    DENSE_KERNEL_EPI_LB(fp4_gemm_##FMTNAME##_m1_t4_g1_xs, FMT, 1, 4, 1, EPI_STORE, true, 64) \
    DENSE_KERNEL_EPI_LB(fp4_gemm_##FMTNAME##_m2_t4_g1_xs, FMT, 2, 4, 1, EPI_STORE, true, 64)

XS_VARIANTS(nv, FMT_NVFP4)
XS_VARIANTS(mx, FMT_MXFP4)

// fp4_moe_{nv,mx}_g{G}: plain grouped product (down projection);
// fp4_moe_{nv,mx}_g1_swiglu: gate/up projection with SwiGLU in the epilogue (one chunk per
// group: with two it spills registers).
MOE_KERNEL(fp4_moe_nv_g1, FMT_NVFP4, 1, 1, EPI_STORE, false)
MOE_KERNEL(fp4_moe_nv_g2, FMT_NVFP4, 1, 2, EPI_STORE, false)
MOE_KERNEL(fp4_moe_nv_g1_swiglu, FMT_NVFP4, 2, 1, EPI_SWIGLU, false)
MOE_KERNEL(fp4_moe_mx_g1, FMT_MXFP4, 1, 1, EPI_STORE, false)
MOE_KERNEL(fp4_moe_mx_g2, FMT_MXFP4, 1, 2, EPI_STORE, false)
MOE_KERNEL(fp4_moe_mx_g1_swiglu, FMT_MXFP4, 2, 1, EPI_SWIGLU, false)
// The same with 8 pairs per pass over an expert (*_p8).
MOE_KERNEL_TN(fp4_moe_nv_g1_p8, FMT_NVFP4, 1, 1, 1, EPI_STORE, false)
MOE_KERNEL_TN(fp4_moe_nv_g2_p8, FMT_NVFP4, 1, 1, 2, EPI_STORE, false)
MOE_KERNEL_TN(fp4_moe_nv_g1_swiglu_p8, FMT_NVFP4, 2, 1, 1, EPI_SWIGLU, false)
MOE_KERNEL_TN(fp4_moe_mx_g1_p8, FMT_MXFP4, 1, 1, 1, EPI_STORE, false)
MOE_KERNEL_TN(fp4_moe_mx_g2_p8, FMT_MXFP4, 1, 1, 2, EPI_STORE, false)
MOE_KERNEL_TN(fp4_moe_mx_g1_swiglu_p8, FMT_MXFP4, 2, 1, 1, EPI_SWIGLU, false)
// One token (moe.rs): direct gate/up + SwiGLU per pair, then down with the combine fused.
MOE_T1_KERNEL(fp4_moe_nv_g1_swiglu_t1, FMT_NVFP4)
MOE_T1_KERNEL(fp4_moe_mx_g1_swiglu_t1, FMT_MXFP4)
MOE_DOWN_T1_KERNEL(fp4_moe_down_t1_nv, FMT_NVFP4, 2, 1)
MOE_DOWN_T1_KERNEL(fp4_moe_down_t1_mx, FMT_MXFP4, 2, 1)
MOE_DOWN_T1_KERNEL(fp4_moe_down_t1_nv_s2, FMT_NVFP4, 2, 2)
MOE_DOWN_T1_KERNEL(fp4_moe_down_t1_mx_s2, FMT_MXFP4, 2, 2)
// The same with the next norm folded into its output (moe.rs `moe_down_norm_out`), compiled
// apart so that the kernels above keep their code: pending (or null), then the Fold's output
// fields.
#define MOE_DOWN_T1_FOLD_KERNEL(NAME, FMT, G, SPLIT)                                            \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                    \
        const u8* wp, const u8* ws, const float* gs, const u16* lut, const u16* act,            \
        const float* topw, const int* ids, int n, int k, int P, int E, float post,              \
        const u16* pending, float* resid, const float* out_w, u16* out_h, float* out_parts,     \
        const float* logits, int renorm) {                                                       \
        Fold fo;                                                                                \
        fo.resid = resid;                                                                       \
        fo.out_w = out_w;                                                                       \
        fo.out_h = out_h;                                                                       \
        fo.out_parts = out_parts;                                                               \
        fp4_moe_down_t1_body<FMT, G, true, SPLIT>(wp, ws, gs, lut, act, topw, ids, 0, n, k, P, E, \
                                                  post, pending, fo, logits, renorm);           \
    }
MOE_DOWN_T1_FOLD_KERNEL(fp4_moe_down_t1_nv_fold, FMT_NVFP4, 2, 1)
MOE_DOWN_T1_FOLD_KERNEL(fp4_moe_down_t1_mx_fold, FMT_MXFP4, 2, 1)
MOE_DOWN_T1_FOLD_KERNEL(fp4_moe_down_t1_nv_fold_s2, FMT_NVFP4, 2, 2)
MOE_DOWN_T1_FOLD_KERNEL(fp4_moe_down_t1_mx_fold_s2, FMT_MXFP4, 2, 2)
#endif  // MIMO_HELPERS_ONLY

// ---------------------------------------------------------------------------------------------
// One 16-byte piece (32 elements) of a weight row, for the dequantization and E4M3 conversion
// kernels below.
// ---------------------------------------------------------------------------------------------

// The block-scale values (the bf16 table as f32) of the piece starting at element pk of a row
// whose scale bytes start at srow: NVFP4 two 16-element blocks, MXFP4 one 32-element block.
template <int FMT>
__device__ __forceinline__ void piece_scales(const u8* __restrict__ srow,
                                             const u16* __restrict__ scale_lut, int pk,
                                             float (&s)[2]) {
    if (FMT == FMT_NVFP4) {
        s[0] = bf16_to_f32(scale_lut[srow[pk >> 4]]);
        s[1] = bf16_to_f32(scale_lut[srow[(pk >> 4) + 1]]);
    } else {
        s[0] = bf16_to_f32(scale_lut[srow[pk >> 5]]);
        s[1] = s[0];
    }
}

// The piece's 32 elements in order as f32 e2m1 * mult[element / 16]: e2m1x8_to_bf16 gives
// e2m1 * 2^-126 as bf16 subnormals, widened and multiplied by 2^126 (exact: no flush to zero),
// then by the multiplier once in f32 (the CPU reference's single rounding).
__device__ __forceinline__ void piece_values(uint4 w, const float (&mult)[2], float (&v)[32]) {
    const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int q = 0; q < 4; q++) {
        u32 pr[4];
        e2m1x8_to_bf16(words[q], pr[0], pr[1], pr[2], pr[3]);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            v[q * 8 + 2 * j] = __uint_as_float(pr[j] << 16) * 0x1p126f * mult[q >> 1];
            v[q * 8 + 2 * j + 1] = __uint_as_float(pr[j] & 0xFFFF0000u) * 0x1p126f * mult[q >> 1];
        }
    }
}

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
    pdl_enter();
    const size_t pieces = (size_t)n * (k >> 5);
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= pieces) return;
    const size_t row = idx / (k >> 5);
    const int pk = (int)(idx - row * (k >> 5)) * 32;
    float mult[2];
    piece_scales<FMT>(ws + row * (FMT == FMT_NVFP4 ? (k >> 4) : (k >> 5)), scale_lut, pk, mult);
    if (FMT == FMT_NVFP4) {
        // The CPU reference's order: multiplier = scale / gscale first.
        mult[0] /= gscale[0];
        mult[1] /= gscale[0];
    }
    float v[32];
    piece_values(ldg_stream(wp + row * (k >> 1) + (pk >> 1)), mult, v);
    u32 o[16];
#pragma unroll
    for (int i = 0; i < 16; i++) o[i] = f32x2_to_bf16x2(v[2 * i], v[2 * i + 1]);
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

// ---------------------------------------------------------------------------------------------
// FP8 prefill path (fp8.rs; CPU reference: src/fp8_rows.rs, same f32 operations in the same
// order, compared bit-exactly by the tests). Weights: one warp per row finds the row's largest
// block scale, picks the power-of-two shift p that puts 6 * max(s) * 2^-p in (224, 448], and
// writes e4m3(e2m1 * (s * 2^-p)) with the row scale 2^p / gscale (MXFP4: 2^p). Activations: one
// block per token row writes e4m3(x * (448 / amax)) with the row scale amax / 448. cuBLASLt then
// multiplies the E4M3 operands with both scale vectors applied in its epilogue.
// ---------------------------------------------------------------------------------------------

// Two f32 -> two E4M3 (round to nearest even, saturating to +-448): `lo` in the low byte.
__device__ __forceinline__ u16 f32x2_to_e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    // The FP8 path is only selected on sm_89 and newer (fp8.rs checks the compute capability).
    __trap();
    return 0;
#endif
}

// Smallest p with 6 * smax * 2^-p <= 448 (weight_row_shift in fp8_rows.rs).
__device__ __forceinline__ int e4m3_row_shift(float smax) {
    if (!(smax > 0.f && smax <= 3.402823466e38f)) return 0; // zero, NaN or inf rows: no shift
    int e;
    const float f = frexpf(smax, &e);
    return (6.f * f * 128.f <= 448.f) ? e - 7 : e - 6;
}

// Weight rows of block `wblock` (8 warps, one row each) to E4M3 rows with per-row scales.
template <int FMT>
__device__ __forceinline__ void fp4_to_e4m3_body(const u8* __restrict__ wp,
                                                 const u8* __restrict__ ws,
                                                 const float* __restrict__ gscale,
                                                 const u16* __restrict__ scale_lut,
                                                 u8* __restrict__ out, float* __restrict__ row_scale,
                                                 int n, int k, int wblock) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)wblock * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)n) return;
    const int bs = FMT == FMT_NVFP4 ? 16 : 32;
    const int blocks = k / bs;
    const u8* srow = ws + row * blocks;
    float smax = 0.f;
    for (int b = lane; b < blocks; b += 32) smax = fmaxf(smax, bf16_to_f32(scale_lut[srow[b]]));
#pragma unroll
    for (int o = 16; o; o >>= 1) smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, o));
    const int p = e4m3_row_shift(smax);
    if (lane == 0)
        row_scale[row] = FMT == FMT_NVFP4 ? ldexpf(1.f, p) / gscale[0] : ldexpf(1.f, p);
    const u8* prow = wp + row * (size_t)(k >> 1);
    u8* orow = out + row * (size_t)k;
    for (int pk = lane * 32; pk < k; pk += 32 * 32) {
        // The shifted block scales times e2m1: exact in f32, then rounded once to E4M3.
        float mult[2];
        piece_scales<FMT>(srow, scale_lut, pk, mult);
        mult[0] = ldexpf(mult[0], -p);
        mult[1] = ldexpf(mult[1], -p);
        float v[32];
        piece_values(ldg_stream(prow + (pk >> 1)), mult, v);
        u32 o[8];
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = (u32)f32x2_to_e4m3x2(v[4 * i], v[4 * i + 1]) |
                   ((u32)f32x2_to_e4m3x2(v[4 * i + 2], v[4 * i + 3]) << 16);
        uint4* dst = (uint4*)(orow + pk);
        dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
        dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
    }
}

extern "C" __global__ void fp4_to_e4m3_rows_nv(const u8* wp, const u8* ws, const float* gs,
                                               const u16* lut, u8* out, float* row_scale, int n,
                                               int k) {
    pdl_enter();
    fp4_to_e4m3_body<FMT_NVFP4>(wp, ws, gs, lut, out, row_scale, n, k, blockIdx.x);
}
extern "C" __global__ void fp4_to_e4m3_rows_mx(const u8* wp, const u8* ws, const float* gs,
                                               const u16* lut, u8* out, float* row_scale, int n,
                                               int k) {
    pdl_enter();
    fp4_to_e4m3_body<FMT_MXFP4>(wp, ws, gs, lut, out, row_scale, n, k, blockIdx.x);
}

// The largest |value| of a 16-byte piece of 8 bf16 values and `amax`.
__device__ __forceinline__ float piece_amax(uint4 v, float amax) {
    const u32 wv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        amax = fmaxf(amax, fabsf(__uint_as_float(wv[j] << 16)));
        amax = fmaxf(amax, fabsf(__uint_as_float(wv[j] & 0xFFFF0000u)));
    }
    return amax;
}

// A 16-byte piece of 8 bf16 values times `inv` as 8 E4M3 codes.
__device__ __forceinline__ uint2 piece_to_e4m3(uint4 v, float inv) {
    const u32 wv[4] = {v.x, v.y, v.z, v.w};
    u32 h[4];
#pragma unroll
    for (int j = 0; j < 4; j++)
        h[j] = f32x2_to_e4m3x2(__uint_as_float(wv[j] << 16) * inv,
                               __uint_as_float(wv[j] & 0xFFFF0000u) * inv);
    return make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
}

// Token row `row` of x (k a multiple of 16: 16-byte rows of E4M3) by one block of 256 threads.
__device__ __forceinline__ void bf16_row_to_e4m3(const u16* __restrict__ x, u8* __restrict__ q,
                                                 float* __restrict__ row_scale, int k,
                                                 size_t row) {
    __shared__ float red[8];
    const uint4* xr = (const uint4*)(x + row * (size_t)k);
    const int chunks = k >> 3; // 8 bf16 per 16-byte load
    float amax = 0.f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        amax = piece_amax(xr[c], amax);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) amax = fmaxf(amax, red[w]);
    const float inv = amax > 0.f ? 448.f / amax : 1.f;
    if (threadIdx.x == 0) row_scale[row] = amax > 0.f ? amax / 448.f : 1.f;
    uint2* qr = (uint2*)(q + row * (size_t)k);
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        qr[c] = piece_to_e4m3(xr[c], inv);
    }
}

extern "C" __global__ void bf16_rows_to_e4m3(const u16* __restrict__ x, u8* __restrict__ q,
                                             float* __restrict__ row_scale, int k) {
    pdl_enter();
    bf16_row_to_e4m3(x, q, row_scale, k, blockIdx.x);
}

// Token row `row` of x by one warp (the same bytes as bf16_row_to_e4m3): for short rows, where
// a 256-thread block would leave most of its threads idle (k = 768: 96 pieces of 8 values).
__device__ __forceinline__ void bf16_row_to_e4m3_warp(const u16* __restrict__ x,
                                                      u8* __restrict__ q,
                                                      float* __restrict__ row_scale, int k,
                                                      size_t row) {
    const int lane = threadIdx.x & 31;
    const uint4* xr = (const uint4*)(x + row * (size_t)k);
    const int chunks = k >> 3;
    float amax = 0.f;
    for (int c = lane; c < chunks; c += 32) {
        amax = piece_amax(xr[c], amax);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float inv = amax > 0.f ? 448.f / amax : 1.f;
    if (lane == 0) row_scale[row] = amax > 0.f ? amax / 448.f : 1.f;
    uint2* qr = (uint2*)(q + row * (size_t)k);
    for (int c = lane; c < chunks; c += 32) {
        qr[c] = piece_to_e4m3(xr[c], inv);
    }
}

// Both operands of an FP8 product in one launch (fp8.rs `fp8_operands`): blocks [0, wblocks)
// convert the weight's rows as fp4_to_e4m3_rows_*, the blocks after them the m activation rows,
// `xrows` per block (1: a block per row, as bf16_rows_to_e4m3; 8: a warp per row), the same
// bytes as the two launches for one launch boundary less.
template <int FMT>
__device__ __forceinline__ void fp8_operands_body(const u8* wp, const u8* ws, const float* gs,
                                                  const u16* lut, u8* wq, float* wscale, int n,
                                                  int k, const u16* x, u8* xq, float* xscale,
                                                  int m, int xrows) {
    pdl_enter();
    const int wblocks = (n + (blockDim.x >> 5) - 1) / (blockDim.x >> 5);
    if ((int)blockIdx.x < wblocks) {
        fp4_to_e4m3_body<FMT>(wp, ws, gs, lut, wq, wscale, n, k, blockIdx.x);
    } else if (xrows == 1) {
        bf16_row_to_e4m3(x, xq, xscale, k, blockIdx.x - wblocks);
    } else {
        const size_t row = (size_t)(blockIdx.x - wblocks) * xrows + (threadIdx.x >> 5);
        if (row < (size_t)m) bf16_row_to_e4m3_warp(x, xq, xscale, k, row);
    }
}
extern "C" __global__ void fp8_operands_nv(const u8* wp, const u8* ws, const float* gs,
                                           const u16* lut, u8* wq, float* wscale, int n, int k,
                                           const u16* x, u8* xq, float* xscale, int m,
                                           int xrows) {
    fp8_operands_body<FMT_NVFP4>(wp, ws, gs, lut, wq, wscale, n, k, x, xq, xscale, m, xrows);
}
extern "C" __global__ void fp8_operands_mx(const u8* wp, const u8* ws, const float* gs,
                                           const u16* lut, u8* wq, float* wscale, int n, int k,
                                           const u16* x, u8* xq, float* xscale, int m,
                                           int xrows) {
    fp8_operands_body<FMT_MXFP4>(wp, ws, gs, lut, wq, wscale, n, k, x, xq, xscale, m, xrows);
}

// Plain 16-byte-per-thread grid-stride copy: measures the copy bandwidth the kernels are held to.
extern "C" __global__ void util_copy_u4(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                        unsigned long long n) {
    pdl_enter();
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
