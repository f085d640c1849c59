"""`duo_file`: a published DuoAttention pattern (`full_attention_heads.tsv` + `config.json`, as the
`attn_patterns/<model>/...` folders of mit-han-lab/duo-attention ship them) used as a mask source.

The file's gate values `[n_layers, n_kv_heads]` are clipped to [0, 1] (DuoAttention's own loader does
the same) and checked against the model's shape: a pattern trained for another model is refused with
what does not match. With a `full_fraction` the pattern is re-budgeted: the top-k values are full,
k = round(full_fraction x all KV heads), i.e. a cut at the values' quantile (what DuoAttention's
`--sparsity` and kvpress' `DuoAttentionPress` do), so it compares with every other source at the same
budget. With `full_fraction=None` (and no threshold) it keeps the file's own cut, values >= 0.5.
The window is the one requested (so all sources compare at one window); the file's own `sink_size` /
`recent_size` are recorded beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.lab import Lab
from headlab.mask_sources import MaskSource, budget_of
from headlab.masks import HeadMask, MaskConfig


@dataclass(frozen=True)
class DuoFile(MaskSource):
    """The DuoAttention folder (or its `.tsv`) at `path`, re-budgeted by its values' quantile.

    Cost: reading one small text file.
    """

    name = "duo_file"
    own_cut = True
    path: str = ""

    def __post_init__(self):
        if not str(self.path).strip():
            raise ValueError("Mask source 'duo_file' needs path=: a DuoAttention folder holding full_attention_heads.tsv "
                             "and config.json (or the .tsv itself).")

    def load(self, lab: Lab) -> HeadMask:
        """The file as DuoAttention reads it, checked against `lab`'s shape (`ValueError` naming what does not match)."""
        return HeadMask.load(self.path, info=lab.info)

    def make(self, lab: Lab, config: MaskConfig) -> HeadMask:
        published = self.load(lab)
        file_window = {"file_sink": published.sink, "file_recent": published.recent}
        values = published.source.get("budget", {}).get("values")
        values = torch.tensor(values) if values is not None else published.full.float()  # a headlab-written folder: 0/1
        full_fraction, threshold = budget_of(config, self.name, self.own_cut)
        if full_fraction is None and threshold is None:
            return HeadMask.for_model(lab.info, published.full, config.sink, config.recent, self.record(
                budget={"threshold": 0.5, "n_full": published.n_full, "own_cut": True}, values=values.tolist(),
                seconds=0.0, **file_window))
        return self.from_values(lab, values, config, seconds=0.0, **file_window)
