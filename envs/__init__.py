"""The foraging worlds: a gymnasium env for interoperability and a batched torch twin for speed."""

from gymnasium.envs.registration import register, registry

from envs.batched import BatchedForagingGrid, StepResult
from envs.foraging import ForagingGrid, SeasonalForagingGrid

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
