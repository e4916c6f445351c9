// One token through a whole FP4 MoE layer in one launch (moe.rs `Tuning::moe_fused`):
// gate/up + SwiGLU of every (token, expert) pair, then the down projection and the weighted
// combine, as two phases of one grid separated by a grid-wide barrier.
//
// Why: the two-launch path (fp4_moe_*_swiglu_t1, then fp4_moe_down_t1_*) pays a launch boundary
// and the down kernel's whole load round after it: its blocks are placed only as the gate/up
// blocks drain, and its ~7 MB (Qwen3-30B-A3B) stream starts after the gate/up's has ended
// (docs/kernels-notes.md rounds 6 and 12: 15.7 us for 21 MB, 48 % of copy bandwidth). Here each
// block owns one 16-row tile of the down projection from the start: right after the routing it
// has the copy engine bring its down rows of every chosen expert into shared memory (two bulk
// copies per pair) and issues its gate/up weights into registers, so both streams are in
// flight together and the phase after the barrier reads no weight from DRAM.
//
// Grid: exactly hidden / 16 blocks of W = 16 or 8 warps, all resident at once (moe.rs checks the
// occupancy before choosing this kernel; a block that is not resident would never let the
// barrier open). Block b:
//   phase A: gate/up tiles b, b + B, ... of the P x ceil(inter / 16) tiles (16 gate rows and the
//            matching 16 up rows of one pair's expert); item (tile, K chunk) i goes to warp
//            i % W, each item's partial sums to shared memory, summed per row in chunk order;
//            SwiGLU rows to act[P][inter]. The input row and the scale multiplier table are
//            copied to shared memory first, so no product waits on an L2 read of its own.
//   barrier: every block's act rows written and visible (cooperative-groups style: block
//            barrier, one thread's fence + arrival + acquire spin, block barrier).
//   phase B: output rows [16b, 16b + 16): act (every pair's row, copied through L2 into shared
//            memory once) times the experts' down rows in shared memory, each item (pair,
//            K chunk) on warp i % W, scaled by the routing weight; warps summed in order:
//            deterministic, no atomics.
// Invalid expert ids (ids path) contribute nothing and are counted in bad[0].

// Gate/up items (tile, K chunk) a warp holds in registers at once: one round (3 for
// Qwen3-30B-A3B with 16 warps: 384 tiles x 16 chunks over 128 blocks); with 8 warps two rounds.
#define FUSED_ROUND 3
// Phase A item partials a block holds (moe.rs takes the kernel only where they suffice).
#define FUSED_MAX_BLOCK_ITEMS 64
#define FUSED_MAX_PAIRS 16

// Grid barrier on a 64-bit arrival count that only grows (zero before the first launch; moe.rs
// zeroes it again where a workspace's launches change their block count): thread 0 of each
// block adds one with release semantics after a block barrier (so the block's writes come
// first, as in CUTLASS's GenericBarrier) and spins with acquire loads until the count reaches
// the end of this launch's round of arrivals. One atomic per block and no reset: the last
// block's arrival itself opens the barrier. Every block of the grid must be resident.
__device__ __forceinline__ void fused_grid_barrier(unsigned long long* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned long long nb = gridDim.x;
        unsigned long long old, now;
        asm volatile("atom.add.release.gpu.u64 %0, [%1], %2;"
                     : "=l"(old)
                     : "l"(bar), "l"(1ull)
                     : "memory");
        const unsigned long long target = (old / nb + 1) * nb;
        do {
            asm volatile("ld.acquire.gpu.u64 %0, [%1];" : "=l"(now) : "l"(bar) : "memory");
        } while (now < target);
    }
    __syncthreads();
}

// The kernel's dynamic shared memory, each part 16-byte aligned: the down rows of every pair
// ([P][16][inter / 2] bytes of weights, then [P][16][scale bytes per row]), the input row
// ([hidden] bf16), the two scale multiplier tables (256 bf16 each, gate/up then down), act
// ([P][inter] bf16), phase A's item partials ([FUSED_MAX_BLOCK_ITEMS][32] floats), phase B's
// warp sums ([W][16] floats). moe.rs `fused_smem` computes the same size.
// `bytes` (a multiple of 16) from global to shared memory by the copy engine, completing on the
// mbarrier `bar` (fp4_bulk.cu's helpers): one instruction for a whole block of rows, where 16-byte
// cp.async pieces would queue behind the weight loads in every thread.
__device__ __forceinline__ void bulk_load_1d(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(dst),
        "l"(src), "r"(bytes), "r"(bar)
        : "memory");
}

template <int FMT, bool FOLD, int W>
__device__ __forceinline__ void fp4_moe_fused_body(
    const u8* __restrict__ gwp, const u8* __restrict__ gws, const float* __restrict__ ggs,
    const u16* __restrict__ glut, const u8* __restrict__ dwp, const u8* __restrict__ dws,
    const float* __restrict__ dgs, const u16* __restrict__ dlut, const u16* x, u16* act,
    const float* __restrict__ topw, const int* __restrict__ ids, u16* out, int hidden, int inter,
    int P, int E, float gpost, float dpost, const float* __restrict__ logits, int renorm,
    int* __restrict__ bad, unsigned long long* bar, const u16* __restrict__ pending,
    const Fold& fo) {
    extern __shared__ __align__(16) unsigned char fsm[];
    __shared__ __align__(16) float r_prob[MOE_ROUTER_MAX_EXPERTS];
    __shared__ float r_selp[FUSED_MAX_PAIRS];
    __shared__ int r_selid[FUSED_MAX_PAIRS];
    __shared__ int s_e[FUSED_MAX_PAIRS];
    __shared__ float s_gs[FUSED_MAX_PAIRS];  // gate/up: post / global scale
    __shared__ float s_w[FUSED_MAX_PAIRS];   // down: routing weight * post / global scale
    __shared__ __align__(8) u64 s_down_bar;  // the down rows' copies
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int B = gridDim.x, b = blockIdx.x;

    // Shared memory: the layout above.
    const int kbd = inter >> 1;
    const int bpd = FMT == FMT_NVFP4 ? (inter >> 4) : (inter >> 5);
    const auto up16 = [](size_t v) { return (v + 15) & ~(size_t)15; };
    u8* wsm = fsm;
    u8* ssm = wsm + (size_t)P * 16 * kbd;
    u16* xsm = (u16*)(ssm + up16((size_t)P * 16 * bpd));
    u16* glut_sm = xsm + ((hidden + 7) & ~7);
    u16* dlut_sm = glut_sm + 256;
    u16* asm_ = dlut_sm + 256;
    float* red_a = (float*)((u8*)asm_ + up16((size_t)P * inter * 2));
    float* red_b = red_a + FUSED_MAX_BLOCK_ITEMS * 32;

    const u32 down_bar = smem_addr(&s_down_bar);
    if (threadIdx.x == 0) {
        mbar_init(down_bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    // Routing (after the wait: the ids, weights or logits come from the kernel before).
    pdl_enter();
    // Group 0, before the routing (x comes from the kernel before, so after the wait): the
    // input row and the two multiplier tables, which every product needs first; behind the
    // weight loads they would arrive last.
    for (int q = threadIdx.x; q < hidden / 8 + 64; q += blockDim.x) {
        const int l = q - hidden / 8;  // piece of the two tables
        if (l < 0) {
            cp_async16_to(smem_addr(xsm + 8 * q), x + 8 * q, true);
        } else if (l < 32) {
            cp_async16_to(smem_addr(glut_sm + 8 * l), glut + 8 * l, true);
        } else {
            cp_async16_to(smem_addr(dlut_sm + 8 * (l - 32)), dlut + 8 * (l - 32), true);
        }
    }
    cp_async_commit();
    if (logits != 0) moe_topk_from_logits(logits, E, P, r_prob, r_selp, r_selid);
    // Thread p < P: its pair's expert, and the scales its products need after phase A (loaded
    // now, stored to shared memory once phase A is computed: no wait on them before).
    float p_w = 0.f, p_gs = 1.f, p_ds = 1.f;
    bool p_ok = false;
    if (threadIdx.x < P) {
        const int p = threadIdx.x;
        const int e = logits != 0 ? r_selid[p] : ids[p];
        p_ok = e >= 0 && e < E;
        s_e[p] = p_ok ? e : -1;
        p_w = logits != 0 ? router_weight(r_selp, p, P, renorm) : topw[p];
        if (p_ok) {
            p_gs = ggs[e];
            p_ds = dgs[e];
        }
    }
    if (bad != 0 && logits == 0 && b == 0 && warp == 0) count_bad_ids(ids, P, E, bad);
    cp_async_wait<0>();  // the input row and tables (asked for before the routing)
    __syncthreads();
    trace_mark();
    // The down rows [16b, 16b + 16) of every pair's expert (contiguous: 16 rows of weights, 16
    // of scale bytes), copied by the copy engine under phase A; phase B waits on the mbarrier.
    if (threadIdx.x == 0) {
        const u32 wbytes = 16u * (u32)(inter >> 1);
        const u32 sbytes = 16u * (u32)(FMT == FMT_NVFP4 ? (inter >> 4) : (inter >> 5));
        u32 total = 0;
        for (int p = 0; p < P; p++) total += s_e[p] >= 0 ? wbytes + sbytes : 0;
        mbar_expect_tx(down_bar, total);
        for (int p = 0; p < P; p++) {
            const int e = s_e[p];
            if (e < 0) continue;
            const size_t row = (size_t)e * hidden + 16 * b;
            bulk_load_1d(smem_addr(fsm + (size_t)p * wbytes), dwp + row * (wbytes / 16), wbytes,
                         down_bar);
            bulk_load_1d(smem_addr(fsm + (size_t)P * wbytes + (size_t)p * sbytes),
                         dws + row * (sbytes / 16), sbytes, down_bar);
        }
    }

    // Phase A: this warp's items, every weight load issued before the first is used.
    const int kb = hidden >> 1;
    const int bpr = FMT == FMT_NVFP4 ? (hidden >> 4) : (hidden >> 5);
    const size_t gwbytes = (size_t)(2 * inter) * kb;
    const size_t gsbytes = (size_t)(2 * inter) * bpr;
    const int C = (hidden + 127) >> 7;      // K chunks of a gate/up tile
    const int TR = (inter + 15) >> 4;       // gate/up tiles per pair
    const int T = P * TR;
    const int nt = b < T ? (T - b + B - 1) / B : 0;  // this block's tiles
    const int items = nt * C;
    // Item i's gate/up weights into registers (nothing where its pair has no expert).
    const auto load_item = [&](int i, WeightRegs<2, 1>& r) {
        const int tl = i / C, c = i - tl * C;
        const int gt = b + tl * B;
        const int p = gt / TR, row0 = (gt - p * TR) * 16;
        const int e = s_e[p];
        if (e < 0) return;
        const u8* wp = gwp + (size_t)e * gwbytes;
        const u8* ws = gws + (size_t)e * gsbytes;
        const u8* wptr[2][2];
        const u8* sptr[2][2];
#pragma unroll
        for (int m = 0; m < 2; m++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int l = g + 8 * h;
                // Gate tile m = 0 rows row0 + l, up tile m = 1 the same rows + inter; rows past
                // the expert's width read the tile's first row (never stored).
                const int r = m * inter + (row0 + l < inter ? row0 + l : row0);
                wptr[m][h] = wp + (size_t)r * kb + c * 64 + t * 16;
                sptr[m][h] = ws + (size_t)r * bpr + (FMT == FMT_NVFP4 ? c * 8 + t * 2 : c * 4 + t);
            }
        load_weights<FMT, 2, 1>(wptr, sptr, c * 128 + t * 32, hidden, r);
    };
    WeightRegs<2, 1> wr[FUSED_ROUND];
#pragma unroll
    for (int j = 0; j < FUSED_ROUND; j++)
        if (warp + W * j < items) load_item(warp + W * j, wr[j]);
    trace_mark();  // phase A's weight loads issued

    // Phase A products: each item's 16 gate and 16 up rows (token column 0, lanes t == 0), the
    // activation fragments and multipliers from shared memory (compute_chunks' XL = 1 form);
    // rounds of FUSED_ROUND items, the next round's loads issued once this one is computed.
    for (int base = 0; base < items; base += W * FUSED_ROUND) {
#pragma unroll
        for (int j = 0; j < FUSED_ROUND; j++) {
            const int i = base + warp + W * j;
            if (i >= items) continue;
            const int tl = i / C, c = i - tl * C;
            const int p = (b + tl * B) / TR;
            if (s_e[p] >= 0) {
                const int kp = c * 128 + t * 32;
                const int xk = kp < hidden ? kp : 0;  // as in phase B
                const int xo[4] = {xk, xk + 8, xk + 16, xk + 24};
                const u16* const xrow[1] = {x};
                float acc[2][1][4];
                zero_acc(acc);
                compute_chunks<FMT, 2, 1, 1, true, 1>(wr[j], xrow, kp, hidden, glut_sm, acc, xsm,
                                                      xo);
                if (t == 0) {
                    float* r = red_a + i * 32;
                    r[g] = acc[0][0][0];
                    r[g + 8] = acc[0][0][2];
                    r[16 + g] = acc[1][0][0];
                    r[24 + g] = acc[1][0][2];
                }
            }
            // The next round's item in this register set, whether or not this one had an
            // expert (an invalid pair's item must not skip the load of a valid one after it).
            const int nxt = i + W * FUSED_ROUND;
            if (nxt < items) load_item(nxt, wr[j]);
        }
    }
    if (threadIdx.x < P) {
        s_gs[threadIdx.x] = p_ok ? (1.0f / p_gs) * gpost : 0.f;
        s_w[threadIdx.x] = p_ok ? p_w * ((1.0f / p_ds) * dpost) : 0.f;
    }
    __syncthreads();
    trace_mark();
    // SwiGLU rows of this block's tiles: the items' partials summed in chunk order.
    for (int r = threadIdx.x; r < nt * 16; r += blockDim.x) {
        const int tl = r >> 4, l = r & 15;
        const int gt = b + tl * B;
        const int p = gt / TR, row = (gt - p * TR) * 16 + l;
        const int e = s_e[p];
        if (e < 0 || row >= inter) continue;
        float gate = 0.f, up = 0.f;
        for (int c = 0; c < C; c++) {
            gate += red_a[(tl * C + c) * 32 + l];
            up += red_a[(tl * C + c) * 32 + 16 + l];
        }
        const float s = s_gs[p];
        gate *= s;
        up *= s;
        act[(size_t)p * inter + row] = f32_to_bf16(gate / (1.0f + __expf(-gate)) * up);
    }
    // The folded output's inputs (this block's rows; no other block writes them), read before
    // the barrier so that the epilogue waits on no load.
    float f_resid = 0.f, f_pend = 0.f, f_w = 0.f;
    const int row0 = 16 * b;
    if (FOLD && warp == 0 && lane < 16 && row0 + lane < hidden) {
        f_resid = fo.resid[row0 + lane];
        if (pending != 0) f_pend = bf16_to_f32(pending[row0 + lane]);
        f_w = fo.out_w[row0 + lane];
    }
    trace_mark();
    fused_grid_barrier(bar);
    trace_mark();

    // Phase B: every pair's act row into shared memory (through L2: other blocks wrote it),
    // then item (pair, K chunk) i of the down rows on warp i % 16.
    for (int q = threadIdx.x; q < P * inter / 8; q += blockDim.x)
        cp_async16_to(smem_addr(asm_ + 8 * q), act + 8 * q, s_e[(8 * q) / inter] >= 0);
    cp_async_commit();
    cp_async_wait<0>();
    mbar_wait(down_bar, 0);
    __syncthreads();
    trace_mark();
    const int Cd = (inter + 127) >> 7;
    float tot_lo = 0.f, tot_hi = 0.f;  // rows g and g + 8 (lanes t == 0)
    for (int i = warp; i < P * Cd; i += W) {
        const int p = i / Cd, c = i - p * Cd;
        const int e = s_e[p];
        if (e < 0) continue;
        const int kp = c * 128 + t * 32;
        WeightRegs<1, 1> r;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int l = g + 8 * h;
            const u8* wrow = wsm + (size_t)(p * 16 + l) * kbd;
            const u8* srow = ssm + (size_t)(p * 16 + l) * bpd;
            if (kp < inter) {
                r.w[0][0][h] = *(const uint4*)(wrow + c * 64 + t * 16);
                r.sc[0][0][h] = FMT == FMT_NVFP4 ? (u32) * (const u16*)(srow + c * 8 + t * 2)
                                                 : (u32)srow[c * 4 + t];
            } else {
                r.w[0][0][h] = make_uint4(0, 0, 0, 0);
                r.sc[0][0][h] = 0;
            }
        }
        // A piece past K has zero weights; its fragments read the row's start (finite values:
        // past the row lie other data, where a NaN would survive the zero weights).
        const int xk = kp < inter ? kp : 0;
        const int xo[4] = {xk, xk + 8, xk + 16, xk + 24};
        const u16* const arow[1] = {act};
        float acc[1][1][4];
        zero_acc(acc);
        compute_chunks<FMT, 1, 1, 1, true, 1>(r, arow, kp, inter, dlut_sm, acc,
                                              asm_ + (size_t)p * inter, xo);
        const float f = s_w[p];
        tot_lo += f * acc[0][0][0];
        tot_hi += f * acc[0][0][2];
    }
    if (t == 0) {
        red_b[warp * 16 + g] = tot_lo;
        red_b[warp * 16 + g + 8] = tot_hi;
    }
    __syncthreads();
    if (FOLD) {
        // As fp4_moe_down_t1_body's folded output: v = resid + pending + bf16(sum).
        if (warp != 0) return;
        const int row = row0 + lane;
        float sq = 0.f;
        if (lane < 16 && row < hidden) {
            float sum = 0.f;
            for (int s = 0; s < W; s++) sum += red_b[s * 16 + lane];
            float v = f_resid;
            if (pending != 0) v += f_pend;
            v += bf16_to_f32(f32_to_bf16(sum));
            fo.resid[row] = v;
            fo.out_h[row] = f32_to_bf16(f_w * v);
            sq = v * v;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
        if (lane == 0) fo.out_parts[b] = sq;
        trace_mark();
        return;
    }
    if (threadIdx.x < 16 && row0 + (int)threadIdx.x < hidden) {
        float sum = 0.f;
        for (int s = 0; s < W; s++) sum += red_b[s * 16 + threadIdx.x];
        out[row0 + threadIdx.x] = f32_to_bf16(sum);
    }
    trace_mark();
}

// Arguments: the gate/up weight's four (packed, scales, global scales, multiplier table) and
// post, the down weight's likewise, then the input row, the act scratch, routing (top-k
// weights and ids, or logits + renorm), the invalid-id counter and the barrier; the plain
// kernels then the output row, the folded ones pending and the Fold's output fields. x may be
// the fold's out_h (the runtime passes the MoE input row, which the folded output replaces):
// it is read only before the barrier and out_h written only after it, so neither is restrict.
// W warps per block: 16 (one round of items per warp) or 8 (_w8: two rounds, half the
// registers of an SM, so the next kernel's blocks fit beside it under PDL).
#define MOE_FUSED_KERNEL(NAME, FMT, W)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * W) NAME(                                  \
        const u8* gwp, const u8* gws, const float* ggs, const u16* glut, const u8* dwp,          \
        const u8* dws, const float* dgs, const u16* dlut, const u16* x, u16* act,               \
        const float* topw, const int* ids, int hidden, int inter, int P, int E, float gpost,     \
        float dpost, const float* logits, int renorm, int* bad, unsigned long long* bar,         \
        u16* out) {                                                                              \
        fp4_moe_fused_body<FMT, false, W>(gwp, gws, ggs, glut, dwp, dws, dgs, dlut, x, act,     \
                                          topw, ids, out, hidden, inter, P, E, gpost, dpost,    \
                                          logits, renorm, bad, bar, 0, Fold());                 \
    }
#define MOE_FUSED_FOLD_KERNEL(NAME, FMT, W)                                                      \
    extern "C" __global__ void __launch_bounds__(32 * W) NAME(                                  \
        const u8* gwp, const u8* gws, const float* ggs, const u16* glut, const u8* dwp,          \
        const u8* dws, const float* dgs, const u16* dlut, const u16* x, u16* act,               \
        const float* topw, const int* ids, int hidden, int inter, int P, int E, float gpost,     \
        float dpost, const float* logits, int renorm, int* bad, unsigned long long* bar,         \
        const u16* pending, float* resid, const float* out_w, u16* out_h, float* out_parts) {    \
        Fold fo;                                                                                \
        fo.resid = resid;                                                                       \
        fo.out_w = out_w;                                                                       \
        fo.out_h = out_h;                                                                       \
        fo.out_parts = out_parts;                                                               \
        fp4_moe_fused_body<FMT, true, W>(gwp, gws, ggs, glut, dwp, dws, dgs, dlut, x, act,      \
                                         topw, ids, 0, hidden, inter, P, E, gpost, dpost,       \
                                         logits, renorm, bad, bar, pending, fo);                \
    }

MOE_FUSED_KERNEL(fp4_moe_fused_t1_nv, FMT_NVFP4, 16)
MOE_FUSED_KERNEL(fp4_moe_fused_t1_mx, FMT_MXFP4, 16)
MOE_FUSED_FOLD_KERNEL(fp4_moe_fused_t1_nv_fold, FMT_NVFP4, 16)
MOE_FUSED_FOLD_KERNEL(fp4_moe_fused_t1_mx_fold, FMT_MXFP4, 16)
MOE_FUSED_KERNEL(fp4_moe_fused_t1_nv_w8, FMT_NVFP4, 8)
MOE_FUSED_KERNEL(fp4_moe_fused_t1_mx_w8, FMT_MXFP4, 8)
MOE_FUSED_FOLD_KERNEL(fp4_moe_fused_t1_nv_fold_w8, FMT_NVFP4, 8)
MOE_FUSED_FOLD_KERNEL(fp4_moe_fused_t1_mx_fold_w8, FMT_MXFP4, 8)
