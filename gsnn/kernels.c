/* The organism's hot loops for the CPU: float32, row-major, contiguous, one thread.
 *
 * gsnn/native.py compiles this file on first use (cc -O3 -march=native -ffp-contract=off ...)
 * and gsnn/kernels.py calls it through ctypes; gsnn/kernels.py also holds a torch twin of every
 * function (used on GPUs and where no C compiler is found), and tests/test_kernels.py checks that
 * the two agree and that the LIF steps are bit-identical to Norse's lif_feed_forward_step.
 *
 * Why C: one LIF step is ~9 elementwise passes over the (B, H) state, so torch's eager ops
 * stream the state through memory ~90 times per decision; here a block of a world's neurons
 * stays in registers and L1 for all T steps, and the input current, readout, action and the
 * learner's record of a decision are one call instead of dozens of small ops.
 *
 * Memory layout of the work: rows (worlds, or decisions of a rollout) are taken in chunks of
 * CHUNK_ROWS, and within a chunk the hidden neurons in blocks of HBLOCK. A block's slice of the
 * input weights (N x HBLOCK floats, 115 KB for N = 450) then stays in L2 while every row of the
 * chunk reads or updates it; whole rows of W (2 KB each at H = 512) scattered over 0.9 MB would
 * come from L3 for every active input. (An update's rows are all taken as one chunk, their
 * active inputs listed compactly first.) The slice is copied to (or accumulated in) a contiguous
 * buffer first: read in place, its rows lie H floats apart, and with H a power of two they all
 * fall into a few cache sets and evict each other (measured: up to 2x slower, varying from
 * process to process with the physical pages).
 *
 * LIF parameters `p` (5 floats): p[0] = dt * tau_mem_inv, p[1] = -dt * tau_syn_inv, p[2] = v_leak,
 * p[3] = v_th, p[4] = v_reset, each the float32 value Norse's step multiplies or compares with.
 * One step, as Norse computes it (no fused multiply-add: -ffp-contract=off keeps the rounding):
 *     i_new = i + x;  v' = v + p0 * ((v_leak - v) + i_new);  i = i_new + p1 * i_new
 *     z = (v' - v_th > 0);  v = z ? v_reset : v'
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define HBLOCK 64      /* hidden neurons per block */
#define CHUNK_ROWS 256 /* rows per chunk */
#define COPY_ROWS 32   /* chunks with at least this many rows work on a contiguous copy of each block */

/* One step of one neuron, Norse's arithmetic (see the top), on local copies of its v and i;
 * sets z to the spike, 0.0 or 1.0. (A macro: gcc vectorises the loops around it, which it does
 * not for every inlined function that writes through pointers.) */
#define LIF_STEP(x, v, i, z)                                                                    \
    do {                                                                                        \
        const float inew_ = (i) + (x);                                                          \
        const float vp_ = (v) + q[0] * ((q[2] - (v)) + inew_);                                  \
        (i) = inew_ + q[1] * inew_;                                                             \
        (z) = (vp_ - q[3]) > 0.0f ? 1.0f : 0.0f;                                                \
        (v) = (vp_ - q[3]) > 0.0f ? q[4] : vp_;                                                 \
    } while (0)

/* Eight floats as one value (GCC/Clang vector extensions: AVX on x86-64, two SSE or NEON
 * registers elsewhere). A full block's neurons are stepped eight at a time with v and i kept in
 * registers for all T steps; a loop over the block per step would load and store them T times.
 * Same operations in the same order as LIF_STEP, so the results are identical. */
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
#define LANES 8

static inline vf8 load8(const float *p) {
    vf8 r;
    memcpy(&r, p, sizeof r);
    return r;
}
static inline void store8(float *p, vf8 v) { memcpy(p, &v, sizeof v); }
static inline vf8 splat8(float x) { return (vf8){x, x, x, x, x, x, x, x}; }
static inline vf8 select8(vi8 mask, vf8 yes, vf8 no) { return (vf8)((mask & (vi8)yes) | (~mask & (vi8)no)); }

/* One LIF step of eight neurons (LIF_STEP's arithmetic); returns the spike mask (-1 where z).
 * With leak_zero (v_leak == 0) the leak term (0 - v) + i_new is computed as i_new - v, the same
 * number in one operation; v' > v_th is the same test as v' - v_th > 0 for finite values (a
 * rounded difference is zero only for equal operands and never changes sign). */
static inline vi8 lif_step8(vf8 x, vf8 *v, vf8 *i, const vf8 *q, const int leak_zero) {
    const vf8 inew = *i + x;
    const vf8 vp = *v + q[0] * (leak_zero ? inew - *v : (q[2] - *v) + inew);
    *i = inew + q[1] * inew;
    const vi8 spike = vp > q[3];
    *v = select8(spike, q[4], vp);
    return spike;
}

/* What a learning decision records of its neurons besides their counts (lif_32's `record`). */
enum { RECORD_NONE, RECORD_STDP, RECORD_BITS };

/* T steps of 32 neurons at x, v, i with four groups of eight interleaved (independent chains
 * keep the core busy); spike counts to counts. With record (a constant at every call, so each
 * inlined copy keeps only its own work) also RECORD_STDP: each neuron's STDP factor
 * sum_t z_t w[t] (gsnn.neurons.stdp_step_weights; one more register per group and one AND and one
 * add per step) to stdp; RECORD_BITS: its spikes as the bits of an int16, bit t = step t (T <= 15),
 * from which R-STDP's update rebuilds the counts (popcount) and the factor
 * (gsnn_rstdp_directions_from_spikes), to bits. */
static inline void lif_32(int64_t T, const float *restrict x, const vf8 *q, float *restrict v, float *restrict i,
                          float *restrict counts, const int leak_zero, const int record, const float *restrict w,
                          float *restrict stdp, int16_t *restrict bits) {
    vf8 vj[4], ij[4], xj[4], f[4];
    vi8 c[4], b[4];
    for (int k = 0; k < 4; k++) {
        vj[k] = load8(v + k * LANES);
        ij[k] = load8(i + k * LANES);
        xj[k] = load8(x + k * LANES);
        c[k] = b[k] = (vi8){0, 0, 0, 0, 0, 0, 0, 0};
        f[k] = splat8(0.0f);
    }
    for (int64_t t = 0; t < T; t++) {
        const vf8 wt = splat8(record == RECORD_STDP ? w[t] : 0.0f);
        const int32_t one = record == RECORD_BITS ? (int32_t)1 << t : 0;
        const vi8 bit = {one, one, one, one, one, one, one, one};
        for (int k = 0; k < 4; k++) {
            const vi8 spike = lif_step8(xj[k], &vj[k], &ij[k], q, leak_zero);
            c[k] -= spike; /* mask -1: +1 */
            if (record == RECORD_STDP) f[k] += (vf8)(spike & (vi8)wt); /* z * w: w or +0, the same sum */
            if (record == RECORD_BITS) b[k] |= spike & bit;
        }
    }
    for (int k = 0; k < 4; k++) {
        store8(v + k * LANES, vj[k]);
        store8(i + k * LANES, ij[k]);
        vf8 cf;
        for (int l = 0; l < LANES; l++) cf[l] = (float)c[k][l];
        store8(counts + k * LANES, cf);
        if (record == RECORD_STDP) store8(stdp + k * LANES, f[k]);
        if (record == RECORD_BITS)
            for (int l = 0; l < LANES; l++) bits[k * LANES + l] = (int16_t)b[k][l];
    }
}

/* T steps of n neurons with constant input x, in place on v and i; counts receive the spikes.
 * A learner's record besides, if asked (at most one): stdp, each neuron's STDP factor
 * sum_t z_t w[t] summed in step order; bits, its spikes as the bits of an int16 (T <= 15). */
static inline void lif_block(int64_t n, int64_t T, const float *restrict x, const float *restrict p,
                             float *restrict v, float *restrict i, float *restrict counts, const float *restrict w,
                             float *restrict stdp, int16_t *restrict bits) {
    if (n == HBLOCK) {
        const vf8 q[5] = {splat8(p[0]), splat8(p[1]), splat8(p[2]), splat8(p[3]), splat8(p[4])};
        const int leak_zero = p[2] == 0.0f; /* each call below with constants: its own inlined copy */
        for (int64_t j = 0; j < HBLOCK; j += 4 * LANES) {
            if (stdp) {
                if (leak_zero)
                    lif_32(T, x + j, q, v + j, i + j, counts + j, 1, RECORD_STDP, w, stdp + j, NULL);
                else
                    lif_32(T, x + j, q, v + j, i + j, counts + j, 0, RECORD_STDP, w, stdp + j, NULL);
            } else if (bits) {
                if (leak_zero)
                    lif_32(T, x + j, q, v + j, i + j, counts + j, 1, RECORD_BITS, NULL, NULL, bits + j);
                else
                    lif_32(T, x + j, q, v + j, i + j, counts + j, 0, RECORD_BITS, NULL, NULL, bits + j);
            } else if (leak_zero)
                lif_32(T, x + j, q, v + j, i + j, counts + j, 1, RECORD_NONE, NULL, NULL, NULL);
            else
                lif_32(T, x + j, q, v + j, i + j, counts + j, 0, RECORD_NONE, NULL, NULL, NULL);
        }
        return;
    }
    const float q[5] = {p[0], p[1], p[2], p[3], p[4]};
    for (int64_t h = 0; h < n; h++) {
        counts[h] = 0.0f;
        if (stdp) stdp[h] = 0.0f;
        if (bits) bits[h] = 0;
    }
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < n; h++) {
            float vh = v[h], ih = i[h], z;
            LIF_STEP(x[h], vh, ih, z);
            v[h] = vh;
            i[h] = ih;
            counts[h] += z;
            if (stdp) stdp[h] += z * w[t];
            if (bits) bits[h] = (int16_t)(bits[h] | (z != 0.0f ? 1 << t : 0));
        }
}

static inline double sum8(const float *restrict part) {
    return ((double)part[0] + part[1] + part[2] + part[3]) + ((double)part[4] + part[5] + part[6] + part[7]);
}

/* Sum of n floats in 8 independent partial sums (so it vectorises). */
static inline double row_sum(int64_t n, const float *restrict a) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t h = 0;
    for (; h + 8 <= n; h += 8)
        for (int k = 0; k < 8; k++) part[k] += a[h + k];
    double total = sum8(part);
    for (; h < n; h++) total += a[h];
    return total;
}

/* x += o * w over n floats. Out of line: inlined into a loop over active inputs, gcc vectorises
 * across the inputs with gathers instead, about 30x slower. */
static __attribute__((noinline)) void axpy(int64_t n, float o, const float *restrict w, float *restrict x) {
    for (int64_t h = 0; h < n; h++) x[h] += o * w[h];
}

/* y[0:n] += o * w[0:n] for one block: a fixed trip count when the block is full. */
static inline void axpy_block(int64_t n, float o, const float *restrict w, float *restrict y) {
    if (n == HBLOCK)
        for (int64_t h = 0; h < HBLOCK; h++) y[h] += o * w[h];
    else
        axpy(n, o, w, y);
}

/* Bit k set where p[k] is non-zero (NaN counts: it compares unequal), for eight floats. */
static inline unsigned nonzero_mask8(const float *p) {
    const vi8 nonzero = load8(p) != splat8(0.0f);
#if defined(__AVX__)
    return (unsigned)__builtin_ia32_movmskps256((__attribute__((vector_size(32))) float)nonzero);
#else
    unsigned mask = 0;
    for (int k = 0; k < LANES; k++) mask |= (unsigned)(nonzero[k] & 1) << k;
    return mask;
#endif
}

/* Asks for n floats at a and at b to be brought into the cache: the next rows of a block of two
 * (rows, H) arrays, whose rows lie H floats apart (the hardware's own prefetch does not cross
 * the 4 KB pages they span; without this the first load of each row stalled). */
static inline void prefetch_two(int64_t n, const float *a, const float *b) {
    for (int64_t j = 0; j < n; j += 16) {
        __builtin_prefetch(a + j);
        __builtin_prefetch(b + j);
    }
}

/* The non-zero inputs of one row: their indices in increasing order into `active` and their
 * values into `vals` (read later without touching the observation again), their count returned;
 * *unit (if given) is set to whether every one of those values is exactly 1. Eight floats are
 * tested at once and only the non-zero ones visited (the observation is about 6% non-zero). */
static inline int32_t scan_row(int64_t N, const float *restrict obs, int32_t *restrict active, float *restrict vals,
                               int8_t *unit) {
    int64_t n = 0;
    int32_t na = 0;
    int all_one = 1;
    for (; n + LANES <= N; n += LANES)
        for (unsigned mask = nonzero_mask8(obs + n); mask; mask &= mask - 1) {
            const int64_t k = n + __builtin_ctz(mask);
            active[na] = (int32_t)k;
            vals[na] = obs[k];
            all_one &= obs[k] == 1.0f;
            na++;
        }
    for (; n < N; n++)
        if (obs[n] != 0.0f) {
            active[na] = (int32_t)n;
            vals[na] = obs[n];
            all_one &= obs[n] == 1.0f;
            na++;
        }
    if (unit) *unit = (int8_t)all_one;
    return na;
}

/* The active inputs of all R rows, compactly: row r's are cols[start[r]:start[r + 1]] with
 * values vals[...], all 1 where unit[r] (malloc'ed; free_rows releases them). */
typedef struct {
    int64_t *start;
    int32_t *cols;
    float *vals;
    int8_t *unit;
} active_rows;

static void free_rows(active_rows *a) {
    free(a->start);
    free(a->cols);
    free(a->vals);
    free(a->unit);
}

/* Returns 0, or -1 if out of memory (with nothing left allocated). One pass over the rows: cols
 * and vals are allocated for every value being active (R * N), of which only the pages the
 * active entries reach are ever touched (a second pass to count them first read the whole
 * observation twice). */
static int scan_all_rows(int64_t R, int64_t N, const float *obs, active_rows *a) {
    a->start = malloc(sizeof(int64_t) * (size_t)(R + 1));
    a->cols = malloc(sizeof(int32_t) * (size_t)(R * N + 1)); /* + 1: never malloc(0) */
    a->vals = malloc(sizeof(float) * (size_t)(R * N + 1));
    a->unit = malloc((size_t)R + 1);
    if (!a->start || !a->cols || !a->vals || !a->unit) {
        free_rows(a);
        return -1;
    }
    int64_t total = 0;
    for (int64_t r = 0; r < R; r++) {
        a->start[r] = total;
        total += scan_row(N, obs + r * N, a->cols + total, a->vals + total, a->unit + r);
    }
    a->start[R] = total;
    return 0;
}

/* Active inputs of rows [r0, r0 + rows): at active/vals + (r - r0) * N, counts in n_active,
 * whether they are all 1 in unit. */
static void scan_rows(int64_t r0, int64_t rows, int64_t N, const float *obs, int32_t *active, float *vals,
                      int32_t *n_active, int8_t *unit) {
    for (int64_t r = 0; r < rows; r++)
        n_active[r] = scan_row(N, obs + (r0 + r) * N, active + r * N, vals + r * N, unit + r);
}

/* Input current of one row on a block of n neurons: x = (sum over its active inputs, in
 * increasing order, of obs[k] * Wb[k, :]) + bias, as embedding_bag over the non-zero cells then
 * + bias. Wb: the block's columns of W, rows `stride` floats apart; bias: the block's. With unit
 * (every active value is 1, as in the foraging world's observations) the products are the
 * weights themselves (1 * w == w exactly), so they are added without the multiplication. */
static inline void input_block(int64_t n, int64_t stride, int32_t na, const int32_t *restrict active,
                               const float *restrict vals, int unit, const float *restrict Wb,
                               const float *restrict bias, float *restrict x) {
    if (n == HBLOCK) { /* the block's sums in eight registers while the active inputs stream by */
        vf8 acc[HBLOCK / LANES];
        for (int j = 0; j < HBLOCK / LANES; j++) acc[j] = splat8(0.0f);
        if (unit) {
            for (int32_t k = 0; k < na; k++) {
                const float *w = Wb + (int64_t)active[k] * stride;
                for (int j = 0; j < HBLOCK / LANES; j++) acc[j] += load8(w + j * LANES);
            }
            for (int j = 0; j < HBLOCK / LANES; j++) store8(x + j * LANES, acc[j] + load8(bias + j * LANES));
            return;
        }
        for (int32_t k = 0; k < na; k++) {
            const vf8 o = splat8(vals[k]);
            const float *w = Wb + (int64_t)active[k] * stride;
            for (int j = 0; j < HBLOCK / LANES; j++) acc[j] += o * load8(w + j * LANES);
        }
        for (int j = 0; j < HBLOCK / LANES; j++) store8(x + j * LANES, acc[j] + load8(bias + j * LANES));
        return;
    }
    for (int64_t h = 0; h < n; h++) x[h] = 0.0f;
    for (int32_t k = 0; k < na; k++) axpy_block(n, vals[k], Wb + (int64_t)active[k] * stride, x);
    for (int64_t h = 0; h < n; h++) x[h] += bias[h];
}

/* For each active input k of a row (indices active, values vals): block[k, :] += (w * vals) * g, with block (N, n)
 * contiguous and g the row's n values (held in registers for a full block). */
static inline void scatter_block(int64_t n, int32_t na, const int32_t *restrict active, const float *restrict vals,
                                 float w, int weighted, const float *restrict g, float *restrict block) {
    if (n == HBLOCK) {
        vf8 gj[HBLOCK / LANES];
        for (int j = 0; j < HBLOCK / LANES; j++) gj[j] = load8(g + j * LANES);
        for (int32_t k = 0; k < na; k++) {
            const vf8 o = splat8(weighted ? w * vals[k] : vals[k]);
            float *row = block + (int64_t)active[k] * HBLOCK;
            for (int j = 0; j < HBLOCK / LANES; j++) store8(row + j * LANES, load8(row + j * LANES) + o * gj[j]);
        }
        return;
    }
    for (int32_t k = 0; k < na; k++) axpy(n, weighted ? w * vals[k] : vals[k], g, block + (int64_t)active[k] * n);
}

/* Columns [h0, h0 + n) of the (N, H) matrix M, to dst (N, n) contiguous, or back (add != 0:
 * M[:, h0:h0 + n] += dst). */
static void block_copy(int64_t N, int64_t H, int64_t h0, int64_t n, float *M, float *dst, int add) {
    if (n == HBLOCK && !add) { /* a fixed size: copied in vector registers (else a loop of 8-byte moves) */
        for (int64_t k = 0; k < N; k++) memcpy(dst + k * HBLOCK, M + k * H + h0, HBLOCK * sizeof(float));
        return;
    }
    for (int64_t k = 0; k < N; k++) {
        float *row = M + k * H + h0, *b = dst + k * n;
        if (add)
            for (int64_t h = 0; h < n; h++) row[h] += b[h];
        else
            memcpy(b, row, (size_t)n * sizeof(float));
    }
}

/* Dot product of two rows in 8 independent partial sums (so it vectorises). */
static inline float dot(int64_t H, const float *restrict a, const float *restrict b) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t h = 0;
    for (; h + 8 <= H; h += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[h + k] * b[h + k];
    float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; h < H; h++) total += a[h] * b[h];
    return total;
}

/* wt (A, H) = w (H, A) transposed: each action's readout weights contiguous. */
static void transpose(int64_t H, int64_t A, const float *restrict w, float *restrict wt) {
    for (int64_t h = 0; h < H; h++)
        for (int64_t a = 0; a < A; a++) wt[a * H + h] = w[h * A + a];
}

/* Softmax of A logits into probs (max subtracted, as torch.softmax). */
static void softmax(int64_t A, const float *restrict logits, float *restrict probs) {
    float m = logits[0], total = 0.0f;
    for (int64_t a = 1; a < A; a++) m = logits[a] > m ? logits[a] : m;
    for (int64_t a = 0; a < A; a++) total += probs[a] = expf(logits[a] - m);
    for (int64_t a = 0; a < A; a++) probs[a] /= total;
}

/* Everything one decision of B worlds reads and writes; NULL pointers skip an output. Keep in
 * step with gsnn.kernels.DecideArgs. */
typedef struct {
    int64_t B, N, H, T, A;
    const float *obs;     /* (B, N) observations */
    const float *W;       /* (N, H) input weights */
    const float *bias;    /* (H) hidden bias */
    const float *p;       /* (5) LIF constants (see the top) */
    float *v, *i;         /* (B, H) LIF state, updated in place */
    float *counts;        /* (B, H) out: spikes per neuron over the T steps */
    const float *wout;    /* (H, A) readout weights */
    const float *bout;    /* (A) readout bias */
    float *logits;        /* (B, A) out: counts @ wout + bout */
    int64_t *actions;     /* (B) out: argmax of the logits, or sampled when uniform is given */
    const float *uniform; /* (B) in [0, 1): action = first a with cumsum(softmax(logits))_a > u */
    float *obs_out;       /* (B, N) out: a copy of obs */
    float *x_out, *v0_out, *i0_out; /* (B, H) out: input current, state before the decision */
    const float *stdp_w;  /* (T) STDP step weights (gsnn.neurons.stdp_step_weights) */
    float *hidden_post;   /* (B, H) out, with stdp_w: (sum_t z_t stdp_w[t]) * (wout @ action_post) */
    float *action_post;   /* (B, A) out: onehot(action) - softmax(logits) */
    float *rate_ema;      /* (H) in place: ema * (1 - alpha) + (alpha / T) * mean over worlds of counts */
    float rate_alpha;
    double sums[3];       /* out: sum of obs (NaN/Inf show here), spikes, sum of logits */
    float *scratch;       /* H * (A + 2) + A + N * HBLOCK floats */
    int32_t *active;      /* min(B, CHUNK_ROWS) * N ints */
    float *vals;          /* min(B, CHUNK_ROWS) * N floats */
    int32_t *n_active;    /* min(B, CHUNK_ROWS) ints */
    int16_t *spikes_out;  /* (B, H) out: each neuron's spikes as bits, bit t = step t (T <= 15) */
    int32_t *inputs_out;  /* (B * N) out, with the next two: the active inputs of every world, world */
    float *input_values_out; /*   after world (indices in increasing order, their values), and */
    int32_t *input_counts_out; /* (B) how many each world has (a compact record of the observation) */
} decide_args;

/* Readout, action and the learner's per-world record of world b, once its counts are complete. */
static void finish_world(decide_args *d, int64_t b, const float *wout_t, float *feedback, float *probs,
                         double *logit_total) {
    const int64_t H = d->H, A = d->A;
    const float *counts = d->counts + b * H;
    float *l = d->logits + b * A;
    for (int64_t a = 0; a < A; a++) {
        l[a] = dot(H, counts, wout_t + a * H) + d->bout[a];
        *logit_total += l[a];
    }
    if (!d->actions) return;
    int64_t chosen = 0;
    if (d->uniform) {
        softmax(A, l, probs);
        float cumulative = 0.0f;
        chosen = A - 1; /* if rounding leaves the total below u */
        for (int64_t a = 0; a < A; a++) {
            cumulative += probs[a];
            if (d->uniform[b] < cumulative) {
                chosen = a;
                break;
            }
        }
    } else {
        for (int64_t a = 1; a < A; a++)
            if (l[a] > l[chosen]) chosen = a;
    }
    d->actions[b] = chosen;
    if (!d->action_post || !d->uniform) return;
    float *post = d->action_post + b * A;
    for (int64_t a = 0; a < A; a++) post[a] = (a == chosen ? 1.0f : 0.0f) - probs[a];
    if (!d->hidden_post) return;
    for (int64_t h = 0; h < H; h++) feedback[h] = 0.0f;
    for (int64_t a = 0; a < A; a++) axpy(H, post[a], wout_t + a * H, feedback);
    float *hp = d->hidden_post + b * H; /* holds the STDP factor of each neuron until here */
    for (int64_t h = 0; h < H; h++) hp[h] *= feedback[h];
}

/* One decision of B worlds: input current from the active inputs, T LIF steps, readout,
 * action, and what a learner keeps (see decide_args). Every observation is read before anything
 * is written: if their sum is not finite, returns 1 with the state untouched; else 0. */
int gsnn_decide(decide_args *d) {
    const int64_t B = d->B, N = d->N, H = d->H, T = d->T, A = d->A;
    d->sums[0] = row_sum(B * N, d->obs);
    if (!isfinite(d->sums[0])) return 1;
    double spikes = 0.0, logit_total = 0.0;
    float *wout_t = d->scratch, *feedback = wout_t + A * H, *rate_sum = feedback + H, *probs = rate_sum + H,
          *w_block = probs + A;
    transpose(H, A, d->wout, wout_t);
    if (d->rate_ema)
        for (int64_t h = 0; h < H; h++) rate_sum[h] = 0.0f;
    const int stdp = d->stdp_w && d->hidden_post;
    int64_t recorded = 0; /* active inputs written to inputs_out so far */
    for (int64_t b0 = 0; b0 < B; b0 += CHUNK_ROWS) {
        const int64_t rows = B - b0 < CHUNK_ROWS ? B - b0 : CHUNK_ROWS;
        int8_t unit[CHUNK_ROWS];
        scan_rows(b0, rows, N, d->obs, d->active, d->vals, d->n_active, unit);
        if (d->obs_out) memcpy(d->obs_out + b0 * N, d->obs + b0 * N, (size_t)(rows * N) * sizeof(float));
        if (d->inputs_out)
            for (int64_t r = 0; r < rows; r++) {
                const int32_t na = d->n_active[r];
                memcpy(d->inputs_out + recorded, d->active + r * N, (size_t)na * sizeof(int32_t));
                memcpy(d->input_values_out + recorded, d->vals + r * N, (size_t)na * sizeof(float));
                d->input_counts_out[b0 + r] = na;
                recorded += na;
            }
        for (int64_t h0 = 0; h0 < H; h0 += HBLOCK) {
            const int64_t n = H - h0 < HBLOCK ? H - h0 : HBLOCK;
            const int copy = rows >= COPY_ROWS;
            if (copy) block_copy(N, H, h0, n, (float *)d->W, w_block, 0);
            const float *Wb = copy ? w_block : d->W + h0;
            const int64_t stride = copy ? n : H;
            for (int64_t r = 0; r < rows; r++) {
                const int64_t b = b0 + r, o = b * H + h0;
                if (r + 2 < rows) prefetch_two(n, d->v + o + 2 * H, d->i + o + 2 * H);
                float x_local[HBLOCK];
                float *x = d->x_out ? d->x_out + o : x_local;
                input_block(n, stride, d->n_active[r], d->active + r * N, d->vals + r * N, unit[r], Wb, d->bias + h0,
                            x);
                if (d->v0_out) memcpy(d->v0_out + o, d->v + o, (size_t)n * sizeof(float));
                if (d->i0_out) memcpy(d->i0_out + o, d->i + o, (size_t)n * sizeof(float));
                lif_block(n, T, x, d->p, d->v + o, d->i + o, d->counts + o, d->stdp_w,
                          stdp ? d->hidden_post + o : NULL, !stdp && d->spikes_out ? d->spikes_out + o : NULL);
            }
        }
        for (int64_t b = b0; b < b0 + rows; b++) {
            spikes += row_sum(H, d->counts + b * H);
            if (d->rate_ema)
                for (int64_t h = 0; h < H; h++) rate_sum[h] += d->counts[b * H + h];
            finish_world(d, b, wout_t, feedback, probs, &logit_total);
        }
    }
    if (d->rate_ema) {
        const float keep = 1.0f - d->rate_alpha, gain = d->rate_alpha / (float)T;
        for (int64_t h = 0; h < H; h++) {
            /* A rate below FLT_MIN is stored as zero (as Adam's moments): a silent neuron's rate
             * would otherwise decay into the subnormals, and every later decision pays for them. */
            const float rate = d->rate_ema[h] * keep + gain * (rate_sum[h] / (float)B);
            d->rate_ema[h] = rate < FLT_MIN ? 0.0f : rate;
        }
    }
    d->sums[1] = spikes;
    d->sums[2] = logit_total;
    return 0;
}

/* The surrogate gradient of a block of n neurons' T-step spike counts with respect to their
 * constant input: given x, the state before (v0, i0) and g = dL/dcounts, writes gx. Norse's
 * SuperSpike surrogate dz/dv' = 1 / (|v' - v_th| + 1)^2, also through the reset; the forward is
 * recomputed from (x, v0, i0), so nothing per step is stored between the decision and the
 * update. The recursion is gsnn.neurons.surrogate_backward_torch's. vps: T * HBLOCK floats. */
/* surrogate_block for 32 neurons, four groups of eight interleaved (the same arithmetic). */
static inline void surrogate_32(int64_t T, const float *restrict x, const float *restrict v0,
                                const float *restrict i0, const float *restrict g, const float *restrict p,
                                float *restrict gx, float *restrict counts, float *restrict vps) {
    const vf8 q[5] = {splat8(p[0]), splat8(p[1]), splat8(p[2]), splat8(p[3]), splat8(p[4])};
    const vf8 a = q[0], one = splat8(1.0f), one_minus_a = splat8(1.0f - p[0]), one_minus_b = splat8(1.0f + p[1]);
    const vi8 sign = (vi8)splat8(-0.0f);
    vf8 v[4], i[4], xj[4], c[4];
    for (int k = 0; k < 4; k++) {
        v[k] = load8(v0 + k * LANES);
        i[k] = load8(i0 + k * LANES);
        xj[k] = load8(x + k * LANES);
        c[k] = splat8(0.0f);
    }
    for (int64_t t = 0; t < T; t++)
        for (int k = 0; k < 4; k++) { /* the forward as the C decision, recording v' */
            const vf8 inew = i[k] + xj[k];
            const vf8 vp = v[k] + a * ((q[2] - v[k]) + inew);
            i[k] = inew + q[1] * inew;
            store8(vps + (t * 4 + k) * LANES, vp);
            const vi8 spike = (vp - q[3]) > splat8(0.0f);
            c[k] += (vf8)(spike & (vi8)one);
            v[k] = select8(spike, q[4], vp);
        }
    for (int k = 0; k < 4; k++) store8(counts + k * LANES, c[k]);
    vf8 gv[4], gi[4], acc[4], gj[4];
    for (int k = 0; k < 4; k++) {
        gv[k] = gi[k] = acc[k] = splat8(0.0f);
        gj[k] = load8(g + k * LANES);
    }
    for (int64_t t = T - 1; t >= 0; t--)
        for (int k = 0; k < 4; k++) {
            const vf8 vp = load8(vps + (t * 4 + k) * LANES);
            const vf8 over = vp - q[3];
            const vf8 d = (vf8)((vi8)over & ~sign) + one; /* |v' - v_th| + 1 */
            const vf8 s = one / (d * d);
            const vf8 not_spiked = (vf8)(~(over > splat8(0.0f)) & (vi8)one); /* 1 - z */
            const vf8 through = not_spiked + (q[4] - vp) * s;
            const vf8 gvp = gv[k] * through + gj[k] * s;
            const vf8 gn = gi[k] * one_minus_b + a * gvp;
            acc[k] += gn;
            gv[k] = gvp * one_minus_a;
            gi[k] = gn;
        }
    for (int k = 0; k < 4; k++) store8(gx + k * LANES, acc[k]);
}

static void surrogate_block(int64_t n, int64_t T, const float *restrict x, const float *restrict v0,
                            const float *restrict i0, const float *restrict g, const float *restrict p,
                            float *restrict gx, float *restrict counts, float *restrict vps) {
    if (n == HBLOCK) {
        for (int64_t j = 0; j < HBLOCK; j += 4 * LANES)
            surrogate_32(T, x + j, v0 + j, i0 + j, g + j, p, gx + j, counts + j, vps);
        return;
    }
    const float a = p[0], nds = p[1], vl = p[2], th = p[3], vr = p[4];
    const float one_minus_a = 1.0f - a, one_minus_b = 1.0f + nds;
    float v[HBLOCK], i[HBLOCK], gv[HBLOCK], gi[HBLOCK], acc[HBLOCK];
    for (int64_t k = 0; k < n; k++) {
        v[k] = v0[k];
        i[k] = i0[k];
        gv[k] = gi[k] = acc[k] = counts[k] = 0.0f;
    }
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < n; k++) {
            const float inew = i[k] + x[k];
            const float vp = v[k] + a * ((vl - v[k]) + inew);
            i[k] = inew + nds * inew;
            vps[t * HBLOCK + k] = vp;
            counts[k] += (vp - th) > 0.0f ? 1.0f : 0.0f;
            v[k] = (vp - th) > 0.0f ? vr : vp;
        }
    for (int64_t t = T - 1; t >= 0; t--)
        for (int64_t k = 0; k < n; k++) {
            const float vp = vps[t * HBLOCK + k];
            const float d = fabsf(vp - th) + 1.0f;
            const float s = 1.0f / (d * d);
            const float through = ((vp - th) > 0.0f ? 0.0f : 1.0f) + (vr - vp) * s;
            const float gvp = gv[k] * through + g[k] * s;
            const float gn = gi[k] * one_minus_b + a * gvp;
            acc[k] += gn;
            gv[k] = gvp * one_minus_a;
            gi[k] = gn;
        }
    for (int64_t k = 0; k < n; k++) gx[k] = acc[k];
}

/* Readout gradient of one row on a block: acc[a * HBLOCK + h] += counts[h] * coef[a]. */
static inline void readout_block(int64_t n, int64_t A, const float *restrict counts, const float *restrict coef,
                                 float *restrict acc) {
    for (int64_t a = 0; a < A; a++) axpy_block(n, coef[a], counts, acc + a * HBLOCK);
}

/* acc (A, HBLOCK) into out (H, A) at rows [h0, h0 + n). */
static inline void readout_store(int64_t n, int64_t A, int64_t h0, const float *restrict acc, float *restrict out) {
    for (int64_t h = 0; h < n; h++)
        for (int64_t a = 0; a < A; a++) out[(h0 + h) * A + a] = acc[a * HBLOCK + h];
}

/* REINFORCE's backward below the logits, for R decisions (rows), each recomputed from what it
 * started from: the observation obs_r (R, N) and the LIF state (v0_r, i0_r) (R, H). Per row:
 * x = input current (W (N, H), bias), the T LIF steps giving counts and v'_t; then the readout's
 * gradient gWout (H, A) += counts^T g_logits_r, g_counts = g_logits_r @ wout^T (wout (H, A))
 * through the steps (surrogate_block) to gx, into the hidden bias gb (H) += gx and the input
 * weights of the row's active inputs gW (N, H) += obs_r^T gx. Every output is written.
 * Returns 0, or -1 if out of memory. */
int gsnn_reinforce_backward(int64_t R, int64_t N, int64_t H, int64_t T, int64_t A, const float *obs,
                            const float *v0, const float *i0, const float *g_logits, const float *W,
                            const float *bias, const float *wout, const float *p, float *gW, float *gb,
                            float *gWout) {
    float *wout_t = malloc(sizeof(float) * (size_t)(A * H + T * HBLOCK + 2 * N * HBLOCK + A * HBLOCK));
    active_rows act;
    if (!wout_t || scan_all_rows(R, N, obs, &act) != 0) {
        free(wout_t);
        return -1;
    }
    float *vps = wout_t + A * H, *g_block = vps + T * HBLOCK, *w_block = g_block + N * HBLOCK,
          *ro = w_block + N * HBLOCK;
    transpose(H, A, wout, wout_t);
    memset(gW, 0, sizeof(float) * (size_t)(N * H));
    for (int64_t h0 = 0; h0 < H; h0 += HBLOCK) {
        const int64_t n = H - h0 < HBLOCK ? H - h0 : HBLOCK;
        block_copy(N, H, h0, n, (float *)W, w_block, 0);
        memset(g_block, 0, sizeof(float) * (size_t)(N * n));
        memset(ro, 0, sizeof(float) * (size_t)(A * HBLOCK));
        float bias_grad[HBLOCK] = {0};
        for (int64_t r = 0; r < R; r++) {
            const int64_t o = r * H + h0, s = act.start[r];
            const int32_t na = (int32_t)(act.start[r + 1] - s);
            if (r + 2 < R) prefetch_two(n, v0 + o + 2 * H, i0 + o + 2 * H);
            float x[HBLOCK], counts[HBLOCK], g_counts[HBLOCK], gx[HBLOCK];
            input_block(n, n, na, act.cols + s, act.vals + s, act.unit[r], w_block, bias + h0, x);
            for (int64_t h = 0; h < n; h++) g_counts[h] = 0.0f;
            for (int64_t a = 0; a < A; a++) axpy_block(n, g_logits[r * A + a], wout_t + a * H + h0, g_counts);
            surrogate_block(n, T, x, v0 + o, i0 + o, g_counts, p, gx, counts, vps);
            readout_block(n, A, counts, g_logits + r * A, ro);
            for (int64_t h = 0; h < n; h++) bias_grad[h] += gx[h];
            scatter_block(n, na, act.cols + s, act.vals + s, 1.0f, 0, gx, g_block);
        }
        block_copy(N, H, h0, n, gW, g_block, 1);
        for (int64_t h = 0; h < n; h++) gb[h0 + h] = bias_grad[h];
        readout_store(n, A, h0, ro, gWout);
    }
    free(wout_t);
    free_rows(&act);
    return 0;
}

/* The post factors and counts of row r's block [h0, h0 + n) from its spike bits (see
 * gsnn_rstdp_directions_from_spikes), into hp and cnt: factor * feedback with the feedback summed
 * over actions as finish_world sums it, so each value is the one the decision would have stored. */
typedef struct {
    const int16_t *spikes; /* (R, H) */
    const float *table;    /* (2^T): the STDP factor of each spike pattern */
    const float *ones;     /* (2^T): the spikes of each pattern (its popcount) */
    const float *wout_t;   /* (A, H) */
    uint16_t mask;         /* 2^T - 1: a pattern is looked up as its low T bits (never beyond the table) */
} spike_record;

static inline void rebuild_row(const spike_record *s, int64_t H, int64_t A, int64_t r, int64_t h0, int64_t n,
                               const float *restrict post, float *restrict hp, float *restrict cnt) {
    float feedback[HBLOCK];
    if (n == HBLOCK) { /* the block's sums in registers across the actions (through memory, each
                        * action's pass waited on the previous one's stores) */
        vf8 acc[HBLOCK / LANES];
        for (int j = 0; j < HBLOCK / LANES; j++) acc[j] = splat8(0.0f);
        for (int64_t a = 0; a < A; a++) {
            const vf8 o = splat8(post[a]);
            const float *wt = s->wout_t + a * H + h0;
            for (int j = 0; j < HBLOCK / LANES; j++) acc[j] = acc[j] + o * load8(wt + j * LANES);
        }
        for (int j = 0; j < HBLOCK / LANES; j++) store8(feedback + j * LANES, acc[j]);
    } else {
        for (int64_t h = 0; h < n; h++) feedback[h] = 0.0f;
        for (int64_t a = 0; a < A; a++) {
            const float o = post[a], *wt = s->wout_t + a * H + h0;
            for (int64_t h = 0; h < n; h++) feedback[h] += o * wt[h];
        }
    }
    const int16_t *bits = s->spikes + r * H + h0;
    int64_t h = 0;
#if defined(__AVX2__)
    for (; h + 8 <= n; h += 8) { /* eight table lookups at once */
        const __m256i index = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(bits + h))),
                                               _mm256_set1_epi32((int)s->mask));
        _mm256_storeu_ps(hp + h, _mm256_mul_ps(_mm256_i32gather_ps(s->table, index, 4), _mm256_loadu_ps(feedback + h)));
        _mm256_storeu_ps(cnt + h, _mm256_i32gather_ps(s->ones, index, 4));
    }
#endif
    for (; h < n; h++) {
        const uint16_t pattern = (uint16_t)bits[h] & s->mask;
        hp[h] = s->table[pattern] * feedback[h];
        cnt[h] = s->ones[pattern];
    }
}

/* R-STDP's update directions for R decisions (rows), each decision's eligibility weighted by
 * its advantage w_r and the sum scaled by `scale` (gsnn.plasticity: scale = -1 / R):
 *   dW (N, H) = scale sum_r w_r obs_r^T hidden_post_r,   db (H) = scale sum_r w_r hidden_post_r,
 *   dWout (H, A) = scale sum_r counts_r^T (w_r action_post_r),  dbout (A) = scale sum_r w_r action_post_r.
 * obs (R, N); hidden_post, counts (R, H); action_post (R, A); w (R). Every output is written.
 *
 * dW is summed input by input: the active entries are regrouped by input k (chunks of STDP_ROWS
 * rows, each input's rows in increasing order, coefficient w_r * obs_r[k]), and each row of a
 * block of dW is summed in registers and stored once, scaled, at the last chunk where its input
 * is active (partial sums of earlier chunks wait in `keep`); an input never active gets a row of
 * zeros. Each element is the same sum in the same order as row by row (0 + (sum_r c_r g_r) * scale),
 * without a read-modify-write of every active input's row for every row, and without dense
 * passes over dW to clear, scale and add it. With `spikes`, hidden_post and counts are NULL and
 * each row's are rebuilt from its spike bits (rebuild_row). Returns 0, or -1 if out of memory. */
#define STDP_ROWS 256 /* a chunk of hidden_post's block: 64 KB, in L2 while its inputs are summed */
static int rstdp_directions(int64_t R, int64_t N, int64_t H, int64_t A, const active_rows *in,
                            const float *hidden_post, const float *counts, const spike_record *spikes,
                            const float *action_post, const float *w, float scale, float *dW, float *db,
                            float *dWout, float *dbout) {
    const active_rows act = *in;
    const int64_t chunks = (R + STDP_ROWS - 1) / STDP_ROWS, total = act.start[R];
    int64_t *start = calloc((size_t)(chunks * N + 1), sizeof(int64_t)), *cursor = malloc(sizeof(int64_t) * (size_t)N);
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)(total + 1)), *first = malloc(sizeof(int32_t) * (size_t)(2 * N));
    float *coefs = malloc(sizeof(float) * (size_t)(total + 1));
    int8_t *unit = malloc((size_t)(total + 1));
    float *keep = malloc(sizeof(float) * (size_t)(N * HBLOCK + A * HBLOCK + A + 2 * STDP_ROWS * HBLOCK));
    if (!start || !cursor || !rows || !first || !coefs || !unit || !keep) {
        free(start), free(cursor), free(rows), free(first), free(coefs), free(unit), free(keep);
        return -1;
    }
    int32_t *last = first + N;
    float *ro = keep + N * HBLOCK, *coef = ro + A * HBLOCK, *panel = coef + A, *scaled = panel + STDP_ROWS * HBLOCK;
    /* regroup: start[c * N + k] = first entry of input k in chunk c */
    for (int64_t r = 0; r < R; r++)
        for (int64_t e = act.start[r]; e < act.start[r + 1]; e++) start[(r / STDP_ROWS) * N + act.cols[e] + 1]++;
    for (int64_t j = 0; j < chunks * N; j++) start[j + 1] += start[j];
    for (int64_t k = 0; k < N; k++) first[k] = last[k] = -1;
    for (int64_t c = 0; c < chunks; c++) {
        for (int64_t k = 0; k < N; k++) {
            cursor[k] = start[c * N + k];
            if (start[c * N + k + 1] > cursor[k]) {
                if (first[k] < 0) first[k] = (int32_t)c;
                last[k] = (int32_t)c;
            }
        }
        const int64_t r1 = (c + 1) * STDP_ROWS < R ? (c + 1) * STDP_ROWS : R;
        for (int64_t r = c * STDP_ROWS; r < r1; r++)
            for (int64_t e = act.start[r]; e < act.start[r + 1]; e++) {
                const int64_t at = cursor[act.cols[e]]++;
                rows[at] = (int32_t)r;
                coefs[at] = w[r] * act.vals[e];
                unit[at] = act.vals[e] == 1.0f; /* its product w_r * g is the scaled panel's row */
            }
    }
    for (int64_t k = 0; k < N; k++)
        if (first[k] < 0) memset(dW + k * H, 0, sizeof(float) * (size_t)H);
    for (int64_t a = 0; a < A; a++) dbout[a] = 0.0f;
    for (int64_t r = 0; r < R; r++)
        for (int64_t a = 0; a < A; a++) dbout[a] += w[r] * action_post[r * A + a];
    for (int64_t a = 0; a < A; a++) dbout[a] *= scale;
    const vf8 zero = splat8(0.0f), scale8 = splat8(scale);
    for (int64_t h0 = 0; h0 < H; h0 += HBLOCK) {
        const int64_t n = H - h0 < HBLOCK ? H - h0 : HBLOCK;
        float bias[HBLOCK];
        memset(ro, 0, sizeof(float) * (size_t)(A * HBLOCK));
        for (int64_t h = 0; h < n; h++) bias[h] = 0.0f;
        for (int64_t c = 0; c < chunks; c++) {
            /* The chunk's rows of this block of hidden_post, side by side (rows H floats apart
             * fall into a few cache sets), and each times its w_r: an entry whose value is 1 has
             * the coefficient w_r * 1 == w_r and adds that row (the same product) instead of
             * multiplying again. The bias and readout directions take their rows here too (one
             * read of hidden_post and counts; each the same sum in the same order as row by row). */
            const int64_t r0 = c * STDP_ROWS, r1 = r0 + STDP_ROWS < R ? r0 + STDP_ROWS : R;
            for (int64_t r = r0; r < r1; r++) {
                const int64_t o = r * H + h0;
                float hp_row[HBLOCK], cnt_row[HBLOCK];
                const float *src, *cnt;
                if (spikes) {
                    rebuild_row(spikes, H, A, r, h0, n, action_post + r * A, hp_row, cnt_row);
                    src = hp_row;
                    cnt = cnt_row;
                } else {
                    if (r + 2 < R) prefetch_two(n, hidden_post + o + 2 * H, counts + o + 2 * H);
                    src = hidden_post + o;
                    cnt = counts + o;
                }
                const float wr = w[r];
                float *raw = panel + (r - r0) * HBLOCK, *dst = scaled + (r - r0) * HBLOCK;
                if (n == HBLOCK)
                    for (int64_t h = 0; h < HBLOCK; h++) {
                        raw[h] = src[h];
                        dst[h] = wr * src[h];
                        bias[h] += dst[h];
                    }
                else
                    for (int64_t h = 0; h < n; h++) {
                        raw[h] = src[h];
                        dst[h] = wr * src[h];
                        bias[h] += dst[h];
                    }
                for (int64_t a = 0; a < A; a++) coef[a] = wr * action_post[r * A + a];
                readout_block(n, A, cnt, coef, ro);
            }
            for (int64_t k = 0; k < N; k++) {
                const int64_t e0 = start[c * N + k], e1 = start[c * N + k + 1];
                if (e0 == e1) continue;
                float *partial = keep + k * HBLOCK, *dst = dW + k * H + h0;
                const int begin = c == first[k], end = c == last[k];
                if (n == HBLOCK) {
                    vf8 acc[HBLOCK / LANES];
                    for (int j = 0; j < HBLOCK / LANES; j++) acc[j] = begin ? zero : load8(partial + j * LANES);
                    for (int64_t e = e0; e < e1; e++) {
                        if (unit[e]) {
                            const float *gw = scaled + (rows[e] - r0) * HBLOCK;
                            for (int j = 0; j < HBLOCK / LANES; j++) acc[j] = acc[j] + load8(gw + j * LANES);
                            continue;
                        }
                        const vf8 o = splat8(coefs[e]);
                        const float *g = panel + (rows[e] - r0) * HBLOCK;
                        for (int j = 0; j < HBLOCK / LANES; j++) acc[j] = acc[j] + o * load8(g + j * LANES);
                    }
                    for (int j = 0; j < HBLOCK / LANES; j++) {
                        if (end)
                            store8(dst + j * LANES, zero + acc[j] * scale8);
                        else
                            store8(partial + j * LANES, acc[j]);
                    }
                } else {
                    for (int64_t h = 0; h < n; h++) {
                        float sum = begin ? 0.0f : partial[h];
                        for (int64_t e = e0; e < e1; e++) sum += coefs[e] * panel[(rows[e] - r0) * HBLOCK + h];
                        if (end)
                            dst[h] = 0.0f + sum * scale;
                        else
                            partial[h] = sum;
                    }
                }
            }
        }
        for (int64_t h = 0; h < n; h++) db[h0 + h] = bias[h] * scale;
        for (int64_t k = 0; k < A * HBLOCK; k++) ro[k] *= scale;
        readout_store(n, A, h0, ro, dWout);
    }
    free(start), free(cursor), free(rows), free(first), free(coefs), free(unit), free(keep);
    return 0;
}

/* rstdp_directions over the active inputs of R observations (R, N), listed first. */
static int rstdp_directions_obs(int64_t R, int64_t N, int64_t H, int64_t A, const float *obs,
                                const float *hidden_post, const float *counts, const spike_record *spikes,
                                const float *action_post, const float *w, float scale, float *dW, float *db,
                                float *dWout, float *dbout) {
    active_rows act;
    if (scan_all_rows(R, N, obs, &act) != 0) return -1;
    const int status = rstdp_directions(R, N, H, A, &act, hidden_post, counts, spikes, action_post, w, scale, dW, db,
                                        dWout, dbout);
    free_rows(&act);
    return status;
}

int gsnn_rstdp_directions(int64_t R, int64_t N, int64_t H, int64_t A, const float *obs, const float *hidden_post,
                          const float *counts, const float *action_post, const float *w, float scale, float *dW,
                          float *db, float *dWout, float *dbout) {
    return rstdp_directions_obs(R, N, H, A, obs, hidden_post, counts, NULL, action_post, w, scale, dW, db, dWout,
                                dbout);
}

/* The active inputs of a rollout's decisions from their record (decide_args.inputs_out,
 * input_values_out, input_counts_out): R rows in slots of B, slot l's lists at inputs + l * B * N,
 * gathered compactly into a. Returns 0, -1 if out of memory, -2 if the record is not one (a count
 * beyond 0..N, an index beyond 0..N - 1), with nothing allocated. */
static int record_rows(int64_t R, int64_t B, int64_t N, const int32_t *inputs, const float *values,
                       const int32_t *counts, active_rows *a) {
    if (B < 1 || R % B != 0) return -2;
    int64_t total = 0; /* each count within 0..N: a slot's B lists fit its B * N entries */
    for (int64_t r = 0; r < R; r++) {
        if (counts[r] < 0 || counts[r] > N) return -2;
        total += counts[r];
    }
    a->start = malloc(sizeof(int64_t) * (size_t)(R + 1));
    a->cols = malloc(sizeof(int32_t) * (size_t)(total + 1));
    a->vals = malloc(sizeof(float) * (size_t)(total + 1));
    a->unit = NULL;
    if (!a->start || !a->cols || !a->vals) {
        free_rows(a);
        return -1;
    }
    int64_t at = 0;
    for (int64_t l = 0; l < R / B; l++) {
        const int64_t first = at;
        for (int64_t r = l * B; r < (l + 1) * B; r++) {
            a->start[r] = at;
            at += counts[r];
        }
        memcpy(a->cols + first, inputs + l * B * N, sizeof(int32_t) * (size_t)(at - first));
        memcpy(a->vals + first, values + l * B * N, sizeof(float) * (size_t)(at - first));
    }
    a->start[R] = at;
    for (int64_t e = 0; e < total; e++)
        if (a->cols[e] < 0 || a->cols[e] >= N) {
            free_rows(a);
            return -2;
        }
    return 0;
}

/* gsnn_rstdp_directions from the decisions' spike bits (decide_args.spikes_out, T <= 15 steps)
 * instead of their post factors and counts: 1 KB a decision at H = 512 instead of 4 KB written
 * by the decision and read back here. Each row's counts are the popcount of its bits, its STDP
 * factor the sum of stdp_w over its set bits in step order (a table of the 2^T sums, built by
 * adding each pattern's highest step to the sum of the steps below it: the same additions as the
 * decision's), and its feedback W_out @ action_post with the readout weights of the rollout (they
 * change only at updates). The directions are bit for bit those of gsnn_rstdp_directions over
 * the post factors and counts the decisions would have stored. The active inputs come from the
 * observations obs (R, N), or where obs is NULL from the decisions' record of them (record_rows:
 * slots of B rows; about 90 bytes a decision instead of the observation's 1.8 KB, and no scan). */
int gsnn_rstdp_directions_from_spikes(int64_t R, int64_t N, int64_t H, int64_t A, int64_t T, const float *obs,
                                      int64_t B, const int32_t *inputs, const float *input_values,
                                      const int32_t *input_counts, const int16_t *spikes, const float *wout,
                                      const float *stdp_w, const float *action_post, const float *w, float scale,
                                      float *dW, float *db, float *dWout, float *dbout) {
    if (T < 1 || T > 15) return -2;
    const int64_t patterns = (int64_t)1 << T;
    float *table = malloc(sizeof(float) * (size_t)(2 * patterns)), *wout_t = malloc(sizeof(float) * (size_t)(A * H + 1));
    active_rows act;
    const int listed = table && wout_t
                           ? (obs ? scan_all_rows(R, N, obs, &act)
                                  : record_rows(R, B, N, inputs, input_values, input_counts, &act))
                           : -1;
    if (listed != 0) {
        free(table), free(wout_t);
        return listed;
    }
    float *ones = table + patterns;
    table[0] = ones[0] = 0.0f;
    for (int64_t p = 1; p < patterns; p++) {
        const int top = 63 - __builtin_clzll((unsigned long long)p);
        table[p] = table[p & ~((int64_t)1 << top)] + stdp_w[top];
        ones[p] = (float)__builtin_popcountll((unsigned long long)p);
    }
    transpose(H, A, wout, wout_t);
    const spike_record record = {spikes, table, ones, wout_t, (uint16_t)(patterns - 1)};
    const int status = rstdp_directions(R, N, H, A, &act, NULL, NULL, &record, action_post, w, scale, dW, db, dWout,
                                        dbout);
    free(table), free(wout_t);
    free_rows(&act);
    return status;
}

/* Discounted returns, then advantages, of a rollout of L steps of B worlds (gsnn.plasticity):
 * G_t = r_t + discount * G_{t+1} * (1 - done_t) with G_L = 0; centred on the mean over worlds
 * of each step (over the whole rollout when B == 1); divided by (their standard deviation over
 * the rollout + 1e-6). Computed in double; rewards (L, B), dones (L, B) bytes, adv (L, B) out.
 * Returns 0, or -1 if out of memory. */
int gsnn_advantages(int64_t L, int64_t B, const float *rewards, const uint8_t *dones, double discount,
                    float *adv) {
    const int64_t n = L * B;
    double *running = malloc(sizeof(double) * (size_t)B);
    if (!running) return -1;
    for (int64_t b = 0; b < B; b++) running[b] = 0.0;
    for (int64_t t = L - 1; t >= 0; t--)
        for (int64_t b = 0; b < B; b++) {
            running[b] = rewards[t * B + b] + discount * running[b] * (dones[t * B + b] ? 0.0 : 1.0);
            adv[t * B + b] = (float)running[b];
        }
    free(running);
    double total = 0.0;
    for (int64_t k = 0; k < n; k++) total += adv[k];
    for (int64_t t = 0; t < L; t++) {
        double mean = 0.0;
        if (B == 1)
            mean = total / (double)n;
        else {
            for (int64_t b = 0; b < B; b++) mean += adv[t * B + b];
            mean /= (double)B;
        }
        for (int64_t b = 0; b < B; b++) adv[t * B + b] = (float)(adv[t * B + b] - mean);
    }
    double sum = 0.0, squares = 0.0;
    for (int64_t k = 0; k < n; k++) sum += adv[k];
    for (int64_t k = 0; k < n; k++) {
        const double centred = adv[k] - sum / (double)n;
        squares += centred * centred;
    }
    const double scale = sqrt(squares / (double)n) + 1e-6;
    for (int64_t k = 0; k < n; k++) adv[k] = (float)(adv[k] / scale);
    return 0;
}

/* Sum of squares of n floats, in double (for the global gradient norm): sixteen partial sums in
 * four vectors of four doubles (one chain of additions waited on the adder's latency). */
typedef double vd4 __attribute__((vector_size(32)));
double gsnn_sum_squares(int64_t n, const float *x) {
    vd4 part[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 4; j++) {
            const vd4 d = {x[k + 4 * j], x[k + 4 * j + 1], x[k + 4 * j + 2], x[k + 4 * j + 3]};
            part[j] += d * d;
        }
    const vd4 all = (part[0] + part[1]) + (part[2] + part[3]);
    double total = (all[0] + all[1]) + (all[2] + all[3]);
    for (; k < n; k++) total += (double)x[k] * x[k];
    return total;
}

/* One Adam step on n elements, torch.optim.Adam's arithmetic (default options) in one pass, with
 * the gradient scaled first (the global-norm clip): g = grad * scale; m += (1 - beta1) (g - m);
 * v = v beta2 + (1 - beta2) g g; param += -step_size m / (sqrt(v) * (1 / bias2_sqrt) + eps) (torch
 * divides sqrt(v) by bias2_sqrt: the product with the reciprocal can differ in the last bit, and
 * saves a division per element, whose throughput bounds this loop). A moment whose magnitude falls
 * below FLT_MIN is stored as zero: a subnormal moment sticks and makes every later step slow
 * (gsnn/adam.py says why, and why the weights do not change). Returns the sum of the updated
 * parameters (not finite if any parameter is not), summed in the same pass. */
double gsnn_adam(int64_t n, float *param, const float *grad, float *m, float *v, float scale, float beta1,
                 float beta2, float step_size, float bias2_sqrt, float eps) {
    const float w1 = 1.0f - beta1, w2 = 1.0f - beta2, neg_step = -step_size, inv_bias2 = 1.0f / bias2_sqrt;
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; j++) {
            const float g = grad[k + j] * scale;
            float mk = m[k + j] + w1 * (g - m[k + j]), vk = v[k + j] * beta2 + w2 * g * g;
            mk = fabsf(mk) < FLT_MIN ? 0.0f : mk;
            vk = vk < FLT_MIN ? 0.0f : vk;
            m[k + j] = mk;
            v[k + j] = vk;
            param[k + j] = param[k + j] + neg_step * mk / (sqrtf(vk) * inv_bias2 + eps);
            part[j] += param[k + j];
        }
    double total = sum8(part);
    for (; k < n; k++) {
        const float g = grad[k] * scale;
        const float mk = m[k] + w1 * (g - m[k]), vk = v[k] * beta2 + w2 * g * g;
        m[k] = fabsf(mk) < FLT_MIN ? 0.0f : mk;
        v[k] = vk < FLT_MIN ? 0.0f : vk;
        param[k] = param[k] + neg_step * m[k] / (sqrtf(v[k]) * inv_bias2 + eps);
        total += param[k];
    }
    return total;
}

/* One R-STDP update from a rollout's record (decide_args' spike bits and active inputs), in one
 * call: the advantages, the directions, the global gradient norm and, if the norm is finite, the
 * Adam step of the four parameters with the gradient clipped to grad_clip. The same functions in
 * the same order as gsnn.organism's step by step update (gsnn_advantages, then
 * gsnn_rstdp_directions_from_spikes with scale -1/R, the sum of the four gsnn_sum_squares from
 * 0, scale = min(1, grad_clip / (sqrt(sum) + 1e-6)), gsnn_adam of each parameter): bit for bit
 * the same update, with one call from Python instead of a dozen (at 16 worlds their Python cost
 * about as long as the Adam step). Parameters, directions and moments are in the order
 * input_weight (N, H), hidden_bias (H), readout_weight (H, A), readout_bias (A); the directions'
 * readout weights are param[2] before the step, the rollout's own. Returns 0 (stepped), 1 (the
 * norm is not finite: nothing stepped, the directions and sum_squares written), or a
 * gsnn_rstdp_directions_from_spikes / gsnn_advantages error. */
typedef struct {
    int64_t L, B, N, H, A, T;
    const float *rewards;     /* (L, B) */
    const uint8_t *dones;     /* (L, B) */
    double discount;
    const int32_t *inputs;    /* the decisions' record of their active inputs (ActiveInputs), L slots */
    const float *input_values;
    const int32_t *input_counts;
    const int16_t *spikes;    /* (L B, H) */
    const float *action_post; /* (L B, A) */
    const float *stdp_w;      /* (T) */
    float *adv;               /* (L B) out */
    float *param[4], *grad[4], *m[4], *v[4];
    double grad_clip;
    float beta1, beta2, step_size, bias2_sqrt, eps;
    double sum_squares;       /* out: of the directions */
    double param_sum[4];      /* out: of each stepped parameter (not finite if one of its values is not) */
} rstdp_update_args;

int gsnn_rstdp_update(rstdp_update_args *u) {
    const int64_t R = u->L * u->B, N = u->N, H = u->H, A = u->A;
    const int64_t n[4] = {N * H, H, H * A, A};
    int status = gsnn_advantages(u->L, u->B, u->rewards, u->dones, u->discount, u->adv);
    if (status != 0) return status;
    status = gsnn_rstdp_directions_from_spikes(R, N, H, A, u->T, NULL, u->B, u->inputs, u->input_values,
                                               u->input_counts, u->spikes, u->param[2], u->stdp_w, u->action_post,
                                               u->adv, (float)(-1.0 / (double)R), u->grad[0], u->grad[1],
                                               u->grad[2], u->grad[3]);
    if (status != 0) return status;
    double total = 0.0;
    for (int k = 0; k < 4; k++) total += gsnn_sum_squares(n[k], u->grad[k]);
    u->sum_squares = total;
    const double norm = sqrt(total);
    if (!isfinite(norm)) return 1;
    const double clip = u->grad_clip / (norm + 1e-6);
    const float scale = (float)(clip < 1.0 ? clip : 1.0);
    for (int k = 0; k < 4; k++)
        u->param_sum[k] = gsnn_adam(n[k], u->param[k], u->grad[k], u->m[k], u->v[k], scale, u->beta1, u->beta2,
                                    u->step_size, u->bias2_sqrt, u->eps);
    return 0;
}
