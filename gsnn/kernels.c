/* The organism's hot loops for the CPU: float32, row-major, contiguous, one thread.
 *
 * gsnn/native.py compiles this file on first use (cc -O3 -march=native -ffp-contract=off) and
 * calls it through ctypes; gsnn/kernels.py holds a torch twin of every function (used on GPUs
 * and where no C compiler is found), and tests/test_kernels.py checks that the two agree and
 * that the LIF steps are bit-identical to Norse's lif_feed_forward_step.
 *
 * Why C: one LIF step is ~9 elementwise passes over the (B, H) state, so torch's eager ops
 * stream the state through memory ~90 times per decision; here each world's row stays in the
 * L1 cache for all T steps, and the input current, the readout and the argmax of a decision
 * are one call instead of dozens of small ops.
 *
 * LIF parameters `p` (5 floats): p[0] = dt * tau_mem_inv, p[1] = -dt * tau_syn_inv, p[2] = v_leak,
 * p[3] = v_th, p[4] = v_reset, each the float32 value Norse's step multiplies or compares with.
 * One step, as Norse computes it (no fused multiply-add: -ffp-contract=off keeps the rounding):
 *     i_new = i + x;  v' = v + p0 * ((v_leak - v) + i_new);  i = i_new + p1 * i_new
 *     z = (v' - v_th > 0);  v = z ? v_reset : v'
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 64 /* neurons per block in the surrogate backward */

/* T steps of one world's row of H neurons with constant input x, in place on v and i.
 * counts (H) receive spikes per neuron; with pot/dep (H) non-NULL, the STDP factors
 * pot = sum_t pre_w[t] z_t and dep = sum_t post_w[t] z_t (see gsnn.neurons.STDPFactors). */
static inline void lif_row(int64_t H, int64_t T, const float *restrict x, const float *restrict p,
                           float *restrict v, float *restrict i, float *restrict counts,
                           const float *restrict pre_w, const float *restrict post_w,
                           float *restrict pot, float *restrict dep, const int stdp) {
    const float dm = p[0], nds = p[1], vl = p[2], th = p[3], vr = p[4];
    for (int64_t h = 0; h < H; h++) counts[h] = 0.0f;
    if (stdp)
        for (int64_t h = 0; h < H; h++) pot[h] = dep[h] = 0.0f;
    for (int64_t t = 0; t < T; t++) {
        const float wp = stdp ? pre_w[t] : 0.0f, wd = stdp ? post_w[t] : 0.0f;
        for (int64_t h = 0; h < H; h++) {
            const float inew = i[h] + x[h];
            const float vp = v[h] + dm * ((vl - v[h]) + inew);
            i[h] = inew + nds * inew;
            const int z = (vp - th) > 0.0f;
            v[h] = z ? vr : vp;
            counts[h] += z ? 1.0f : 0.0f;
            if (stdp) {
                pot[h] += z ? wp : 0.0f;
                dep[h] += z ? wd : 0.0f;
            }
        }
    }
}

/* T LIF steps for B rows: x, v, i, counts (B, H). */
void gsnn_lif(int64_t B, int64_t H, int64_t T, const float *x, const float *p, float *v, float *i,
              float *counts, const float *pre_w, const float *post_w, float *pot, float *dep) {
    for (int64_t b = 0; b < B; b++) {
        const int64_t o = b * H;
        if (pot)
            lif_row(H, T, x + o, p, v + o, i + o, counts + o, pre_w, post_w, pot + o, dep + o, 1);
        else
            lif_row(H, T, x + o, p, v + o, i + o, counts + o, 0, 0, 0, 0, 0);
    }
}

static inline double sum8(const float *restrict part) {
    return ((double)part[0] + part[1] + part[2] + part[3]) + ((double)part[4] + part[5] + part[6] + part[7]);
}

/* Sum of H floats in 8 independent partial sums (so it vectorises). */
static inline double row_sum(int64_t H, const float *restrict a) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t h = 0;
    for (; h + 8 <= H; h += 8)
        for (int k = 0; k < 8; k++) part[k] += a[h + k];
    double total = sum8(part);
    for (; h < H; h++) total += a[h];
    return total;
}

/* x += o * w over H floats. Kept out of line: inlined into the loop over active inputs, gcc
 * vectorises across inputs with gathers instead, about 30x slower. */
static __attribute__((noinline)) void axpy(int64_t H, float o, const float *restrict w, float *restrict x) {
    for (int64_t h = 0; h < H; h++) x[h] += o * w[h];
}

/* The non-zero inputs of one world: their indices in increasing order into `active`, their
 * count returned; `*total` += the row's sum (NaN or Inf anywhere in the row shows in it). */
static inline int32_t scan_row(int64_t N, const float *restrict obs, int32_t *restrict active, double *total) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t n = 0;
    int32_t na = 0;
    for (; n + 8 <= N; n += 8) {
        int any = 0;
        for (int k = 0; k < 8; k++) {
            part[k] += obs[n + k];
            any |= obs[n + k] != 0.0f;
        }
        if (any)
            for (int k = 0; k < 8; k++) {
                active[na] = (int32_t)(n + k);
                na += obs[n + k] != 0.0f;
            }
    }
    *total += sum8(part);
    for (; n < N; n++) {
        *total += obs[n];
        active[na] = (int32_t)n;
        na += obs[n] != 0.0f;
    }
    return na;
}

/* Input current of one world from its active inputs: x = (sum over them, in increasing n, of
 * obs[n] * W[n, :]) + bias, as embedding_bag over the non-zero cells followed by + bias. */
static inline void input_row(int64_t H, int32_t na, const int32_t *restrict active, const float *restrict obs,
                             const float *restrict W, const float *restrict bias, float *restrict x) {
    for (int64_t h = 0; h < H; h++) x[h] = 0.0f;
    for (int32_t k = 0; k < na; k++) axpy(H, obs[active[k]], W + (int64_t)active[k] * H, x);
    for (int64_t h = 0; h < H; h++) x[h] += bias[h];
}

/* x (B, H) = input current of B worlds from obs (B, N); returns the sum of obs. */
double gsnn_input_current(int64_t B, int64_t N, int64_t H, const float *obs, const float *W,
                          const float *bias, float *x, int32_t *active) {
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        const int32_t na = scan_row(N, obs + b * N, active, &total);
        input_row(H, na, active, obs + b * N, W, bias, x + b * H);
    }
    return total;
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

/* One decision of B worlds: input current, T LIF steps, and (when logits is non-NULL) the
 * readout logits (B, A) = counts @ wout + bout with wout (H, A), and (when actions is non-NULL)
 * their argmax (the first maximum). Optional outputs (NULL to skip): x_out, v0_out, i0_out
 * (B, H): the input current and the state before the decision (what a learner keeps);
 * pot, dep (B, H): STDP factors with step weights pre_w, post_w (T).
 * sums[0] = sum of obs, sums[1] = spikes, sums[2] = sum of logits (non-finite if any logit is).
 * Every observation is read before anything is written: if their sum is not finite, returns 1
 * with v and i untouched. Scratch: H + A * H floats, active (B * N ints), n_active (B ints). */
int gsnn_decide(int64_t B, int64_t N, int64_t H, int64_t T, const float *obs, const float *W,
                const float *bias, const float *p, float *v, float *i, float *counts, float *x_out,
                float *v0_out, float *i0_out, const float *pre_w, const float *post_w, float *pot,
                float *dep, int64_t A, const float *wout, const float *bout, float *logits,
                int64_t *actions, double *sums, float *scratch, int32_t *active, int32_t *n_active) {
    double obs_total = 0.0, spikes = 0.0, logit_total = 0.0;
    for (int64_t b = 0; b < B; b++) n_active[b] = scan_row(N, obs + b * N, active + b * N, &obs_total);
    sums[0] = obs_total;
    if (!isfinite(obs_total)) return 1;
    float *wout_t = scratch + H; /* (A, H): each action's weights contiguous, for dot() */
    if (logits)
        for (int64_t h = 0; h < H; h++)
            for (int64_t a = 0; a < A; a++) wout_t[a * H + h] = wout[h * A + a];
    for (int64_t b = 0; b < B; b++) {
        const int64_t o = b * H;
        float *x = x_out ? x_out + o : scratch;
        input_row(H, n_active[b], active + b * N, obs + b * N, W, bias, x);
        if (v0_out) memcpy(v0_out + o, v + o, (size_t)H * sizeof(float));
        if (i0_out) memcpy(i0_out + o, i + o, (size_t)H * sizeof(float));
        if (pot)
            lif_row(H, T, x, p, v + o, i + o, counts + o, pre_w, post_w, pot + o, dep + o, 1);
        else
            lif_row(H, T, x, p, v + o, i + o, counts + o, 0, 0, 0, 0, 0);
        spikes += row_sum(H, counts + o);
        if (logits) {
            float *l = logits + b * A;
            int64_t best = 0;
            for (int64_t a = 0; a < A; a++) {
                l[a] = dot(H, counts + o, wout_t + a * H) + bout[a];
                logit_total += l[a];
                if (l[a] > l[best]) best = a;
            }
            if (actions) actions[b] = best;
        }
    }
    sums[1] = spikes;
    sums[2] = logit_total;
    return 0;
}

/* The gradient of the spike counts of T steps with respect to a constant input x, through
 * Norse's SuperSpike surrogate (dz/dv' = 1 / (|v' - v_th| + 1)^2, also through the reset),
 * for R rows: given x, the state before (v0, i0) and g = dL/dcounts (R, H), writes gx (R, H).
 * The forward is recomputed from (x, v0, i0), so nothing per step is stored between the
 * decision and the update. See gsnn.neurons._SurrogateDecision for the recursion.
 * scratch: T * CHUNK floats (v' of each step of one block). */
void gsnn_surrogate_backward(int64_t R, int64_t H, int64_t T, const float *x, const float *v0,
                             const float *i0, const float *g, const float *p, float *gx,
                             float *scratch) {
    const float a = p[0], nds = p[1], vl = p[2], th = p[3], vr = p[4];
    const float one_minus_a = 1.0f - a, one_minus_b = 1.0f + nds;
    for (int64_t r = 0; r < R; r++) {
        for (int64_t h0 = 0; h0 < H; h0 += CHUNK) {
            const int64_t n = H - h0 < CHUNK ? H - h0 : CHUNK, o = r * H + h0;
            float v[CHUNK], i[CHUNK], gv[CHUNK], gi[CHUNK], acc[CHUNK];
            for (int64_t k = 0; k < n; k++) {
                v[k] = v0[o + k];
                i[k] = i0[o + k];
                gv[k] = gi[k] = acc[k] = 0.0f;
            }
            for (int64_t t = 0; t < T; t++)
                for (int64_t k = 0; k < n; k++) {
                    const float inew = i[k] + x[o + k];
                    const float vp = v[k] + a * ((vl - v[k]) + inew);
                    i[k] = inew + nds * inew;
                    scratch[t * CHUNK + k] = vp;
                    v[k] = (vp - th) > 0.0f ? vr : vp;
                }
            for (int64_t t = T - 1; t >= 0; t--)
                for (int64_t k = 0; k < n; k++) {
                    const float vp = scratch[t * CHUNK + k];
                    const float d = fabsf(vp - th) + 1.0f;
                    const float s = 1.0f / (d * d);
                    const float through = ((vp - th) > 0.0f ? 0.0f : 1.0f) + (vr - vp) * s;
                    const float gvp = gv[k] * through + g[o + k] * s;
                    const float gn = gi[k] * one_minus_b + a * gvp;
                    acc[k] += gn;
                    gv[k] = gvp * one_minus_a;
                    gi[k] = gn;
                }
            for (int64_t k = 0; k < n; k++) gx[o + k] = acc[k];
        }
    }
}

/* out (N, H) += sum over rows r and inputs n with obs[r, n] != 0 of obs[r, n] * G[r, :]:
 * obs^T @ G for a sparse obs (R, N), as the input weights' gradient needs it. */
void gsnn_sparse_outer_add(int64_t R, int64_t N, int64_t H, const float *obs, const float *G, float *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *restrict o = obs + r * N;
        const float *restrict gr = G + r * H;
        for (int64_t n = 0; n < N; n++) {
            const float w = o[n];
            if (w == 0.0f) continue;
            axpy(H, w, gr, out + n * H);
        }
    }
}
