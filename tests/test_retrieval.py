"""Retrieval heads: copy detection on hand-built attention, needle prompts, and the causal gap on the embedded model."""
from __future__ import annotations

import random

import pytest
import torch

import headlab as hl
from headlab.datasets import needles
from headlab.ablation import ablation_hooks
from headlab.generation import greedy_generate
from headlab.scorers.retrieval import (
    RETRIEVAL_CURVE, copy_hits, curve_ks, needle_accuracy, retrieval_curve, retrieval_heads, retrieval_summary,
    sample_retrieval_score, topk_jaccard,
)
from headlab.tasks import make_task

PROMPT = torch.tensor([1, 5, 6, 7, 8, 9])  # the needle is positions 2..4 (tokens 6, 7, 8)


def _attention_on(positions: list[int], n_keys: int = 6) -> torch.Tensor:
    """`[1 layer, len(positions) heads, n_keys]`, head i attending mostly to `positions[i]`."""
    attention = torch.full((1, len(positions), n_keys), 0.05)
    for head, pos in enumerate(positions):
        attention[0, head, pos] = 0.7
    return attention


def test_copy_hits_need_the_argmax_inside_the_needle_on_the_generated_token():
    attention = _attention_on([3, 5, 2])  # head 0 -> token 7; head 1 -> token 9 (outside); head 2 -> token 6
    assert copy_hits(attention, PROMPT, 7, 2, 5).tolist() == [[True, False, False]]
    assert copy_hits(attention, PROMPT, 6, 2, 5).tolist() == [[False, False, True]]
    assert copy_hits(attention, PROMPT, 9, 2, 5).tolist() == [[False, False, False]]  # 9 is not in the needle
    # keys beyond the prompt (generated tokens) never count
    assert not copy_hits(_attention_on([7], n_keys=8), PROMPT, 9, 2, 5).any()


def test_sample_score_is_copies_over_needle_length():
    steps = [_attention_on([2, 2]), _attention_on([3, 2]), _attention_on([4, 2])]
    score = sample_retrieval_score(steps, PROMPT, [6, 7, 8], 2, 5)
    assert torch.allclose(score, torch.tensor([[1.0, 1 / 3]]))


def test_topk_jaccard():
    a, b = torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[3.0, 0.0, 1.0, 2.0]])
    assert topk_jaccard(a, a, 2) == 1.0 and topk_jaccard(a, b, 2) == pytest.approx(1 / 3)


def test_needle_prompts_have_the_length_and_span_asked_for(lab):
    text = needles.haystack_text("filler")
    needle = needles.make_needle("passkey", random.Random(0))
    for depth in (0.0, 0.5, 1.0):
        sample = needles.build_sample(lab, needle, text, 200, depth)
        assert sample.tokens.shape == (1, 200) and sample.tokens[0, 0] == lab.bos_token_id
        span = lab.tokenizer.decode(sample.tokens[0, sample.needle_start : sample.needle_end])
        assert span.strip() == needle.text
    grid = needles.needle_grid(lab, shape="fact", haystack="prose", lengths=[128, 160], depths=[0.2, 0.8], n=2, seed=1)
    assert len(grid) == 8 and {s.context_len for s in grid} == {128, 160}
    again = needles.needle_grid(lab, shape="fact", haystack="prose", lengths=[128, 160], depths=[0.2, 0.8], n=2, seed=1)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(grid, again))


def test_a_users_haystack_file(lab, tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text("Apples grow on trees in the orchard. " * 30)
    sample = needles.needle_grid(lab, haystack=str(path), lengths=[96], depths=[0.5])[0]
    assert "orchard" in lab.tokenizer.decode(sample.tokens[0])


def test_bad_needle_inputs_are_clear_errors(lab, tmp_path):
    text = needles.haystack_text("filler")
    needle = needles.make_needle("fact", random.Random(0))
    with pytest.raises(needles.NeedleError, match="more than the context of 20 tokens"):
        needles.build_sample(lab, needle, text, 20, 0.5)
    with pytest.raises(needles.NeedleError, match="haystack is empty"):
        needles.build_sample(lab, needle, "", 128, 0.5)
    with pytest.raises(needles.NeedleError, match="haystack is empty"):
        needles.build_sample(lab, needle, "   \n ", 128, 0.5)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(needles.NeedleError, match="haystack is empty"):
        needles.needle_grid(lab, haystack=str(empty), lengths=[128], depths=[0.5])
    with pytest.raises(needles.NeedleError, match="Unknown haystack"):
        needles.haystack_text("no/such/file.txt")
    with pytest.raises(needles.NeedleError, match="depth"):
        needles.build_sample(lab, needle, text, 128, 1.5)
    with pytest.raises(KeyError, match="Unknown needle shape"):
        needles.make_needle("riddle", random.Random(0))
    with pytest.raises(hl.PromptTooLongError):
        needles.build_sample(lab, needle, text, lab.info.n_ctx + 1, 0.5)


def test_generation_honours_ablation_hooks(lab):
    """The HF call the generator makes runs the bridge's hooks: zeroing heads changes its logits exactly as in the bridge."""
    tokens = lab.to_tokens("The quick brown fox jumps over the lazy dog because")
    task = make_task("repeated_tokens", lab, n=1)
    hooks = ablation_hooks(lab, [(18, 6), (20, 6), (17, 3)], "zero", task)
    with torch.no_grad(), lab.model.hooks(fwd_hooks=hooks):
        via_hf = lab.hf_model(tokens).logits
        via_bridge = lab.model(tokens, return_type="logits")
    intact = lab.hf_model(tokens).logits
    assert torch.allclose(via_hf, via_bridge, atol=1e-4)
    assert not torch.allclose(via_hf, intact, atol=1e-3)
    generated, attention = greedy_generate(lab, tokens, 3, keep_attention=True)
    assert len(generated) == 3 and attention[2].shape == (lab.info.n_layers, lab.info.n_heads, tokens.shape[1] + 2)
    assert torch.allclose(attention[0].sum(-1), torch.ones(lab.info.n_layers, lab.info.n_heads), atol=1e-4)


@pytest.fixture(scope="module")
def fact_scores(lab) -> hl.HeadScores:
    return hl.score(lab, "retrieval", needle="fact", lengths=[256, 384], n=1)


def test_retrieval_scores_on_the_fact_needle(lab, fact_scores):
    assert fact_scores.values.shape == (lab.info.n_layers, lab.info.n_heads)
    assert fact_scores.meta["accuracy"] >= 0.8  # the model finds the fact (see report)
    assert 0 < fact_scores.meta["fraction_above_threshold"] < 0.15  # a few heads, as in the paper
    heads = retrieval_heads(fact_scores)
    assert heads and all(fact_scores.values[h] > 0.1 for h in heads)
    assert all(15 <= layer <= 25 for layer, _ in heads[:5])  # mid-to-late layers
    assert set(fact_scores.meta["stability_across_lengths"]) == {"256 vs 384"}
    assert fact_scores.raw["per_sample"].shape[0] == 6


def test_ablating_top_retrieval_heads_breaks_the_needle_task_random_heads_do_not(lab, fact_scores):
    task = make_task("needle", lab, n=1)  # 3 prompts of 256 tokens, needles the scorer did not see
    k = 10
    top = hl.ablate(lab, fact_scores.top(k), task)
    assert top.baseline == 1.0 and top.ablated <= 0.34, top
    pool = [(l, h) for l in range(lab.info.n_layers) for h in range(lab.info.n_heads) if (l, h) not in fact_scores.top_heads(k)]
    rng = random.Random(0)
    random_sets = [rng.sample(pool, k) for _ in range(5)]
    random_accuracy = [task.evaluate(ablation_hooks(lab, heads, "mean", task)) for heads in random_sets]
    assert sorted(random_accuracy)[2] >= 0.66, random_accuracy  # a typical random set barely matters
    # As for induction, a random set holding the previous-token head L16H0 breaks copying too
    # (seed 0 draws one); every set without it keeps the needle.
    spared = [acc for acc, heads in zip(random_accuracy, random_sets) if (16, 0) not in heads]
    assert len(spared) >= 3 and min(spared) >= 0.66, random_accuracy


def test_passkey_task_runs_and_reports_accuracy(lab):
    task = make_task("passkey", lab, n=1, lengths=(128,), depths=(0.5,))
    details = task.details()
    key = task.samples[0].needle.answer
    assert key.isdigit() and len(key) == 5 and key in lab.tokenizer.decode(task.samples[0].tokens[0])
    [(text, correct)] = details["answers"]
    assert correct == text.strip().startswith(key)  # exact match against the hidden key
    assert correct, text  # the embedded model finds a pass key at 128 tokens
    assert details["value"] == float(correct) and details["cells"].shape == (1, 1)
    assert details["cells"].item() == details["value"]
    assert task.reference_tokens().shape == (1, 128)


def test_needle_accuracy_grid_intact_vs_top_heads_ablated(lab, fact_scores):
    """Every cell of the needle task is right intact; with the top-10 retrieval heads ablated the model loses it."""
    grid = needle_accuracy(lab, fact_scores, k=10)
    assert grid.intact.shape == grid.ablated.shape == (2, 3)  # [len(lengths), len(depths)] of the run
    assert grid.intact.mean() >= 0.8 and grid.ablated.mean() <= 0.34, grid.to_frame()
    frame = grid.to_frame()
    assert list(frame.columns) == ["length", "depth", "intact", "ablated"] and len(frame) == 6
    assert len(grid.figure().data) == 2 and "L" in grid.summary()


def test_retrieval_curve_reads_its_defaults_once(lab, fact_scores):
    assert RETRIEVAL_CURVE.ks == (2, 5, 10) and curve_ks(10) == [2, 5, 10]
    curve = retrieval_curve(lab, fact_scores, ks=[10], n_random=2, n=1)
    assert curve.task["task"] == "needle" and curve.task["lengths"] == [256]  # the run's shortest length
    assert curve.top[0] < min(curve.random[0])  # the top-10 heads hurt more than random sets


def test_retrieval_tab_builds_and_its_views_render(lab, fact_scores):
    import gradio as gr

    from app import retrieval_tab
    from app.inputs import parse_numbers
    from app.workbench import Workbench

    bench = Workbench(lab)
    with gr.Blocks():
        tab = retrieval_tab.build_retrieval_tab(bench, "lab")
    assert tab.lengths.value == "256, 512" and tab.n.value == 3  # the scorer's defaults: the shipped run
    assert parse_numbers("256, 384", "lengths", int) == [256, 384]
    with pytest.raises(ValueError, match="lengths must be whole numbers"):
        parse_numbers("256, long", "lengths", int)
    scores = retrieval_tab.retrieval_scores(bench, "fact", "filler", "256, 384", "0.1, 0.5, 0.9", 1)  # from the store
    assert torch.equal(scores.values, fact_scores.values)
    assert "accuracy" in retrieval_summary(scores)
