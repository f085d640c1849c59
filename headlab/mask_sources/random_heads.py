"""`random`: KV heads drawn uniformly at random (seeded) at the same budget: the baseline every source must beat.

Several seeds are several masks (`make_mask(lab, "random", full_fraction=0.5, seed=s)`), so a
comparison can show random masks as a band rather than one lucky or unlucky draw.
"""
from __future__ import annotations

from dataclasses import dataclass

from headlab.lab import Lab
from headlab.mask_sources import MaskSource
from headlab.masks import HeadMask, MaskConfig


@dataclass(frozen=True)
class Random(MaskSource):
    """`full_fraction` of the KV heads, drawn with `torch.randperm` seeded by `seed` (`HeadMask.random`).

    Cost: nothing (no model run).
    """

    name = "random"
    ranks_by_value = False
    seed: int = MaskConfig.seed

    def make(self, lab: Lab, config: MaskConfig) -> HeadMask:
        mask = HeadMask.random(lab.info, config.full_fraction, seed=self.seed, sink=config.sink, recent=config.recent)
        mask.source.update(source=self.name, seconds=0.0)
        return mask
