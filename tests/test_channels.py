"""SVD channels: composition against dense products, GQA indexing against the model's own K/V, and a causal channel."""
from __future__ import annotations

import math

import pytest
import torch

import headlab as hl
from headlab.ablation import ablation_hooks
from headlab.circuits import (
    CompositionMap, HeadWeights, channel_experiment, channel_hooks, folded_weights, pair_score, random_baseline,
    rotary_frequencies, rotary_rotation,
)
from headlab.circuits.composition import all_pair_scores
from headlab.circuits.report import decompose
from headlab.tasks import make_task

PREV_TOKEN_HEAD = (16, 0)
INDUCTION_HEADS = [(18, 6), (17, 3), (17, 4), (18, 7), (17, 5)]  # top-5 induction scores of the embedded model


def small_weights(seed: int = 0, n_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2, d_model: int = 24, d_head: int = 4) -> HeadWeights:
    gen = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (n_layers, n_heads, d_model, d_head), (n_layers, n_kv_heads, d_model, d_head)
    return HeadWeights(
        W_Q=torch.randn(*shape_q, generator=gen), W_K=torch.randn(*shape_kv, generator=gen),
        W_V=torch.randn(*shape_kv, generator=gen), W_O=torch.randn(n_layers, n_heads, d_head, d_model, generator=gen), fold_ln=False,
    )


def dense_reader(w: HeadWeights, layer: int, head: int, kind: str) -> torch.Tensor:
    """The receiver side as a dense [d_model, d_model] matrix, K/V head chosen by hand (h // group)."""
    kv = head // (w.n_heads // w.n_kv_heads)
    return {
        "q": w.W_Q[layer, head] @ w.W_K[layer, kv].T,
        "k": w.W_K[layer, kv] @ w.W_Q[layer, head].T,
        "v": w.W_V[layer, kv] @ w.W_O[layer, head],
    }[kind]


def dense_ov(w: HeadWeights, layer: int, head: int) -> torch.Tensor:
    return w.W_V[layer, head // (w.n_heads // w.n_kv_heads)] @ w.W_O[layer, head]


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_all_pair_scores_equal_dense_products(kind):
    w = small_weights()
    scores = all_pair_scores(w.all_ov(), w.all_readers(kind))
    for sl in range(w.n_layers):
        for sh in range(w.n_heads):
            for rl in range(w.n_layers):
                for rh in range(w.n_heads):
                    if rl <= sl:
                        assert scores[sl, sh, rl, rh] == 0
                        continue
                    ov, reader = dense_ov(w, sl, sh), dense_reader(w, rl, rh, kind)
                    expected = torch.linalg.norm(ov @ reader) / (torch.linalg.norm(ov) * torch.linalg.norm(reader))
                    assert scores[sl, sh, rl, rh] == pytest.approx(float(expected), rel=1e-4)
                    assert pair_score(w, (sl, sh), (rl, rh), kind) == pytest.approx(float(expected), rel=1e-4)


def test_per_direction_composition_decomposes_the_dense_score():
    w = small_weights(seed=1)
    sender, receivers = (0, 1), [(2, 3), (1, 0)]
    ov = dense_ov(w, *sender)
    numbers = decompose(w, sender, receivers, "k")
    U, S = numbers["directions"], numbers["singular_values"]
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-4)  # orthonormal read directions
    stacked = torch.cat([dense_reader(w, *r, "k") for r in receivers], dim=1)
    assert torch.allclose(torch.linalg.norm(U.T @ stacked, dim=1), S, rtol=1e-4)  # u_i carries s_i
    dense_c = torch.linalg.norm(ov @ U, dim=0) / torch.linalg.norm(ov)
    assert torch.allclose(numbers["composition"], dense_c, rtol=1e-4)
    assert float(numbers["share"].sum()) == pytest.approx(1.0, abs=1e-5)
    pooled = math.sqrt(sum(float(torch.linalg.norm(ov @ dense_reader(w, *r, "k"))) ** 2 for r in receivers))
    expected = pooled / (float(torch.linalg.norm(ov)) * float(torch.linalg.norm(stacked)))
    assert numbers["score"] == pytest.approx(expected, rel=1e-4)


def test_random_baseline_matches_isotropy():
    """For isotropic random matrices ‖AB‖² ≈ ‖A‖²‖B‖²/d, so the score sits at 1/sqrt(d_model)."""
    baseline = random_baseline(d_model=96, d_head=8, n_samples=128, seed=3)
    assert baseline["mean"] == pytest.approx(96 ** -0.5, rel=0.05)
    assert baseline["std"] < 0.2 * baseline["mean"] and baseline["q99"] > baseline["mean"]


def test_composition_map_ranks_stores_and_draws(tmp_path):
    w = small_weights(seed=2)
    values = all_pair_scores(w.all_ov(), w.all_readers("q"))
    cmap = CompositionMap(model="tiny", kind="q", fold_ln=False, values=values, baseline=random_baseline(24, 4, 64, 0))
    (sender, receiver, best) = cmap.top(1)[0]
    assert best == pytest.approx(float(values.max())) and receiver[0] > sender[0]
    assert all(s[0] >= 1 and r[0] >= 1 for s, r, _ in cmap.top(50, layers=(1, 2)))
    loaded = CompositionMap.load(cmap.save(tmp_path / "map.json"))
    assert torch.equal(loaded.values, values) and loaded.baseline == cmap.baseline
    assert len(cmap.heatmap(layers=(0, 1)).data[0].x) == 2 * w.n_heads


def test_unfolded_weights_reproduce_transformer_lens_composition(lab):
    """With fold_ln=False our scores are TransformerLens' own (its bridge expands K/V the same way)."""
    from transformer_lens.utilities.matrix import composition_scores

    raw, folded = folded_weights(lab, fold_ln=False), folded_weights(lab, fold_ln=True)
    OV, QK = lab.model.OV, lab.model.QK
    cases = [((16, 0), (18, 6), "k", QK[18, 6].T), ((16, 0), (17, 4), "q", QK[17, 4]), ((2, 1), (17, 5), "v", OV[17, 5])]
    for sender, receiver, kind, right in cases:
        reference = float(composition_scores(OV[sender], right, broadcast_dims=False))
        assert pair_score(raw, sender, receiver, kind) == pytest.approx(reference, rel=1e-4)
        # the ln1 weights are far from uniform, so folding them in changes the score
        assert abs(pair_score(folded, sender, receiver, kind) - reference) > 1e-3


@torch.no_grad()
def test_query_head_reads_kv_head_h_over_group_size(lab):
    layer = 17
    w = folded_weights(lab)
    assert (w.n_heads, w.n_kv_heads, w.group_size) == (9, 3, 3)
    tokens = lab.to_tokens("The quick brown fox jumps over the lazy dog near the river bank.")
    names = [f"blocks.{layer}.{n}" for n in ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
                                             "attn.hook_rot_k", "attn.hook_attn_scores")]
    _, cache = lab.model.run_with_cache(tokens, names_filter=lambda n: n in names)
    resid = cache[names[0]][0]
    normed = resid / (resid.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()  # RMSNorm without its weight (folded)
    q, k, v = (cache[n][0] for n in names[1:4])  # [pos, head or kv_head, d_head]
    for head in range(w.n_heads):
        kv = w.kv_head(head)
        assert kv == head // 3
        torch.testing.assert_close(normed @ w.W_Q[layer, head], q[:, head], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(normed @ w.reader(layer, head, "k").A, k[:, kv], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(normed @ w.reader(layer, head, "v").A, v[:, kv], atol=1e-3, rtol=1e-3)
    # The model's own attention scores pair query head h with KV head h // 3 (not h % 3).
    rot_q, rot_k, scores = (cache[n][0] for n in names[4:])
    causal = torch.tril(torch.ones(len(resid), len(resid), dtype=torch.bool))
    for head in range(w.n_heads):
        grouped = rot_q[:, head] @ rot_k[:, head // 3].T / math.sqrt(64)
        torch.testing.assert_close(scores[head][causal], grouped[causal], atol=1e-3, rtol=1e-3)
        if head // 3 != head % 3:
            interleaved = rot_q[:, head] @ rot_k[:, head % 3].T / math.sqrt(64)
            assert (scores[head][causal] - interleaved[causal]).abs().max() > 0.1
    # Rotary: the rotated keys are the un-rotated ones times R(position).
    inv_freq = rotary_frequencies(lab)
    for pos in (0, 3, len(resid) - 1):
        torch.testing.assert_close(k[pos] @ rotary_rotation(inv_freq, pos), rot_k[pos], atol=1e-3, rtol=1e-3)


def test_prev_token_to_induction_report_is_low_rank_and_above_chance(lab):
    report = hl.channels(lab, sender=PREV_TOKEN_HEAD, receiver=(18, 6), kind="k")
    assert report.score == pytest.approx(pair_score(folded_weights(lab), PREV_TOKEN_HEAD, (18, 6), "k"), rel=1e-4)
    assert float(report.share.sum()) == pytest.approx(1.0, abs=1e-5)
    n50, n90 = report.n_directions(0.5), report.n_directions(0.9)
    assert n50 < n90 <= 20 < len(report.share)  # a few of the 64 key directions carry the composition
    top = report.order[0]
    assert float(report.composition[top]) > 3 * report.baseline["composition_random"]
    assert report.channel(0.9).shape == (lab.info.d_model, n90)
    assert len(report.tokens) == 8 and all(row["sender_writes_plus"] for row in report.tokens)
    with pytest.raises(ValueError, match="earlier layers"):
        hl.channels(lab, sender=(18, 6), receiver=(16, 0))


@torch.no_grad()
def test_full_write_space_edit_is_exactly_zero_ablation(lab):
    """Removing the sender's whole write space through hook_attn_out equals zeroing its hook_z."""
    tokens = lab.to_tokens("Heads talk to later heads through the residual stream.")
    task = make_task("repeated_tokens", lab, n=1)
    write_space = torch.linalg.qr(lab.model.W_O[PREV_TOKEN_HEAD].detach().float().T)[0]
    edited = lab.model.run_with_hooks(tokens, fwd_hooks=channel_hooks(lab, PREV_TOKEN_HEAD, write_space, method="zero"))
    zeroed = lab.model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(lab, [PREV_TOKEN_HEAD], "zero", task))
    intact = lab.model(tokens)
    torch.testing.assert_close(edited, zeroed, atol=1e-4, rtol=1e-4)
    assert (edited - intact).abs().max() > 0.1


def test_removing_the_channel_hurts_far_more_than_random_subspaces(lab):
    report = hl.channels(lab, sender=PREV_TOKEN_HEAD, receiver=INDUCTION_HEADS, kind="k")
    rank = report.n_directions(0.9)
    assert rank <= 20
    task = make_task("repeated_tokens", lab, n=4)
    exp = channel_experiment(lab, report, task, ranks=[rank], n_random=3, scales=(), top_variance=False, save=False)
    channel_damage = exp.damage(exp.channel[0])
    random_damage = [exp.damage(v) for v in exp.random[0]]
    assert channel_damage > 3.0, exp.summary()  # nats per token on the second copy
    assert channel_damage > 5 * max(random_damage), exp.summary()
    assert channel_damage > 0.7 * exp.damage(exp.head_removed), exp.summary()  # most of the head's effect
    assert exp.energy_channel[0] > max(exp.energy_random[0])


def test_laundry_list_prompts_and_accuracy(lab):
    task = make_task("laundry_list", lab, n=8, n_items=2)
    assert task.tokens.shape[0] == 8 and task.candidates.shape == (8, 2)
    for text, candidates, target in zip(task.prompts, task.candidates, task.targets):
        listed, rest = text.split(": ", 1)[1].split(". At the store ", 1)
        answer = lab.tokenizer.decode([int(candidates[target])]).strip()
        other = lab.tokenizer.decode([int(candidates[1 - target])]).strip()
        assert sorted(listed.replace(" and ", ", ").split(", ")) == sorted([answer, other])
        assert f"the {other}" in rest and f"the {answer}" not in rest.split(". ")[0]
        assert text.endswith("forgot to buy the")
    details = task.details()
    assert details["chance"] == 0.5 and details["accuracy"] >= 0.75, details
    result = hl.ablate(lab, INDUCTION_HEADS, task)
    assert result.metric == task.metric and result.higher_is_better
    assert result.ablated <= details["accuracy"] - 0.3, result  # copying the missing item needs the induction heads
    with pytest.raises(ValueError, match="at least 2 items"):
        make_task("laundry_list", lab, n_items=1)


def test_experiment_config_validates_and_keeps_the_shipped_runs_key(lab):
    from headlab import store
    from headlab.circuits.intervention import ChannelExperiment, ChannelExperimentConfig, experiment_path

    with pytest.raises(ValueError, match="control"):
        ChannelExperimentConfig(control="nowhere")
    with pytest.raises(ValueError, match="mean, zero"):
        ChannelExperimentConfig(method="scaled_query")
    report = hl.channels(lab, sender=PREV_TOKEN_HEAD, receiver=hl.score(lab, "induction").top_heads(5), kind="k", token_directions=0)
    config = ChannelExperimentConfig()
    task = make_task(config.task, lab, n=config.n, seed=config.seed)
    path = experiment_path(lab, report, task, config, sorted({report.n_directions(0.5), report.n_directions(0.9)}))
    shipped = store.REPO_RUNS / lab.info.slug / path.name  # the tests write to a temporary store
    assert path.name == "channel-experiment-2d3053be16.json" and shipped.exists()
    assert ChannelExperiment.load(shipped).params() == store.read_json(shipped)["params"]
