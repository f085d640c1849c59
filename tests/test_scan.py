"""The batched ablation scan (prefix shared, last-position unembedding) equals one ablated forward pass per head
(through headlab.ablation's own hooks); re-entering the model at a block equals the full forward."""
from __future__ import annotations

import warnings

import pytest
import torch

from headlab import scan
from headlab.ablation import ablation_hooks
from headlab.scan import ablation_scan, forward_from, intact_prefix, last_token_kl
from headlab.tasks import make_task

HEADS = [(1, 4), (2, 2), (16, 0), (17, 3), (18, 6), (29, 8)]


def next_token_loss(tokens: torch.Tensor):
    """A scan measure: mean next-token cross-entropy of each ablated copy."""
    targets = tokens[:, 1:]

    def measure(logits: torch.Tensor) -> torch.Tensor:  # [k, batch, pos, vocab]
        logp = torch.log_softmax(logits[:, :, :-1], dim=-1)
        return -logp.gather(-1, targets[None, ..., None].expand(logits.shape[0], -1, -1, 1)).squeeze(-1).mean(dim=(1, 2))

    return measure


@pytest.fixture(scope="module")
def tokens(lab) -> torch.Tensor:
    texts = ["The cat sat on the mat and looked at the bird in the tree.",
             "Rivers run to the sea, and the sea never fills up at all."]
    return torch.cat([lab.to_tokens(text)[:, :14] for text in texts])


@torch.no_grad()
def one_at_a_time(lab, tokens, method, task=None, measure=None, **params) -> list[float]:
    """One plain full forward per head of HEADS with that head ablated; `measure` default: next-token loss."""
    measure = measure or next_token_loss(tokens)
    out = []
    for head in HEADS:
        logits = lab.model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(lab, [head], method, task, **params))
        out.append(float(measure(logits[None].float())[0]))
    return out


@pytest.mark.parametrize("method", ["zero", "scaled_query", "mean"])
def test_batched_scan_equals_separate_ablated_passes(lab, tokens, method):
    task = make_task("repeated_tokens", lab, n=2)  # its reference batch defines the heads' means
    expected = one_at_a_time(lab, tokens, method, task if method == "mean" else None)
    scanned = ablation_scan(lab, tokens, next_token_loss(tokens), method=method, heads=HEADS, chunk=4,
                            reference=task.reference_tokens())
    got = [float(scanned[h]) for h in HEADS]
    assert got == pytest.approx(expected, abs=2e-4)
    assert torch.isnan(scanned).sum() == scanned.numel() - len(HEADS)
    if method == "zero":  # the near-constant early head: zeroing it breaks the model, as the README says
        assert got[0] > max(got[2:]) + 0.3


def test_forward_from_a_block_equals_the_full_forward_also_with_hooks(lab, tokens):
    hooks = ablation_hooks(lab, [(17, 3), (20, 1)], "scaled_query", None, epsilon=1e-3)
    with torch.no_grad():
        prefix = intact_prefix(lab, tokens, {0, 17, 29})
        with lab.model.hooks(fwd_hooks=hooks):
            ablated = lab.model(tokens, return_type="logits")
            from_17 = forward_from(lab, prefix, 17, 2)  # [2 * batch, pos, vocab], two copies
            last_from_17 = forward_from(lab, prefix, 17, 1, last_only=True)
        from_0 = forward_from(lab, prefix, 0, 1)
    torch.testing.assert_close(from_0, prefix.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_17, ablated.repeat(2, 1, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(last_from_17, ablated[:, -1:], atol=1e-4, rtol=1e-5)  # another matmul shape
    assert (ablated - prefix.logits).abs().max() > 1.0  # the hooks did act


@pytest.mark.parametrize("method", ["zero", "scaled_query", "mean"])
def test_last_position_scan_equals_one_plain_forward_per_head(lab, tokens, method):
    """Heads over early, middle and late layers; chunks of 4 mix layers (1, 2, 16, 17 | 18, 29)."""
    task = make_task("repeated_tokens", lab, n=2)
    with torch.no_grad():
        kl = last_token_kl(lab.model(tokens, return_type="logits"))
    shapes = []

    def measure(logits: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(logits.shape))
        return kl(logits)

    measure.positions = kl.positions
    expected = one_at_a_time(lab, tokens, method, task if method == "mean" else None, measure=kl)
    scanned = ablation_scan(lab, tokens, measure, method=method, heads=HEADS, chunk=4, reference=task.reference_tokens())
    assert [float(scanned[h]) for h in HEADS] == pytest.approx(expected, abs=1e-4, rel=1e-3)
    assert shapes == [(4, 2, 1, lab.info.d_vocab), (2, 2, 1, lab.info.d_vocab)]  # only the last position unembedded


def test_scan_falls_back_to_full_passes_when_reentry_is_not_exact(lab, tokens, monkeypatch):
    heads = [(2, 2), (18, 6)]
    with torch.no_grad():
        kl = last_token_kl(lab.model(tokens, return_type="logits"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the embedded model the scan re-enters at blocks, no fallback
        shared = ablation_scan(lab, tokens, kl, method="zero", heads=heads)
    monkeypatch.setattr(scan, "_reentry_is_exact", lambda lab, prefix: False)
    with pytest.warns(RuntimeWarning, match="full forward passes"):
        full = ablation_scan(lab, tokens, kl, method="zero", heads=heads)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_batched_and_one_head_per_pass_scans_agree_and_kl_is_zero_only_when_nothing_changes(lab, tokens):
    with torch.no_grad():
        intact = lab.model(tokens, return_type="logits")
    kl = last_token_kl(intact)
    assert float(kl(intact[None].float())[0]) == pytest.approx(0.0, abs=1e-6)
    heads = [(18, head) for head in range(lab.info.n_heads)]
    batched = ablation_scan(lab, tokens, kl, method="scaled_query", heads=heads)
    looped = ablation_scan(lab, tokens, kl, method="scaled_query", heads=heads, chunk=1)
    torch.testing.assert_close(batched[18], looped[18], atol=1e-4, rtol=1e-3)
    assert (batched[18] >= 0).all() and batched[18].max() > 0.01


def test_bad_scan_requests_are_clear_errors(lab, tokens):
    with pytest.raises(KeyError, match="Unknown ablation method 'shuffle'"):
        ablation_scan(lab, tokens, next_token_loss(tokens), method="shuffle", heads=HEADS)
    with pytest.raises(ValueError, match="epsilon in"):
        ablation_scan(lab, tokens, next_token_loss(tokens), method="scaled_query", method_params={"epsilon": 1.5}, heads=HEADS)
    with pytest.raises(ValueError, match="chunk must be"):
        ablation_scan(lab, tokens, next_token_loss(tokens), heads=HEADS, chunk=0)
    with pytest.raises(ValueError, match="positions must be one of"):
        ablation_scan(lab, tokens, next_token_loss(tokens), heads=HEADS, positions="first")


def test_chunks_follow_layer_boundaries():
    heads = [(layer, head) for layer in range(4) for head in range(9)]
    assert [len(c) for c in scan.layer_chunks(heads, 32)] == [27, 9]
    assert [len(c) for c in scan.layer_chunks(heads, 4)] == [4, 4, 1] * 4
    assert scan.layer_chunks([(5, 1), (2, 0), (5, 0)], 32) == [[(5, 1), (2, 0), (5, 0)]]  # order kept
