// Mixture-of-experts combine. With the grouped FP4 kernels of fp4_gemm.cu (which route
// themselves from the top-k ids and apply SwiGLU while loading) it computes one MoE layer from
// the router's top-k output on the device, without a host round trip. Also the BF16 expert
// kernels of the BF16 baseline: grouped (moe_bf16) and one-token (moe_bf16_pairs*).

// Compiled after common.cuh (typedefs, bf16 conversions, pdl_enter, ldg_stream, dot8, swiglu8).

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

// ---------------------------------------------------------------------------------------------
// Grouped BF16 expert GEMV (the BF16 baseline of the MoE layer). blockIdx.y = slot: the block
// serves the slot-th expert present in ids; 8 warps x 2 rows = 16 output rows per block
// (blockIdx.x); the expert's pairs are taken 8 at a time in pair order. Input row of pair q is
// q / in_div; with swiglu the input row is [2k] (gate, up) and silu(gate) * up is formed while
// loading (rounded to bf16 as if stored; swiglu8, common.cuh): with `stage` (dynamic shared
// memory of 8 * k bf16) once per group of pairs into shared memory, else per pair of weight rows.
// k must be a multiple of 8. y: [P][n]. One-token layers take moe_bf16_pairs below instead
// (Tuning::moe_direct).
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(256)
moe_bf16(const u16* __restrict__ w, const u16* __restrict__ x, u16* __restrict__ y, int n, int k,
         const int* __restrict__ ids, int P, int E, int in_div, int swiglu_in, int stage) {
    pdl_enter();
    extern __shared__ __align__(16) u16 acts[];  // stage: [8][k], silu(gate) * up of the group
    __shared__ unsigned char present[1024];
    __shared__ int s_expert, s_fill;
    __shared__ int in_row[8], out_row[8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e = moe_slot_expert(ids, P, E, blockIdx.y, present, &s_expert);
    if (e < 0) return;
    const u16* we = w + (size_t)e * n * k;
    const int r0 = blockIdx.x * 16 + warp * 2;
    int pos = 0;  // warp 0's cursor in ids
    while (true) {
        if (warp == 0) {
            const int fill = moe_collect_pairs(ids, P, e, in_div, 8, in_row, out_row, pos);
            if (lane == 0) s_fill = fill;
        }
        __syncthreads();
        const int fill = s_fill;
        if (fill == 0) break;
        if (stage) {
            // The group's SwiGLU rows once per block, not once per pair of weight rows.
            for (int i = threadIdx.x * 8; i < fill * k; i += blockDim.x * 8) {
                const int q = i / k, c = i - q * k;
                const u16* xr = x + (size_t)in_row[q] * 2 * k;
                const uint4 g = *(const uint4*)(xr + c), u = *(const uint4*)(xr + k + c);
                *(uint4*)(acts + i) = swiglu8(g, u);
            }
            __syncthreads();
        }
        float acc[8][2];
#pragma unroll
        for (int q = 0; q < 8; q++) acc[q][0] = acc[q][1] = 0.f;
#pragma unroll 2
        for (int c = lane * 8; c < k; c += 256) {
            uint4 wv[2];
#pragma unroll
            for (int r = 0; r < 2; r++)
                wv[r] = (r0 + r < n) ? ldg_stream(we + (size_t)(r0 + r) * k + c) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int q = 0; q < 8; q++) {
                if (q < fill) {
                    uint4 xv;
                    if (stage) {
                        xv = *(const uint4*)(acts + q * k + c);
                    } else if (swiglu_in) {
                        const u16* xr = x + (size_t)in_row[q] * 2 * k;
                        const uint4 g = *(const uint4*)(xr + c), u = *(const uint4*)(xr + k + c);
                        xv = swiglu8(g, u);
                    } else {
                        xv = *(const uint4*)(x + (size_t)in_row[q] * k + c);
                    }
                    acc[q][0] += dot8(wv[0], xv);
                    acc[q][1] += dot8(wv[1], xv);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < 8; q++) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float v = acc[q][r];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0 && q < fill && r0 + r < n) y[(size_t)out_row[q] * n + r0 + r] = f32_to_bf16(v);
            }
        }
        __syncthreads();  // in_row/out_row are rewritten by the next group
    }
}

// ---------------------------------------------------------------------------------------------
// One-token BF16 experts (the BF16 baseline's direct path, Tuning::moe_direct): with one token
// every (token, expert) pair has its own expert, so a block row serves one pair instead of
// scanning the ids for an expert's pairs. y[p] = W[ids[p]] . x[p / in_div] for the P pairs
// (blockIdx.y = p); with SW the input row is [gate | up] of 2k and silu(gate) * up (rounded to
// bf16, swiglu2) is formed once per block into shared memory, not once per weight element. A
// pair whose id is outside [0, E) leaves its output row unwritten (the combine skips it).
//
// A block owns rb consecutive rows of its expert, cut into 256-element chunks (512 bytes: one
// 16-byte piece per lane; a row's last chunk is partial where k is not a multiple of 256). Warp
// w takes chunks w, w + 8, w + 16, ... in groups of MP_PPT, the next group requested before the
// current one is used. A chunk lies in one row and a warp's chunks only move forward through the
// rows, so each warp keeps the sum of its current row and, when the row changes, reduces it over
// the warp into one partial per (row, warp) in shared memory; the block adds each row's 8
// partials in warp order (deterministic, no atomics). grid (ceil(n / rb), P), 256 threads.
// ---------------------------------------------------------------------------------------------
#define MP_WARPS 8
#define MP_PPT 4
#define MP_MAX_RB 32
#define MP_MAX_SW_K 4096

// This lane's 16-byte piece of chunk ch of the slab wb (rows of k, cpr chunks each), zeros past
// the slab or the row.
__device__ __forceinline__ uint4 mp_load(const u16* __restrict__ wb, int k, int cpr, int total,
                                         int ch) {
    const int row = ch / cpr, c = (ch - row * cpr) * 256 + (threadIdx.x & 31) * 8;
    return ch < total && c < k ? ldg_stream(wb + (size_t)row * k + c) : make_uint4(0, 0, 0, 0);
}

// TOPK (one token, gate/up: grid.y = top_k pairs): no ids in; each block takes the router's
// softmax and top-k from its logits (moe_topk_from_logits, as the router's last block would)
// and block (0, 0) writes the ids and routing weights for the launches after it (the down
// projection and the combine), so the router ends with its logits.
template <bool SW, bool TOPK = false>
__device__ __forceinline__ void moe_bf16_pairs_body(const u16* __restrict__ w,
                                                    const u16* __restrict__ x,
                                                    u16* __restrict__ y, int n, int k, int rb,
                                                    const int* __restrict__ ids, int E,
                                                    int in_div,
                                                    const float* __restrict__ logits = 0,
                                                    int renorm = 0, int* __restrict__ ids_out = 0,
                                                    float* __restrict__ w_out = 0) {
    __shared__ float red[MP_MAX_RB * MP_WARPS];
    __shared__ __align__(16) u16 act[SW ? MP_MAX_SW_K : 8];
    __shared__ __align__(16) float r_prob[TOPK ? MOE_ROUTER_MAX_EXPERTS : 4];
    __shared__ float r_selp[TOPK ? 16 : 1];
    __shared__ int r_selid[TOPK ? 16 : 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    pdl_enter();
    const int p = blockIdx.y;
    int e;
    if (TOPK) {
        const int top_k = gridDim.y;  // at most 16 (moe_bf16.rs)
        moe_topk_from_logits(logits, E, top_k, r_prob, r_selp, r_selid);
        if (blockIdx.x == 0 && blockIdx.y == 0) {
            for (int j = threadIdx.x; j < top_k; j += blockDim.x) {
                ids_out[j] = r_selid[j];
                w_out[j] = router_weight(r_selp, j, top_k, renorm);
            }
        }
        e = r_selid[p];
    } else {
        e = ids[p];
    }
    if (e < 0 || e >= E) return;  // the whole block
    const int row0 = blockIdx.x * rb, rows = min(rb, n - row0);
    const int cpr = (k + 255) >> 8, total = rows * cpr;
    const u16* wb = w + ((size_t)e * n + row0) * k;
    uint4 wv[MP_PPT];
#pragma unroll
    for (int i = 0; i < MP_PPT; i++) wv[i] = mp_load(wb, k, cpr, total, warp + i * MP_WARPS);
    const u16* xr = x + (size_t)(p / in_div) * (SW ? 2 : 1) * k;
    if (SW) {
        for (int c = threadIdx.x * 8; c < k; c += blockDim.x * 8) {
            const uint4 g = *(const uint4*)(xr + c), u = *(const uint4*)(xr + k + c);
            *(uint4*)(act + c) = swiglu8(g, u);
        }
        xr = act;
    }
    for (int i = threadIdx.x; i < rows * MP_WARPS; i += blockDim.x) red[i] = 0.f;
    __syncthreads();
    float acc = 0.f;
    int cur = -1;
    for (int j0 = warp; j0 < total; j0 += MP_WARPS * MP_PPT) {
        uint4 nx[MP_PPT];
#pragma unroll
        for (int i = 0; i < MP_PPT; i++)
            nx[i] = mp_load(wb, k, cpr, total, j0 + (MP_PPT + i) * MP_WARPS);
#pragma unroll
        for (int i = 0; i < MP_PPT; i++) {
            const int ch = j0 + i * MP_WARPS;
            if (ch < total) {
                const int row = ch / cpr;  // warp-uniform
                if (row != cur) {
                    if (cur >= 0) {
                        float v = acc;
#pragma unroll
                        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                        if (lane == 0) red[cur * MP_WARPS + warp] = v;
                        acc = 0.f;
                    }
                    cur = row;
                }
                const int c = (ch - row * cpr) * 256 + lane * 8;
                if (c < k) acc += dot8(wv[i], *(const uint4*)(xr + c));
            }
        }
#pragma unroll
        for (int i = 0; i < MP_PPT; i++) wv[i] = nx[i];
    }
    if (cur >= 0) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) red[cur * MP_WARPS + warp] = acc;
    }
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < MP_WARPS; q++) s += red[r * MP_WARPS + q];
        y[(size_t)p * n + row0 + r] = f32_to_bf16(s);
    }
}

extern "C" __global__ void __launch_bounds__(256)
moe_bf16_pairs(const u16* __restrict__ w, const u16* __restrict__ x, u16* __restrict__ y, int n,
               int k, int rb, const int* __restrict__ ids, int E, int in_div) {
    moe_bf16_pairs_body<false>(w, x, y, n, k, rb, ids, E, in_div);
}

// One token's gate/up routed from the router's logits (TOPK above): ids_out / w_out receive
// the top-k ids and routing weights.
extern "C" __global__ void __launch_bounds__(256)
moe_bf16_pairs_topk(const u16* __restrict__ w, const u16* __restrict__ x, u16* __restrict__ y,
                    int n, int k, int rb, int E, int in_div, const float* __restrict__ logits,
                    int renorm, int* __restrict__ ids_out, float* __restrict__ w_out) {
    moe_bf16_pairs_body<false, true>(w, x, y, n, k, rb, 0, E, in_div, logits, renorm, ids_out,
                                     w_out);
}

extern "C" __global__ void __launch_bounds__(256)
moe_bf16_pairs_sw(const u16* __restrict__ w, const u16* __restrict__ x, u16* __restrict__ y,
                  int n, int k, int rb, const int* __restrict__ ids, int E, int in_div) {
    moe_bf16_pairs_body<true>(w, x, y, n, k, rb, ids, E, in_div);
}

// ---------------------------------------------------------------------------------------------
// Tile table of the tiled grouped MoE kernels (fp4_mm_moe_*, fp4_tiled.cu; moe.rs
// `moe_layer_tiled`). One block of 1024 threads:
//   sorted[] : the pairs with a valid id, grouped by expert in expert order and, inside an
//              expert, in pair order (a stable counting sort: the same table whatever the
//              scheduling, so the layer's output is deterministic);
//   route[0] : the number of tiles; route[1 + 3t ..] = (expert, first index into sorted, pairs)
//              of tile t: each expert's pairs cut into tiles of `bm`, experts in order;
//   bad[0]   : ids outside [0, E) (those pairs are left out, as in the grouped kernels).
// Dynamic shared memory: 2 * E ints + 32 * E u16 (moe.rs `route_smem`).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(1024)
moe_route_tiles(const int* __restrict__ ids, int P, int E, int bm, int* __restrict__ sorted,
                int* __restrict__ route, int* __restrict__ bad) {
    pdl_enter();
    extern __shared__ int rs[];
    int* cnt = rs;                               // [E] pairs per expert
    int* next = rs + E;                          // [E] next free index of each expert in sorted
    unsigned short* wc = (unsigned short*)(rs + 2 * E);  // [32][E] a chunk's pairs per warp
    __shared__ int nbad_w[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nt = blockDim.x;
    const int nwarps = nt >> 5;
    for (int i = tid; i < E; i += nt) cnt[i] = 0;
    for (int i = tid; i < 32 * E; i += nt) wc[i] = 0;
    __syncthreads();
    int nb = 0;
    for (int p = tid; p < P; p += nt) {
        const int e = ids[p];
        if (e >= 0 && e < E) {
            atomicAdd(cnt + e, 1);  // integer counts: the same whatever the order
        } else {
            nb++;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) nb += __shfl_xor_sync(0xffffffffu, nb, o);
    if (lane == 0) nbad_w[warp] = nb;
    __syncthreads();
    // Warp 0: offsets (exclusive scan of the counts) and the tile table, 32 experts at a time.
    if (warp == 0) {
        int run = 0, trun = 0;
        for (int e0 = 0; e0 < E; e0 += 32) {
            const int e = e0 + lane;
            const int c = e < E ? cnt[e] : 0;
            const int tiles = (c + bm - 1) / bm;
            int sc = c, st = tiles;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int a = __shfl_up_sync(0xffffffffu, sc, o);
                const int b = __shfl_up_sync(0xffffffffu, st, o);
                if (lane >= o) {
                    sc += a;
                    st += b;
                }
            }
            if (e < E) {
                const int first = run + sc - c, t0 = trun + st - tiles;
                next[e] = first;
                for (int i = 0; i < tiles; i++) {
                    int* r = route + 1 + 3 * (t0 + i);
                    r[0] = e;
                    r[1] = first + i * bm;
                    r[2] = min(bm, c - i * bm);
                }
            }
            run += __shfl_sync(0xffffffffu, sc, 31);
            trun += __shfl_sync(0xffffffffu, st, 31);
        }
        if (lane == 0) {
            route[0] = trun;
            int b = 0;
            for (int w = 0; w < nwarps; w++) b += nbad_w[w];
            if (bad != 0) bad[0] = b;
        }
    }
    __syncthreads();
    // Stable placement, blockDim pairs at a time in pair order: a pair's index is its expert's
    // next free index + the pairs of that expert in earlier warps of the chunk + those in
    // earlier lanes of its own warp.
    const unsigned lt = (1u << lane) - 1u;
    for (int p0 = 0; p0 < P; p0 += nt) {
        const int p = p0 + tid;
        const int e0 = p < P ? ids[p] : -1;
        const bool ok = e0 >= 0 && e0 < E;
        const int e = ok ? e0 : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(peers & lt);
        if (ok && rank == 0) wc[warp * E + e] = (unsigned short)__popc(peers);
        __syncthreads();
        if (ok) {
            int at = next[e] + rank;
            for (int w = 0; w < warp; w++) at += wc[w * E + e];
            sorted[at] = p;
        }
        __syncthreads();
        if (ok && rank == 0) {
            atomicAdd(next + e, __popc(peers));
            wc[warp * E + e] = 0;
        }
        __syncthreads();
    }
}
