"""The attention-area scorer: the mass a head would drop if it kept only sink + recent tokens."""
from __future__ import annotations

import pytest
import torch

import headlab as hl
from headlab.scorers import make_scorer
from headlab.scorers.attention_area import evicted_mass


def test_evicted_mass_counts_only_keys_outside_sink_and_recent():
    # 6 positions, sink 1, recent 2: query 3 evicts key 1, query 4 keys 1-2, query 5 keys 1-3.
    pattern = torch.zeros(1, 2, 6, 6)
    pattern[0, 0, :, 0] = 1.0  # head 0 only looks at the sink
    for q in range(6):  # head 1 looks at key 1 whenever it can
        pattern[0, 1, q, min(q, 1)] = 1.0
    mass = evicted_mass(pattern, sink=1, recent=2)
    assert mass[0, 0].item() == 0.0
    assert mass[0, 1].item() == 1.0  # queries 3, 4, 5 all put everything on evicted key 1
    pattern[0, 1, 5] = 0.0
    pattern[0, 1, 5, 4] = 1.0  # query 5 now looks at a recent key: one of three queries evicts nothing
    assert evicted_mass(pattern, sink=1, recent=2)[0, 1].item() == pytest.approx(2 / 3)


def test_previous_token_heads_stream_for_free_and_broad_heads_do_not(lab):
    area = hl.score(lab, "attention_area", n=2, seq_len=384, sink=4, recent=64, save=False)
    assert area.values.shape == (lab.info.n_layers, lab.info.n_heads)
    assert area.values.min() >= 0 and area.values.max() <= 1
    # L16H0 is the embedded model's previous-token head (test_scorers): its attention never leaves the window.
    assert area.values[16, 0] < 0.02
    # Some head reads far back: a quarter of the heads lose more than 10% of their attention.
    assert (area.values > 0.1).float().mean() > 0.25


def test_attention_area_refuses_a_window_that_evicts_nothing():
    with pytest.raises(ValueError, match="seq_len > sink \\+ recent"):
        make_scorer("attention_area", seq_len=256, sink=64, recent=256)
