"""hl.diff: a model against itself is zero everywhere; the refusal LoRA shows up exactly where it was merged; other
shapes are refused; the record round-trips through the store."""
from __future__ import annotations

import json

import pytest
import torch

import headlab as hl
from headlab.diff import ModelDiff, ShapeMismatch, stored_diff
from headlab.loading import REFUSAL_ADAPTER_DIR

WEIGHTS_ONLY = {"kinds": [], "behaviour": False}


@pytest.fixture(scope="module")
def refusal_lab() -> hl.Lab:
    return hl.load("embedded-refusal", device="cpu")


@pytest.fixture(scope="module")
def refusal_diff(lab, refusal_lab) -> ModelDiff:
    return hl.diff(lab, refusal_lab, **WEIGHTS_ONLY)


def test_a_model_against_itself_is_zero_everywhere(lab):
    same = hl.diff(lab, lab, save=False, **WEIGHTS_ONLY)
    assert same.qk.abs().max() == 0 and same.ov.abs().max() == 0 and same.mlp.abs().max() == 0
    assert all(row["change"] == 0 for row in same.parameters) and len(same.parameters) > 200
    assert "0 of 270 heads changed" in same.summary()


def test_the_refusal_lora_changes_exactly_the_modules_it_targets(refusal_diff):
    targets = set(json.loads((REFUSAL_ADAPTER_DIR / "adapter_config.json").read_text())["target_modules"])
    frame = refusal_diff.parameter_frame()
    lora = frame["name"].map(lambda name: name.split(".")[-2] in targets)
    assert lora.sum() == 7 * 30 and (frame.loc[lora, "change"] > 1e-4).all()
    assert (frame.loc[~lora, "change"] == 0).all()  # embeddings and norms: bit-identical
    # q/k/v/o changed in every layer, so every head's circuits did; so did every MLP.
    assert (refusal_diff.qk > 1e-4).all() and (refusal_diff.ov > 1e-4).all() and (refusal_diff.mlp > 1e-4).all()
    # A rank-8 LoRA is a small edit: no circuit moved by more than a quarter of its norm.
    assert refusal_diff.change.max() < 0.25
    assert refusal_diff.to_frame().iloc[0]["head"] == "L{}H{}".format(*refusal_diff.changed_heads(1)[0])


def test_the_circuit_change_is_the_norm_of_the_expanded_difference(lab, refusal_lab, refusal_diff):
    from headlab.circuits.weights import folded_weights

    wa, wb = folded_weights(lab), folded_weights(refusal_lab)
    layer, head = refusal_diff.changed_heads(1)[0]
    ov_a, ov_b = wa.ov(layer, head).AB.double(), wb.ov(layer, head).AB.double()
    assert float(refusal_diff.ov[layer, head]) == pytest.approx(float((ov_b - ov_a).norm() / ov_a.norm()), rel=1e-4)
    qk_a, qk_b = wa.reader(layer, head, "q").AB.double(), wb.reader(layer, head, "q").AB.double()
    assert float(refusal_diff.qk[layer, head]) == pytest.approx(float((qk_b - qk_a).norm() / qk_a.norm()), rel=1e-4)


def test_the_diff_is_stored_and_found_by_name(lab, refusal_lab, refusal_diff):
    found = stored_diff("embedded", "embedded-refusal", **WEIGHTS_ONLY)
    assert found is not None and torch.equal(found.qk, refusal_diff.qk) and found.parameters == refusal_diff.parameters
    assert stored_diff("embedded", "embedded-refusal", kinds=[], behaviour=False, top=3) is None
    assert len(refusal_diff.figure().data) == 3


def test_models_of_different_shapes_are_refused(lab, tiny_lab):
    with pytest.raises(ShapeMismatch, match="differ in shape .*n_layers 30 vs 2"):
        hl.diff(lab, tiny_lab, **WEIGHTS_ONLY)
    with pytest.raises(ValueError, match="Unknown score kind"):
        hl.diff(lab, lab, kinds=["nonsense"])
