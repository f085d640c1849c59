"""`all_streaming`: every KV head streams (StreamingLLM: sink + recent tokens only): the floor of every comparison."""
from __future__ import annotations

from dataclasses import dataclass

from headlab.lab import Lab
from headlab.mask_sources import MaskSource
from headlab.masks import HeadMask, MaskConfig


@dataclass(frozen=True)
class AllStreaming(MaskSource):
    """No KV head keeps its full cache, whatever the budget asks (`full_fraction` is ignored and recorded as 0).

    Cost: nothing (no model run).
    """

    name = "all_streaming"

    def check(self, lab: Lab, config: MaskConfig) -> None:
        """Any budget: none is spent."""

    def make(self, lab: Lab, config: MaskConfig) -> HeadMask:
        mask = HeadMask.all_streaming(lab.info, sink=config.sink, recent=config.recent)
        mask.source.update(source=self.name, seconds=0.0)
        return mask
