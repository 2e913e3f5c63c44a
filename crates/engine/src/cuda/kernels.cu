// lastmile's CUDA kernels, compiled at run time by NVRTC (no CUDA headers: half floats are
// converted with PTX instructions). Layouts are the CPU engine's, so that KV blocks, their
// hashes, prefix caching and KV transfer are the same on either device:
//
// - activations: f32, row-major `[tokens, width]`;
// - quantized weights: the GGUF file layout, row by row (Q8_0: per 32 weights an f16 scale and
//   32 signed bytes; Q4_1: an f16 scale, an f16 minimum and 16 bytes, low nibbles the first 16
//   weights, high nibbles the last 16);
// - the paged KV cache, per layer: keys channel-major inside each block (block b, channel c,
//   position j at `(b * kv_dim + c) * block_size + j`), values slot by slot
//   (`slot * kv_dim + c`), both IEEE half floats; a sequence's block table maps its position p to
//   slot `table[p / block_size] * block_size + p % block_size`.

typedef unsigned short half_bits;
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned int u32;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float half_to_float(half_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_bits float_to_half(float f) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : NEG_INF;
    return warp_max(v);
}

// Value `at` of a row quantized to 8 bits as the CPU engine does (`kernels::Q8Acts`): the 32
// values of its block are held one a lane by the calling warp, whose lanes all call this; per
// block `d = max|x| / 127`, `q = trunc(x * (1 / d) + copysign(0.5))`, `s = d * sum(q)`.
__device__ __forceinline__ void quantize_lane(float v, i8 *q, float *d, float *s, size_t at) {
    float amax = warp_max(fabsf(v));
    float db = amax / 127.0f;
    float id = db > 0.0f ? 1.0f / db : 0.0f;
    float y = v * id;
    int r = (int)(y + copysignf(0.5f, y));
    q[at] = (i8)r;
    int sum = r;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((threadIdx.x & 31) == 0) {
        d[at / 32] = db;
        s[at / 32] = db * (float)sum;
    }
}

// RMSNorm of each row: out = x / sqrt(mean(x^2) + eps) * w. Grid: one block per row.
extern "C" __global__ void rmsnorm_f32(float *out, const float *x, const float *w, int width,
                                       float eps) {
    const float *row = x + (size_t)blockIdx.x * width;
    float *dst = out + (size_t)blockIdx.x * width;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += row[i] * row[i];
    float scale = rsqrtf(block_sum(ss) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = row[i] * scale * w[i];
}

// The residual add and the next RMSNorm in one pass: x += y, then out = x / sqrt(mean(x^2) +
// eps) * w, row by row. Grid: one block per row.
// When `q` is not null, `out` is also quantized there as `quantize_q8` does (`d`, `s` per block
// of 32; `width` must then be a multiple of 32, so that each block is one warp's).
extern "C" __global__ void add_rmsnorm_f32(float *x, const float *y, float *out, const float *w,
                                           int width, float eps, i8 *q, float *d, float *s) {
    float *row = x + (size_t)blockIdx.x * width;
    const float *add = y + (size_t)blockIdx.x * width;
    float *dst = out + (size_t)blockIdx.x * width;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = row[i] + add[i];
        row[i] = v;
        ss += v * v;
    }
    float scale = rsqrtf(block_sum(ss) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float o = row[i] * scale * w[i];
        dst[i] = o;
        if (q != nullptr) quantize_lane(o, q, d, s, (size_t)blockIdx.x * width + i);
    }
}

// Rotary embedding of every head of every token, in place: `x` is `[tokens, heads * head_dim]`,
// `cos`/`sin` are `[tokens, head_dim / 2]` (each token's position already applied).
// `neox` 0: pairs (2i, 2i+1); 1: pairs (i, i + head_dim/2). Grid: (tokens, heads); block: head_dim/2.
extern "C" __global__ void rope_f32(float *x, const float *cos_t, const float *sin_t, int heads,
                                    int head_dim, int neox) {
    int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    if (i >= half) return;
    float *head = x + ((size_t)t * heads + h) * head_dim;
    float c = cos_t[(size_t)t * half + i], s = sin_t[(size_t)t * half + i];
    int ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
    float a = head[ia], b = head[ib];
    head[ia] = a * c - b * s;
    head[ib] = a * s + b * c;
}

// Rotary embedding of the queries and keys and the keys' and values' store into one layer's
// paged cache, in one launch. q: `[tokens, heads * head_dim]` (rotated in place); k, v:
// `[tokens, kv_heads * head_dim]` (k rotated in place, both stored at token t's `slots[t]` as in
// `kv_store_f16`). Grid: (tokens, heads + kv_heads): query heads, then KV heads; block:
// head_dim / 2 (one rotation pair a thread).
extern "C" __global__ void rope_store_f16(float *q, float *k, const float *v, const float *cos_t,
                                          const float *sin_t, half_bits *k_cache,
                                          half_bits *v_cache, const u32 *slots, int heads,
                                          int kv_heads, int head_dim, int neox, int block_size) {
    int t = blockIdx.x, hh = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    if (i >= half) return;
    bool is_q = hh < heads;
    int h = is_q ? hh : hh - heads;
    int width = (is_q ? heads : kv_heads) * head_dim;
    float *head = (is_q ? q : k) + (size_t)t * width + h * head_dim;
    float c = cos_t[(size_t)t * half + i], s = sin_t[(size_t)t * half + i];
    int ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
    float a = head[ia], b = head[ib];
    float ra = a * c - b * s, rb = a * s + b * c;
    head[ia] = ra;
    head[ib] = rb;
    if (is_q) return;
    int kv_dim = kv_heads * head_dim;
    u32 slot = slots[t];
    u32 block = slot / block_size, j = slot % block_size;
    int ca = h * head_dim + ia, cb = h * head_dim + ib;
    k_cache[((size_t)block * kv_dim + ca) * block_size + j] = float_to_half(ra);
    k_cache[((size_t)block * kv_dim + cb) * block_size + j] = float_to_half(rb);
    const float *vt = v + (size_t)t * kv_dim;
    v_cache[(size_t)slot * kv_dim + ca] = float_to_half(vt[ca]);
    v_cache[(size_t)slot * kv_dim + cb] = float_to_half(vt[cb]);
}

// gate = silu(gate) * up, elementwise over n values.
extern "C" __global__ void swiglu_f32(float *gate, const float *up, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        gate[i] = g / (1.0f + __expf(-g)) * up[i];
    }
}

// x += y, elementwise over n values (the residual adds).
extern "C" __global__ void add_f32(float *x, const float *y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// Stores one token's key and value (f32, `kv_dim` each) at `slot` of one layer's cache.
// Grid: tokens; block: covers kv_dim. `slots[t]` is token t's slot.
extern "C" __global__ void kv_store_f16(half_bits *k_cache, half_bits *v_cache, const float *k,
                                        const float *v, const u32 *slots, int kv_dim,
                                        int block_size) {
    int t = blockIdx.x;
    u32 slot = slots[t];
    u32 block = slot / block_size, j = slot % block_size;
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) {
        k_cache[((size_t)block * kv_dim + c) * block_size + j] =
            float_to_half(k[(size_t)t * kv_dim + c]);
        v_cache[(size_t)slot * kv_dim + c] = float_to_half(v[(size_t)t * kv_dim + c]);
    }
}

// Decode attention over the paged cache: one query token per sequence, every query head.
// q: `[seqs, heads * head_dim]`; out: same shape; tables: every sequence's block table, the
// s-th starting at `table_at[s]`; lens[s]: positions the query attends to (its own included);
// scores: scratch of `seqs * heads * score_stride` floats (score_stride >= every lens[s]);
// oq/od/os: where `out` goes quantized to 8 bits too, or null (head_dim a multiple of 32).
// Query head h reads KV head
// `h / (heads / kv_heads)`. Grid: (seqs, heads); block: 128 threads (head_dim at most 256).
extern "C" __global__ void attention_decode_f16(float *out, const float *q,
                                                const half_bits *k_cache,
                                                const half_bits *v_cache, const u32 *tables,
                                                const u32 *table_at, const u32 *lens,
                                                float *scores, int heads, int kv_heads,
                                                int head_dim, int block_size,
                                                int score_stride, i8 *oq, float *od,
                                                float *os) {
    int s = blockIdx.x, h = blockIdx.y;
    int kvh = h / (heads / kv_heads), kv_dim = kv_heads * head_dim;
    const u32 *table = tables + table_at[s];
    int len = lens[s];
    const float *qh = q + ((size_t)s * heads + h) * head_dim;
    float *sc = scores + ((size_t)s * heads + h) * score_stride;
    float scale = rsqrtf((float)head_dim);
    float best = NEG_INF;
    for (int p = threadIdx.x; p < len; p += blockDim.x) {
        u32 block = table[p / block_size];
        int j = p % block_size;
        const half_bits *kb = k_cache + ((size_t)block * kv_dim + kvh * head_dim) * block_size + j;
        float dot = 0.0f;
        for (int d = 0; d < head_dim; d++) dot += qh[d] * half_to_float(kb[(size_t)d * block_size]);
        dot *= scale;
        sc[p] = dot;
        best = fmaxf(best, dot);
    }
    best = block_max(best);
    float total = 0.0f;
    for (int p = threadIdx.x; p < len; p += blockDim.x) {
        float e = __expf(sc[p] - best);
        sc[p] = e;
        total += e;
    }
    total = block_sum(total);
    __syncthreads();
    float inv = 1.0f / total;
    float *oh = out + ((size_t)s * heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < len; p++) {
            u32 slot = table[p / block_size] * block_size + p % block_size;
            acc += sc[p] * half_to_float(v_cache[(size_t)slot * kv_dim + kvh * head_dim + d]);
        }
        float o = acc * inv;
        oh[d] = o;
        // The output quantized for the product after it, as `quantize_q8` would (head_dim a
        // multiple of 32: each block of 32 is one warp's).
        if (oq != nullptr) quantize_lane(o, oq, od, os, ((size_t)s * heads + h) * head_dim + d);
    }
}

// Activations of the products over block formats are quantized to 8 bits first, exactly as the
// CPU engine quantizes them (`kernels::Q8Acts`): per block of 32, `d = max|x| / 127`,
// `q = trunc(x * (1 / d) + copysign(0.5))`, and `s = d * sum(q)`; so both devices multiply the
// same integers and their logits agree to float rounding, not to 8-bit noise.
// Grid: ceil(blocks / 8); block: 256 threads, a warp per block of 32 values.
extern "C" __global__ void quantize_q8(const float *x, i8 *q, float *d, float *s, int blocks) {
    int b = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (b >= blocks) return;
    size_t at = (size_t)b * 32 + lane;
    quantize_lane(x[at], q, d, s, at);
}

// The block formats, each a block's bytes and its integer dot product with 32 quantized
// activations (`xq`, their scale `xd`, `xs = xd * sum(xq)`), as the CPU engine computes it.
__device__ __forceinline__ int dot_bytes(const int *w, const int *x) {
    int acc = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) acc = __dp4a(w[j], x[j], acc);
    return acc;
}

// Block fields: the f16 at byte `at`, and 4 bytes (little-endian) as one int.
__device__ __forceinline__ float f16_at(const u8 *blk, int at) {
    return half_to_float((half_bits)(blk[at] | (blk[at + 1] << 8)));
}

__device__ __forceinline__ int int_at(const u8 *p) {
    return (int)p[0] | ((int)p[1] << 8) | ((int)p[2] << 16) | ((int)p[3] << 24);
}

// 16 bytes of nibbles as 32 bytes (low nibbles: values 0..15, high: 16..31), `bias`
// subtracted from each (per byte: `__vsub4` keeps borrows inside each byte).
__device__ __forceinline__ void unpack_nibbles(const u8 *qs, int bias, int *w) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int packed = int_at(qs + 4 * j);
        w[j] = __vsub4(packed & 0x0f0f0f0f, bias);
        w[j + 4] = __vsub4((packed >> 4) & 0x0f0f0f0f, bias);
    }
}

// Each format loads a block as its 32 values in bytes, 4 to an int, its scale and its offset.
// Q8_0: an f16 scale and 32 signed bytes.
struct Q8_0 {
    static const int BYTES = 34;
    static __device__ __forceinline__ void load(const u8 *blk, int *w, float &dw, float &mw) {
        dw = f16_at(blk, 0);
        mw = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = int_at(blk + 2 + 4 * j);
    }
};

// Q4_1: f16 scale d and minimum m, 16 bytes of nibbles, each weight `q * d + m`.
struct Q4_1 {
    static const int BYTES = 20;
    static __device__ __forceinline__ void load(const u8 *blk, int *w, float &dw, float &mw) {
        dw = f16_at(blk, 0);
        mw = f16_at(blk, 2);
        unpack_nibbles(blk + 4, 0, w);
    }
};

// Q4_0: an f16 scale and 16 bytes of nibbles, each weight `(q - 8) * d` (signed bytes).
struct Q4_0 {
    static const int BYTES = 18;
    static __device__ __forceinline__ void load(const u8 *blk, int *w, float &dw, float &mw) {
        dw = f16_at(blk, 0);
        mw = 0.0f;
        unpack_nibbles(blk + 2, 0x08080808, w);
    }
};

// Tokens a warp multiplies each weight block it decodes with.
#define TOKEN_TILE 8

// The quantized activations of a product: `cols / 32` blocks a token.
struct QActs {
    const i8 *q;
    const float *d;
    const float *s;
};

// Block `xb` of the quantized activations, 4 values to an int.
__device__ __forceinline__ void load_acts(QActs x, size_t xb, int *xv) {
    const int4 *xp = (const int4 *)(x.q + xb * 32);
    int4 lo = xp[0], hi = xp[1];
    xv[0] = lo.x, xv[1] = lo.y, xv[2] = lo.z, xv[3] = lo.w;
    xv[4] = hi.x, xv[5] = hi.y, xv[6] = hi.z, xv[7] = hi.w;
}

// Row `row` of y = W x for a matrix of `rows` x `cols` (cols a multiple of 32) in block format F
// and the tokens of this grid row's tile (x quantized, `[tokens, cols]`; y `[tokens, rows]`).
// One warp: lanes over the row's blocks of 32, each lane decoding a weight block once and
// multiplying it with up to TOKEN_TILE tokens.
template <typename F>
__device__ __forceinline__ void gemv_row(float *y, const u8 *w, QActs x, int rows, int cols,
                                         int tokens, int row) {
    int lane = threadIdx.x & 31;
    int t0 = blockIdx.y * TOKEN_TILE;
    int nt = min(TOKEN_TILE, tokens - t0);
    int nb = cols / 32;
    const u8 *wr = w + (size_t)row * nb * F::BYTES;
    float acc[TOKEN_TILE];
#pragma unroll
    for (int t = 0; t < TOKEN_TILE; t++) acc[t] = 0.0f;
    for (int b = lane; b < nb; b += 32) {
        int wv[8];
        float dw, mw;
        F::load(wr + (size_t)b * F::BYTES, wv, dw, mw);
#pragma unroll
        for (int t = 0; t < TOKEN_TILE; t++) {
            if (t < nt) {
                size_t xb = (size_t)(t0 + t) * nb + b;
                int xv[8];
                load_acts(x, xb, xv);
                acc[t] += dw * x.d[xb] * (float)dot_bytes(wv, xv) + mw * x.s[xb];
            }
        }
    }
    // `nt` is the same for the whole warp: every lane takes part in each sum.
#pragma unroll
    for (int t = 0; t < TOKEN_TILE; t++) {
        if (t < nt) {
            float v = warp_sum(acc[t]);
            if (lane == 0) y[(size_t)(t0 + t) * rows + row] = v;
        }
    }
}

// y = W x. Grid: (ceil(rows / 8), ceil(tokens / TOKEN_TILE)); block: 256 threads, a warp a row.
template <typename F>
__device__ void gemv_blocks(float *y, const u8 *w, QActs x, int rows, int cols, int tokens) {
    int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row < rows) gemv_row<F>(y, w, x, rows, cols, tokens, row);
}

// The Q, K and V products in one launch: three matrices of `cols` columns in block format F,
// `q_rows` rows for Q and `kv_rows` each for K and V, into q, k, v (`[tokens, rows]` each). Grid:
// (ceil((q_rows + 2 kv_rows) / 8), ceil(tokens / TOKEN_TILE)); each warp takes one row of one
// of them, as `gemv_blocks`.
template <typename F>
__device__ void gemv_qkv(float *q, float *k, float *v, const u8 *wq, const u8 *wk, const u8 *wv,
                         QActs x, int q_rows, int kv_rows, int cols, int tokens) {
    int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row < q_rows) {
        gemv_row<F>(q, wq, x, q_rows, cols, tokens, row);
    } else if (row < q_rows + kv_rows) {
        gemv_row<F>(k, wk, x, kv_rows, cols, tokens, row - q_rows);
    } else if (row < q_rows + 2 * kv_rows) {
        gemv_row<F>(v, wv, x, kv_rows, cols, tokens, row - q_rows - kv_rows);
    }
}

// The feed-forward's two products and SwiGLU in one launch: out = silu(G x) * (U x), G and U
// both `rows` x `cols` in block format F, grid and tiles as `gemv_blocks`.
template <typename F>
__device__ void gemv_swiglu(float *out, const u8 *wg, const u8 *wu, QActs x, int rows, int cols,
                            int tokens) {
    int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    int t0 = blockIdx.y * TOKEN_TILE;
    if (row >= rows) return;
    int nt = min(TOKEN_TILE, tokens - t0);
    int nb = cols / 32;
    size_t at = (size_t)row * nb * F::BYTES;
    float g[TOKEN_TILE], u[TOKEN_TILE];
#pragma unroll
    for (int t = 0; t < TOKEN_TILE; t++) g[t] = u[t] = 0.0f;
    for (int b = lane; b < nb; b += 32) {
        int gw[8], uw[8];
        float gd, gm, ud, um;
        F::load(wg + at + (size_t)b * F::BYTES, gw, gd, gm);
        F::load(wu + at + (size_t)b * F::BYTES, uw, ud, um);
#pragma unroll
        for (int t = 0; t < TOKEN_TILE; t++) {
            if (t < nt) {
                size_t xb = (size_t)(t0 + t) * nb + b;
                int xv[8];
                load_acts(x, xb, xv);
                float xd = x.d[xb], xs = x.s[xb];
                g[t] += gd * xd * (float)dot_bytes(gw, xv) + gm * xs;
                u[t] += ud * xd * (float)dot_bytes(uw, xv) + um * xs;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TOKEN_TILE; t++) {
        if (t < nt) {
            float gs = warp_sum(g[t]), us = warp_sum(u[t]);
            if (lane == 0) out[(size_t)(t0 + t) * rows + row] = gs / (1.0f + __expf(-gs)) * us;
        }
    }
}

#define GEMV_KERNELS(SUFFIX, F)                                                                \
    extern "C" __global__ void gemv_##SUFFIX(float *y, const u8 *w, const i8 *xq,              \
                                             const float *xd, const float *xs, int rows,       \
                                             int cols, int tokens) {                           \
        gemv_blocks<F>(y, w, QActs{xq, xd, xs}, rows, cols, tokens);                           \
    }                                                                                          \
    extern "C" __global__ void gemv_qkv_##SUFFIX(                                              \
        float *q, float *k, float *v, const u8 *wq, const u8 *wk, const u8 *wv, const i8 *xq,  \
        const float *xd, const float *xs, int q_rows, int kv_rows, int cols, int tokens) {     \
        gemv_qkv<F>(q, k, v, wq, wk, wv, QActs{xq, xd, xs}, q_rows, kv_rows, cols, tokens);    \
    }                                                                                          \
    extern "C" __global__ void gemv_swiglu_##SUFFIX(float *out, const u8 *wg, const u8 *wu,    \
                                                    const i8 *xq, const float *xd,             \
                                                    const float *xs, int rows, int cols,       \
                                                    int tokens) {                              \
        gemv_swiglu<F>(out, wg, wu, QActs{xq, xd, xs}, rows, cols, tokens);                    \
    }
GEMV_KERNELS(q8_0, Q8_0)
GEMV_KERNELS(q4_1, Q4_1)
GEMV_KERNELS(q4_0, Q4_0)

// As `gemv_blocks`, for an f32 matrix (formats without a kernel here are dequantized to f32 at
// upload), a token per grid row and lanes over columns (any width). `w` is the matrix's bytes;
// `tokens` is the grid's y (unused).
extern "C" __global__ void gemv_f32(float *y, const u8 *w, const float *x, int rows, int cols,
                                    int tokens) {
    int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31, t = blockIdx.y;
    if (row >= rows) return;
    const float *wr = (const float *)w + (size_t)row * cols;
    const float *xt = x + (size_t)t * cols;
    float acc = 0.0f;
    for (int c = lane; c < cols; c += 32) acc += wr[c] * xt[c];
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)t * rows + row] = acc;
}

// x[t, i] += b[i] for `rows` rows of `width` (the Q/K/V biases). Grid: rows; block: 256.
extern "C" __global__ void bias_add_f32(float *x, const float *b, int width) {
    float *row = x + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) row[i] += b[i];
}

// out[j] = x[idx[j]] for rows of `width` (the rows that asked for logits). Grid: rows out.
extern "C" __global__ void gather_rows_f32(float *out, const float *x, const u32 *idx, int width) {
    const float *src = x + (size_t)idx[blockIdx.x] * width;
    float *dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}
