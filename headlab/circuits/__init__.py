"""SVD inter-layer channels ("Talking Heads", Merullo et al. 2024) and Elhage et al.'s composition scores.

    import headlab as hl
    from headlab.circuits import channel_hooks
    kmap = hl.composition_map(lab, "k")              # every earlier -> later head pair, vs random matrices
    r = hl.channels(lab, sender=(16, 0), receiver=[(18, 6), (17, 3)], kind="k")
    r.summary(); r.to_frame(); r.tokens_frame(); r.channel(0.9)   # [d_model, r] subspace
    exp = hl.channel_experiment(lab, r, "repeated_tokens")       # channel removed vs random subspaces
    hooks = channel_hooks(lab, (16, 0), r.channel(0.9), scale=2.0, task=task)

The package is named for what it reads (the heads' OV and QK circuits); `hl.channels` is the function.

Modules: `weights` (ln-folded, GQA-aware head weights, rotary), `composition` (all-pair scores),
`report` (one pair's per-direction composition), `tokens` (token readouts of directions),
`intervention` (subspace edits of the sender's output and the causal experiment), `cli`.
"""
from headlab.circuits.composition import CompositionMap, composition_map, pair_score, random_baseline
from headlab.circuits.intervention import ChannelExperiment, channel_experiment, channel_hooks, sender_stats
from headlab.circuits.report import ChannelReport, channels
from headlab.circuits.weights import HeadWeights, folded_weights, rotary_frequencies, rotary_rotation

__all__ = [
    "ChannelExperiment", "ChannelReport", "CompositionMap", "HeadWeights", "channel_experiment", "channel_hooks",
    "channels", "composition_map", "folded_weights", "pair_score", "random_baseline", "rotary_frequencies",
    "rotary_rotation", "sender_stats",
]
