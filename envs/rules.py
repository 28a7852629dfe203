"""The rules of the foraging world, shared by the gymnasium env and the batched torch env.

Both implementations read their constants from here, so a rule changes in one place. Cell
coordinates are ``(row, col)`` with row 0 at the top. Actions move the agent one cell:

    0 up (row - 1), 1 down (row + 1), 2 left (col - 1), 3 right (col + 1)

A move into the boundary leaves the agent where it is (and costs ``wall_penalty``).

Food spawning is a pure function of the spawn weights and one integer draw, so the two
implementations agree exactly when given the same draws: the free cells (no food, no agent) are
walked in row-major order, each with its integer season weight, and the cell chosen is the first
whose running weight sum exceeds ``(draw * total_weight) >> SPAWN_DRAW_BITS`` where
``draw`` is uniform on ``[0, 2**SPAWN_DRAW_BITS)``. Integer arithmetic keeps it bit-exact on
every device.
"""

from __future__ import annotations

import numpy as np

GRID_SIZE = 15
N_CHANNELS = 2
N_ACTIONS = 4
SPAWN_DRAW_BITS = 24

# (d_row, d_col) per action: up, down, left, right.
ACTION_DELTAS = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)
ACTION_NAMES = ("up", "down", "left", "right")

OBSERVATION_MODES = ("egocentric", "allocentric")
WALL_ENCODINGS = ("border", "outside")

# Seasons: food spawns with weight SEASON_HOT_WEIGHT inside the season's region and weight 1
# elsewhere. Season k's region is one quadrant of the grid, going round clockwise from the top left.
N_SEASONS = 4
SEASON_HOT_WEIGHT = 12


def season_weights(season: int | None, size: int = GRID_SIZE) -> np.ndarray:
    """Integer spawn weight per cell, shape (size, size). ``None`` means uniform (weight 1)."""
    weights = np.ones((size, size), dtype=np.int64)
    if season is None:
        return weights
    if not 0 <= season < N_SEASONS:
        raise ValueError(f"season must be in [0, {N_SEASONS - 1}], got {season}")
    half = (size + 1) // 2
    row_slice = slice(0, half) if season in (0, 1) else slice(size - half, size)
    col_slice = slice(0, half) if season in (0, 3) else slice(size - half, size)
    weights[row_slice, col_slice] = SEASON_HOT_WEIGHT
    return weights


def spawn_threshold(draw: int, total_weight: int) -> int:
    """The running-weight threshold a draw selects; see the module docstring."""
    return (int(draw) * int(total_weight)) >> SPAWN_DRAW_BITS


def egocentric_padding(size: int = GRID_SIZE) -> int:
    """Cells of padding on each side so a size x size window centred anywhere stays in bounds."""
    return size // 2
