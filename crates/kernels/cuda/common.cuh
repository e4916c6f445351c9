// Definitions shared by every NVRTC source of mimo-quant (fp4_gemm.cu, moe.cu and the runtime's
// ops.cu): `compile_source` (crates/kernels/src/cuda/context.rs) puts this text in front of each
// source before compiling it, so each concept is written once.
//
// No CUDA headers are included: bf16 values travel as raw 16-bit patterns and the few
// instructions needed (mma.sync, cvt.rn.bf16.f32, griddepcontrol) are inline PTX, so NVRTC
// needs no include path.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))

// bf16 bits -> f32 (exact).
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// f32 -> bf16 bits, round to nearest even.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Two f32 -> one bf16x2 word (`lo` in the low half), round to nearest even.
__device__ __forceinline__ u32 f32x2_to_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// D += A (16x16, row) * B (16x8, col), bf16 inputs, f32 accumulators. Fragments (g = lane / 4,
// t = lane % 4): a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// b0 = B[2t..][g], b1 = B[2t+8..][g]; c0,c1 = C[g][2t..], c2,c3 = C[g+8][2t..].
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                               u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (sm_90). In a decode graph whose kernel edges are programmatic
// (PdlGraph, graph.rs) a kernel may start while the previous one finishes: `griddepcontrol.wait`
// blocks until every prerequisite grid has completed and its memory is visible, so each kernel
// calls pdl_enter before its first read of data another kernel wrote and before its first
// global write; `launch_dependents` (after the wait: at most one grid runs ahead) lets the next
// kernel's blocks be scheduled. Outside such a graph both are no-ops.
#ifdef MIMO_TRACE
// Decode timeline (`MIMO_TRACE=1`; crates/kernels/src/cuda/trace.rs): compiled in only then, so
// the kernels of a normal run are unchanged. The host points `mimo_trace` of every module at one
// device buffer: word 1 holds the records per SM, words 4..260 count each SM's records, and each
// SM has its own region of records after them (a counter per SM: one shared counter made every
// block of a launch queue on one atomic). Thread 0 of each block appends, per pdl_enter call,
// the launch's %gridid, %globaltimer before and after the wait, and (block index << 32 | source
// line << 16 | MIMO_TRACE_FILE << 8 | SM id); trace_mark records a point (both times equal,
// bit 15 of the line set).
__device__ u64* mimo_trace;
__device__ __forceinline__ u64 trace_now() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void trace_record(u64 t0, u64 t1, int line) {
    u64* buf = mimo_trace;
    if (buf == 0) return;
    u64 grid;
    u32 sm;
    asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    sm &= 0xFF;
    const u64 per_sm = buf[1];
    const u64 i = atomicAdd((unsigned long long*)(buf + 4 + sm), 1ull);
    if (i >= per_sm) return;
    const u64 blk = blockIdx.x + (u64)gridDim.x * (blockIdx.y + (u64)gridDim.y * blockIdx.z);
    u64* r = buf + 4 + 256 + 4 * (sm * per_sm + i);
    r[0] = grid;
    r[1] = t0;
    r[2] = t1;
    r[3] = (blk << 32) | ((u64)(line & 0xFFFF) << 16) | ((u64)MIMO_TRACE_FILE << 8) | sm;
}
__device__ __forceinline__ bool trace_thread() { return (threadIdx.x | threadIdx.y | threadIdx.z) == 0; }
__device__ __forceinline__ void trace_mark_at(int line) {
    if (trace_thread()) {
        const u64 t = trace_now();
        trace_record(t, t, line | 0x8000);  // bit 15: a mark, not a wait
    }
}
#define pdl_enter() pdl_enter_at(__LINE__)
#define trace_mark() trace_mark_at(__LINE__)
#else
#define pdl_enter() pdl_enter_at(0)
#define trace_mark() ((void)0)
#endif
__device__ __forceinline__ void pdl_enter_at(int line) {
#ifdef MIMO_TRACE
    const u64 t0 = trace_thread() ? trace_now() : 0;
#endif
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#ifdef MIMO_TRACE
    if (trace_thread()) trace_record(t0, trace_now(), line);
#endif
}

// Asks L2 to fetch the 16-byte-aligned part of [p, p + bytes) in pieces of at most 64 KiB
// (never past the range, so never outside the allocation).
__device__ __forceinline__ void prefetch_l2_range(const u8* p, size_t bytes) {
    size_t a = ((size_t)p + 15) & ~(size_t)15;
    const size_t end = ((size_t)p + bytes) & ~(size_t)15;
    while (a < end) {
        const u32 len = (u32)min(end - a, (size_t)65536);
#if __CUDA_ARCH__ >= 900
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"(len) : "memory");
#endif
        a += len;
    }
}

// Device ranges a kernel asks L2 to fetch for the kernel after it (crates/kernels/src/cuda/l2.rs
// `L2Ranges`, the same layout): ranges with 0 bytes are skipped.
#define L2_RANGES 8
struct L2Ranges {
    u64 ptr[L2_RANGES];
    u64 bytes[L2_RANGES];
};

// Block b's share of every range, of nb blocks asking (one thread): the ranges are cut into nb
// pieces, each a multiple of 128 bytes, so the nb blocks together ask for all of them once.
__device__ __forceinline__ void prefetch_l2_share(const L2Ranges& r, u64 b, u64 nb) {
#pragma unroll
    for (int i = 0; i < L2_RANGES; i++) {
        if (r.bytes[i] == 0) continue;
        const u64 piece = ((r.bytes[i] + nb - 1) / nb + 127) & ~(u64)127;
        const u64 lo = b * piece;
        if (lo >= r.bytes[i]) continue;
        const u64 len = min(piece, r.bytes[i] - lo);
        prefetch_l2_range((const u8*)(r.ptr[i] + lo), (size_t)len);
    }
}

// Streaming 16-byte load for data read exactly once (weights): kept out of L1.
__device__ __forceinline__ uint4 ldg_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// silu(g) * u of two bf16 pairs (one 32-bit word each), each product rounded to bf16 as if
// stored: the SwiGLU that the BF16 expert kernels form while loading their input.
__device__ __forceinline__ u32 swiglu2(u32 g, u32 u) {
    const float g0 = __uint_as_float(g << 16), g1 = __uint_as_float(g & 0xFFFF0000u);
    const float u0 = __uint_as_float(u << 16), u1 = __uint_as_float(u & 0xFFFF0000u);
    return (u32)f32_to_bf16(g0 / (1.f + expf(-g0)) * u0) |
           ((u32)f32_to_bf16(g1 / (1.f + expf(-g1)) * u1) << 16);
}

// swiglu2 over 8 bf16 pairs: a 16-byte piece of gate values and the matching piece of up values.
__device__ __forceinline__ uint4 swiglu8(uint4 g, uint4 u) {
    return make_uint4(swiglu2(g.x, u.x), swiglu2(g.y, u.y), swiglu2(g.z, u.z), swiglu2(g.w, u.w));
}

// Dot product of 8 bf16 pairs (16 bytes each) in f32, element order.
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const u32 as[4] = {a.x, a.y, a.z, a.w}, bs[4] = {b.x, b.y, b.z, b.w};
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        s += __uint_as_float(as[q] << 16) * __uint_as_float(bs[q] << 16);
        s += __uint_as_float(as[q] & 0xFFFF0000u) * __uint_as_float(bs[q] & 0xFFFF0000u);
    }
    return s;
}

// ---------------------------------------------------------------------------------------------
// Grouped MoE routing, shared by fp4_gemm.cu's fp4_moe_* and moe.cu's moe_bf16: a block serves
// one expert, found from the router's top-k ids on the device, and takes that expert's
// (token, expert) pairs in id order, a few at a time (deterministic order, no host round trip).
// ---------------------------------------------------------------------------------------------

// Whole block: the id of the `slot`-th expert (in increasing id order) that has at least one of
// the P pairs of `ids` (ids outside [0, E) are ignored), or -1 where fewer are active.
// `present`: E bytes of shared memory; `s_expert`: a shared int. Ends with a barrier.
__device__ __forceinline__ int moe_slot_expert(const int* __restrict__ ids, int P, int E, int slot,
                                               unsigned char* present, int* s_expert) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int e = threadIdx.x; e < E; e += blockDim.x) present[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        const int e = ids[p];
        if (e >= 0 && e < E) present[e] = 1;
    }
    __syncthreads();
    if (warp == 0) {
        int want = slot, found = -1;
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
        if (lane == 0) *s_expert = found;
    }
    __syncthreads();
    return *s_expert;
}

// One warp: the next pairs p of expert e in id order from `pos` on, at most `cap`, into
// in_row[i] = p / in_div (the activation row: the token for a first projection, the pair's own
// row for a second) and out_row[i] = p. Returns how many were taken; `pos` moves to the first
// pair not taken (the same value in every lane).
__device__ __forceinline__ int moe_collect_pairs(const int* __restrict__ ids, int P, int e,
                                                 int in_div, int cap, int* in_row, int* out_row,
                                                 int& pos) {
    const int lane = threadIdx.x & 31;
    int fill = 0;
    while (pos < P && fill < cap) {
        const int p = pos + lane;
        const bool hit = p < P && ids[p] == e;
        const unsigned m = __ballot_sync(0xffffffffu, hit);
        const int c = __popc(m);
        const int take = min(c, cap - fill);
        const int before = __popc(m & ((1u << lane) - 1u));
        if (hit && before < take) {
            in_row[fill + before] = p / in_div;
            out_row[fill + before] = p;
        }
        fill += take;
        if (take < c) {
            unsigned mm = m;
            for (int i = 0; i < take; i++) mm &= mm - 1;
            pos += __ffs(mm) - 1;  // the first hit not taken
            break;
        }
        pos += 32;
    }
    return fill;
}

// ---------------------------------------------------------------------------------------------
// MoE top-k selection, shared by the runtime's router (ops.cu router_topk's last block) and the
// one-token expert kernels that take it from the router's logits (fp4_gemm.cu, moe.rs
// OneTokenRoute).
// ---------------------------------------------------------------------------------------------
#define MOE_ROUTER_MAX_EXPERTS 1024
#define MOE_ROUTER_MAX_TOPK 256

// Whole block, with logits in prob[0..E) (written before this call's first barrier by the
// caller; prob 16-byte aligned with room for E rounded up to 4): softmax by warp 0, then the
// top-k by rank into sel_id / sel_p (probabilities, rank order; slots no expert fills keep id
// 0x7fffffff). Ends with a barrier.
__device__ void router_rank(float* prob, float* sel_p, int* sel_id, int n_experts, int top_k) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp == 0) {
        // Max and sum are warp reductions in a fixed order.
        float mx = NEG_INF;
        for (int i = lane; i < n_experts; i += 32) mx = fmaxf(mx, prob[i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.f;
        for (int i = lane; i < n_experts; i += 32) {
            const float v = expf(prob[i] - mx);
            prob[i] = v;
            sum += v;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        for (int i = lane; i < n_experts; i += 32) prob[i] = prob[i] / sum;
        // Up to the next multiple of 4: NaN, which no comparison below counts.
        if (lane < ((n_experts + 3) & ~3) - n_experts) prob[n_experts + lane] = __int_as_float(0x7fc00000);
        // Slots no expert fills (NaN probabilities are never chosen) keep an invalid id.
        for (int j = lane; j < top_k; j += 32) {
            sel_id[j] = 0x7fffffff;
            sel_p[j] = -1.f;
        }
    }
    __syncthreads();
    trace_mark();  // softmax done
    // Top-k by rank: expert i is the r-th choice where r experts come before it (a larger
    // probability, or an equal one at a lower index): the order of k rounds of argmax with ties
    // to the lower index, computed by every thread at once instead of round after round. The
    // probabilities are read four at a time (prob is 16-byte aligned), several loads in flight:
    // one load at a time made this loop the longest step of the router (~2-3 us per layer on
    // the H100 for 128 experts).
    const float4* p4 = (const float4*)prob;
    const int n4 = (n_experts + 3) >> 2;
    for (int i = threadIdx.x; i < n_experts; i += blockDim.x) {
        const float pi = prob[i];
        if (pi != pi) continue;
        int rank = 0;
#pragma unroll 4
        for (int j4 = 0; j4 < n4; j4++) {
            const float4 q = p4[j4];
            const int j = 4 * j4;
            rank += (q.x > pi) || (q.x == pi && j < i);
            rank += (q.y > pi) || (q.y == pi && j + 1 < i);
            rank += (q.z > pi) || (q.z == pi && j + 2 < i);
            rank += (q.w > pi) || (q.w == pi && j + 3 < i);
        }
        if (rank < top_k) {
            sel_id[rank] = i;
            sel_p[rank] = pi;
        }
    }
    __syncthreads();
    trace_mark();  // ranks done
}

// The routing weight of rank j (after router_rank): its probability, renormalised over the
// top-k (summed in rank order) with `renorm`.
__device__ __forceinline__ float router_weight(const float* sel_p, int j, int top_k, int renorm) {
    float w = sel_p[j];
    if (renorm) {
        float sel_sum = 0.f;  // in rank order
        for (int q = 0; q < top_k; q++) sel_sum += sel_p[q];
        w /= sel_sum;
    }
    return w;
}

// Whole block: the top-k of one token from its logits in global memory (the router's, written
// by an earlier kernel or, in the router's last block, by the other blocks: read through L2)
// into sel_id / sel_p; router_weight gives the weights.
// prob: MOE_ROUTER_MAX_EXPERTS floats of shared memory. Ends with a barrier.
__device__ void moe_topk_from_logits(const float* __restrict__ logits, int n_experts, int top_k,
                                     float* prob, float* sel_p, int* sel_id) {
    for (int i = threadIdx.x; i < n_experts; i += blockDim.x) prob[i] = __ldcg(logits + i);
    __syncthreads();
    // The top-k's three marks (traced builds only; docs/kernels-notes.md round 20): a timeline
    // names them by the source that includes this header, with this header's line numbers.
    trace_mark();  // logits loaded
    router_rank(prob, sel_p, sel_id, n_experts, top_k);
}
