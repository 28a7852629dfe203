"""The foraging worlds: a gymnasium env for interoperability and a batched torch twin for speed."""

import importlib

from gymnasium.envs.registration import register, registry

# The worlds are imported on first use (module __getattr__): the batched world imports torch,
# about a second that a command's config check (envs.rules) should not pay before its error line.
_LAZY = {"BatchedForagingGrid": "envs.batched", "StepResult": "envs.batched",
         "ForagingGrid": "envs.foraging", "SeasonalForagingGrid": "envs.foraging"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'envs' has no attribute {name!r}")


FORAGING_ID = "gsnn/ForagingGrid-v0"
SEASONAL_FORAGING_ID = "gsnn/SeasonalForagingGrid-v0"

for _id, _entry in (
    (FORAGING_ID, "envs.foraging:ForagingGrid"),
    (SEASONAL_FORAGING_ID, "envs.foraging:SeasonalForagingGrid"),
):
    if _id not in registry:
        register(id=_id, entry_point=_entry, max_episode_steps=None)

__all__ = [
    "BatchedForagingGrid",
    "ForagingGrid",
    "SeasonalForagingGrid",
    "StepResult",
    "FORAGING_ID",
    "SEASONAL_FORAGING_ID",
]
