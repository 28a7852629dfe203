/* BatchedForagingGrid's step and observation for the CPU, B worlds per call, one thread.
 *
 * The rules are envs/rules.py's; BatchedForagingGrid keeps a torch twin of both functions
 * (used on GPUs and where no C compiler is found) and tests/test_envs.py runs its agreement
 * tests (against the gymnasium env, step by step) on both. gsnn/native.py compiles this file
 * on first use. Layouts follow the env's tensors: agent (B, 2) int64 (row, col), food (B, S*S)
 * bool (one byte), steps and episode_food (B) int64, observations (B, 2, S, S) float32.
 */
#include <stdint.h>

#define SPAWN_DRAW_BITS 24 /* envs.rules.SPAWN_DRAW_BITS */

/* The cell a spawn draw selects among the free cells (no food, not the agent), walked in
 * row-major order with their integer weights: the first whose running weight exceeds
 * (draw * total) >> SPAWN_DRAW_BITS, or the last cell if none does (envs.rules). */
static int64_t spawn_cell(int64_t cells, const uint8_t *food, int64_t agent_cell, const int64_t *weights,
                          int64_t draw) {
    int64_t total = 0;
    for (int64_t c = 0; c < cells; c++)
        if (!food[c] && c != agent_cell) total += weights[c];
    const int64_t threshold = (draw * total) >> SPAWN_DRAW_BITS;
    int64_t running = 0;
    for (int64_t c = 0; c < cells; c++) {
        if (!food[c] && c != agent_cell) running += weights[c];
        if (running > threshold) return c;
    }
    return cells - 1;
}

/* One action in each of B worlds: move (a move into the boundary stays and costs wall_penalty),
 * eat (the food on the new cell; a new item spawns by that world's draw), count the step.
 * reward = eaten * food_reward - step_penalty - bumped * wall_penalty (float32, in that order).
 * done = steps >= max_steps; finished_food = the episode's food where done, else 0. Worlds
 * that are done are not reset here (the caller resets them). Every action and draw is checked
 * before anything changes: returns 1 for an action outside [0, 3], 2 for a draw outside
 * [0, 2^SPAWN_DRAW_BITS), else 0, with *n_done = the number of done worlds. */
int gsnn_world_step(int64_t B, int64_t S, int64_t *agent, uint8_t *food, int64_t *steps,
                    int64_t *episode_food, const int64_t *actions, const int64_t *draws,
                    const int64_t *spawn_weights, int64_t max_steps, float food_reward,
                    float step_penalty, float wall_penalty, float *reward, uint8_t *eaten_out,
                    uint8_t *done_out, int64_t *finished_food, int64_t *n_done) {
    static const int64_t delta[4][2] = {{-1, 0}, {1, 0}, {0, -1}, {0, 1}}; /* rules.ACTION_DELTAS */
    for (int64_t b = 0; b < B; b++) {
        if (actions[b] < 0 || actions[b] > 3) return 1;
        if (draws[b] < 0 || draws[b] >= ((int64_t)1 << SPAWN_DRAW_BITS)) return 2;
    }
    const int64_t cells = S * S;
    int64_t finished = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t *pos = agent + 2 * b;
        uint8_t *f = food + b * cells;
        const int64_t row = pos[0] + delta[actions[b]][0], col = pos[1] + delta[actions[b]][1];
        const int bumped = row < 0 || row >= S || col < 0 || col >= S;
        if (!bumped) {
            pos[0] = row;
            pos[1] = col;
        }
        const int64_t here = pos[0] * S + pos[1];
        const uint8_t eaten = f[here] != 0;
        f[here] = 0;
        float r = (float)eaten * food_reward;
        r = r - step_penalty;
        r = r - (float)bumped * wall_penalty;
        reward[b] = r;
        if (eaten) f[spawn_cell(cells, f, here, spawn_weights, draws[b])] = 1;
        eaten_out[b] = eaten;
        episode_food[b] += eaten;
        steps[b] += 1;
        const uint8_t done = steps[b] >= max_steps;
        done_out[b] = done;
        finished_food[b] = done ? episode_food[b] : 0;
        finished += done;
    }
    *n_done = finished;
    return 0;
}

/* Observations of B worlds into obs (B, 2, S, S). Egocentric: the S x S window centred on the
 * agent; channel 0 cut from walls_padded ((S + 2 pad)^2, envs.foraging.wall_map), channel 1 the
 * food in the window (0 outside the grid). Allocentric: channel 0 one-hot on the agent's cell,
 * channel 1 the food map. */
void gsnn_observe(int64_t B, int64_t S, int64_t pad, int64_t egocentric, const int64_t *agent,
                  const uint8_t *food, const float *walls_padded, float *obs) {
    const int64_t cells = S * S, padded = S + 2 * pad;
    for (int64_t b = 0; b < B; b++) {
        const int64_t ar = agent[2 * b], ac = agent[2 * b + 1];
        const uint8_t *f = food + b * cells;
        float *walls = obs + 2 * b * cells, *seen = walls + cells;
        if (!egocentric) {
            for (int64_t c = 0; c < cells; c++) {
                walls[c] = 0.0f;
                seen[c] = f[c] ? 1.0f : 0.0f;
            }
            walls[ar * S + ac] = 1.0f;
            continue;
        }
        for (int64_t r = 0; r < S; r++) {
            const float *wall_row = walls_padded + (ar + r) * padded + ac;
            float *wall_out = walls + r * S, *food_out = seen + r * S;
            for (int64_t c = 0; c < S; c++) wall_out[c] = wall_row[c];
            for (int64_t c = 0; c < S; c++) food_out[c] = 0.0f;
            const int64_t fr = ar + r - pad; /* the grid row this window row shows */
            if (fr < 0 || fr >= S) continue;
            /* window column c shows grid column ac + c - pad: those inside the grid */
            const int64_t c0 = pad - ac > 0 ? pad - ac : 0, c1 = S + pad - ac < S ? S + pad - ac : S;
            const uint8_t *food_row = f + fr * S + ac - pad;
            for (int64_t c = c0; c < c1; c++) food_out[c] = (float)food_row[c];
        }
    }
}
