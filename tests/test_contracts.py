"""Contract tests: every registered scorer and ablation method, run from the registries on a tiny random Llama.

As kvpress runs every press from one table (its tests/default_presses.py), the cases here come from
`hl.kinds()` and `headlab.ablation.METHODS` themselves, so a new scorer or method is held to the same
contracts with no test edit. The only per-kind knowledge is `SMALL`: parameters that shrink a kind's
cost (a kind missing from it runs with its defaults). The embedded-model tests of each scorer and
method (test_scorers.py, test_scan.py, ...) stay the integration layer: these check shapes, storage,
identity and exactness, not what the heads mean.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import headlab as hl
from headlab import store
from headlab.ablation import METHODS, AblationCurve, ablation_hooks, make_method, method_fields, method_state
from headlab.ablation import curve as curve_module
from headlab.heads import all_heads
from headlab.scan import LogitsMeasure, ablation_scan, last_token_kl
from headlab.scorers import make_scorer, scorer_class, scorer_fields
from headlab.scorers import safety as safety_module
from headlab.scorers.safety import SaharaResult, sahara
from headlab.scores import HeadScores

# Per kind, parameters that keep its run on the tiny model to a fraction of a second. Only costs: no kind needs
# an entry to be tested, and every entry must name a registered kind and real parameters (checked below).
SMALL: dict[str, dict] = {
    "attention_area": {"n": 2, "seq_len": 48, "sink": 4, "recent": 16},
    "duplicate_token": {"n": 2, "seq_len": 16},
    "induction": {"n": 2, "seq_len": 16},
    "previous_token": {"n": 2, "seq_len": 16},
    "retrieval": {"n": 1, "lengths": [64], "depths": [0.5]},
    "safety": {"n": 2},
    "select_copy": {"n": 4},  # >= 2 questions: a validation and a test one
    "sink": {"domain": "random", "domains": ["random", "repeated"], "seq_len": 32, "n": 2},
    "successor": {"n": 4},
}
# Kinds whose values may hold NaN, with why (their docstrings say so); every other kind's values are all finite.
MAY_BE_NAN: dict[str, str] = {}
KINDS = hl.kinds()
METHOD_NAMES = sorted(METHODS)
SEQ_LEN = 72  # longer than the default streaming window (sink 4 + recent 64), so every method edits something
TOLERANCE = 1e-4  # float32 reordering between a batched and a plain pass (logits and KL in nats are O(1))
MOVED = 1e-2  # the least change of some logit that ablating any one head must make (the tiny heads all move > 0.1)


def small(kind: str) -> dict:
    return dict(SMALL.get(kind, {}))


class ComputeCalled(AssertionError):
    """Raised by a scorer's or a record's compute where the store should have answered."""


def refuse_compute(*args, **kwargs):
    raise ComputeCalled("computed although the run is stored")


@pytest.fixture()
def empty_store(tmp_path, monkeypatch):
    """A fresh, empty `$HEADLAB_RUNS` for one test."""
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path))
    return tmp_path


def assert_same_scores(got: HeadScores, want: HeadScores) -> None:
    assert (got.kind, got.model, got.params) == (want.kind, want.model, want.params)
    assert torch.equal(got.values, want.values)
    assert got.raw.keys() == want.raw.keys()
    for key in want.raw:
        assert torch.equal(got.raw[key], want.raw[key].to(got.raw[key].dtype)), key


# --- the table itself ------------------------------------------------------------------------------


def test_small_table_names_registered_kinds_and_real_parameters():
    assert set(SMALL) <= set(KINDS), f"SMALL names kinds that are not registered: {set(SMALL) - set(KINDS)}"
    for kind, params in SMALL.items():
        assert set(params) <= set(scorer_fields(kind)), f"{kind}: SMALL names unknown parameters"
        make_scorer(kind, **params)  # valid values
    assert set(MAY_BE_NAN) <= set(KINDS)


# --- every scorer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_scorer_gives_finite_head_values_of_the_models_shape(tiny_lab, kind, empty_store):
    config = make_scorer(kind, **small(kind))
    result = hl.score(tiny_lab, kind, save=False, **small(kind))
    info = tiny_lab.info
    assert result.values.shape == (info.n_layers, info.n_heads)
    assert result.values.dtype.is_floating_point
    if kind not in MAY_BE_NAN:
        assert torch.isfinite(result.values).all(), f"{kind} gave non-finite values:\n{result.values}"
    assert not torch.isinf(result.values).any()
    assert result.kind == kind and result.model == info.name
    assert result.params == config.params() == make_scorer(kind, **config.params()).params()
    json.dumps(result.params)  # the params are the run's key: they must be JSON
    assert not config.run_path(tiny_lab).exists()  # save=False writes nothing


@pytest.mark.parametrize("kind", KINDS)
def test_scorer_run_is_stored_at_its_configs_key_and_read_back(tiny_lab, kind, empty_store, monkeypatch):
    params = small(kind)
    path = make_scorer(kind, **params).run_path(tiny_lab)
    assert path.parent.parent == empty_store
    assert hl.stored(tiny_lab, kind, **params) is None

    computed = hl.score(tiny_lab, kind, **params)
    assert path.exists()
    assert computed.path(empty_store) == path  # the record's own params hash to the config's key
    assert [p.name for p in empty_store.glob("*/*.json")] == [path.name]  # one run, one record
    assert_same_scores(HeadScores.load(path), computed)
    assert_same_scores(hl.stored(tiny_lab, kind, **params), computed)
    assert store.read_json(path)["params"] == make_scorer(kind, **params).params()

    monkeypatch.setattr(scorer_class(kind), "compute", refuse_compute)
    assert_same_scores(hl.score(tiny_lab, kind, **params), computed)  # the store answers: nothing computed
    with pytest.raises(ComputeCalled):
        hl.score(tiny_lab, kind, recompute=True, **params)


@pytest.mark.parametrize("kind", KINDS)
def test_scorer_rejects_an_unknown_parameter_naming_its_kind(tiny_lab, kind):
    with pytest.raises(TypeError, match=f"'{kind}'.*no_such_parameter"):
        hl.score(tiny_lab, kind, save=False, no_such_parameter=1)
    with pytest.raises(TypeError, match=f"'{kind}'"):
        hl.stored(tiny_lab, kind, no_such_parameter=1)


# --- every ablation method ----------------------------------------------------------------------------


def next_token_logit(tokens: torch.Tensor) -> LogitsMeasure:
    """A scan measure reading every position: the mean logit each ablated copy gives the actual next token,
    logits `[k, batch, pos, vocab]` -> `[k]` (no softmax over the 49k-token vocabulary: cheap on the CPU)."""
    targets = tokens[:, 1:]

    def measure(logits: torch.Tensor) -> torch.Tensor:
        picked = logits[:, :, :-1].gather(-1, targets[None, ..., None].expand(logits.shape[0], -1, -1, 1))
        return picked.squeeze(-1).float().mean(dim=(1, 2))

    return measure


@pytest.fixture(scope="module")
def batch(tiny_lab) -> torch.Tensor:
    """`[2, SEQ_LEN]` random token ids, BOS first."""
    tokens = torch.randint(0, tiny_lab.info.d_vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = tiny_lab.bos_token_id
    return tokens


@pytest.fixture(scope="module")
def intact_logits(tiny_lab, batch) -> torch.Tensor:
    """`[batch, pos, d_vocab]` of the unablated tiny model."""
    with torch.no_grad():
        return tiny_lab.model(batch, return_type="logits")


@pytest.fixture(scope="module")
def measures(batch, intact_logits) -> dict[str, LogitsMeasure]:
    """The scan's two kinds of measure, by the positions they read."""
    return {"all": next_token_logit(batch), "last": last_token_kl(intact_logits)}


@pytest.fixture(scope="module")
def one_head_at_a_time(tiny_lab, batch, intact_logits, measures) -> dict[str, dict[str, torch.Tensor]]:
    """`{method: {"all" | "last": [n_layers, n_heads] measure, "moved": [n_layers, n_heads] max |logit change|}}` with
    each head ablated on its own through `ablation_hooks`, one plain forward per head (the batch is the mean's reference)."""
    info = tiny_lab.info
    out = {}
    for name in METHOD_NAMES:
        values = {key: torch.empty(info.n_layers, info.n_heads) for key in ("all", "last", "moved")}
        for layer, head in all_heads(info):
            with torch.no_grad():
                logits = tiny_lab.model.run_with_hooks(batch, fwd_hooks=ablation_hooks(tiny_lab, [(layer, head)], name,
                                                                                          reference=batch))
            for key, measure in measures.items():
                values[key][layer, head] = measure(logits[None])[0]
            values["moved"][layer, head] = (logits - intact_logits).abs().max()
        out[name] = values
    return out


# (shared_prefix, positions, heads per pass): re-entry at layer 0 with every head in one pass, and at each layer in
# passes of 3 heads (so block i of a pass is not head i of its layer); full passes both ways; both unembeddings.
SCAN_PLANS = [(True, "all", None), (True, "last", 3), (False, "all", 3), (False, "last", None)]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no fallback: the tiny Llama must re-enter its blocks exactly
@pytest.mark.parametrize("shared_prefix, positions, chunk", SCAN_PLANS,
                         ids=[f"{'shared_prefix' if s else 'full_passes'}-{p}-chunk_{c}" for s, p, c in SCAN_PLANS])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_scan_equals_ablating_each_head_on_its_own(tiny_lab, batch, measures, one_head_at_a_time, method,
                                                          shared_prefix, positions, chunk):
    scanned = ablation_scan(tiny_lab, batch, measures[positions], method=method, shared_prefix=shared_prefix,
                            chunk=chunk, positions=positions)
    expected = one_head_at_a_time[method][positions]
    assert torch.allclose(scanned, expected, rtol=0, atol=TOLERANCE), f"{method}: scan\n{scanned}\nplain\n{expected}"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_changes_the_logits_for_every_head(one_head_at_a_time, method):
    """A method whose edit does nothing fails here; one that edits the wrong heads fails the scan test."""
    moved = one_head_at_a_time[method]["moved"]
    assert (moved > MOVED).all(), f"{method} left some heads' logits (nearly) unchanged:\n{moved}"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_on_no_heads_changes_nothing(tiny_lab, batch, intact_logits, method):
    assert ablation_hooks(tiny_lab, [], method, reference=batch) == []
    config = make_method(method)
    state = method_state(tiny_lab, config, batch)
    every_layer_no_heads = {layer: [(slice(None), [])] for layer in range(tiny_lab.info.n_layers)}
    hooks = config.hooks(tiny_lab, every_layer_no_heads, state)
    assert len(hooks) == tiny_lab.info.n_layers  # the edit runs, on an empty head list
    with torch.no_grad():
        logits = tiny_lab.model.run_with_hooks(batch, fwd_hooks=hooks)
    assert torch.equal(logits, intact_logits)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_edits_only_the_rows_and_heads_it_is_given(tiny_lab, batch, intact_logits, method):
    """Ablating one head in the second row only (as the scan's blocks do) leaves the first row exactly intact."""
    config = make_method(method)
    state = method_state(tiny_lab, config, batch)
    second_row_only = {tiny_lab.info.n_layers - 1: [(slice(1, 2), [tiny_lab.info.n_heads - 1])]}
    with torch.no_grad():
        logits = tiny_lab.model.run_with_hooks(batch, fwd_hooks=config.hooks(tiny_lab, second_row_only, state))
    assert torch.equal(logits[0], intact_logits[0])
    assert (logits[1] - intact_logits[1]).abs().max() > MOVED


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_params_round_trip_through_make_method(method):
    config = make_method(method)
    params = config.params()
    assert params == method_fields(method)  # the defaults are the fields' own
    assert json.loads(json.dumps(params)) == params
    assert make_method(method, **params) == config
    assert make_method(config) is config
    assert type(config) is METHODS[method] and config.name == method
    with pytest.raises(TypeError, match=f"'{method}'.*no_such_parameter"):
        make_method(method, no_such_parameter=1)


# --- records other than scores: store.cached_run ----------------------------------------------------


def only_record(root: Path) -> Path:
    records = list(root.glob("*/*.json"))
    assert len(records) == 1, records
    return records[0]


def test_ablation_curve_is_computed_once_and_loaded_back_equal(tiny_lab, empty_store, monkeypatch):
    scores = hl.score(tiny_lab, "previous_token", save=False, **small("previous_token"))

    def run(**options) -> AblationCurve:
        return hl.ablation_curve(tiny_lab, scores, ks=[1], n_random=1, n=2, **options)

    curve = run()
    path = only_record(empty_store)
    record = store.read_json(path)
    assert store.run_path(tiny_lab.info.slug, "ablation-curve", record["params"], empty_store) == path
    assert AblationCurve.load(path) == curve
    assert all(math.isfinite(v) for v in [curve.baseline, *curve.top, *curve.random[0]])

    monkeypatch.setattr(curve_module, "_run_curve", refuse_compute)
    assert run() == curve
    with pytest.raises(ComputeCalled):
        run(recompute=True)


def test_sahara_is_computed_once_and_loaded_back_equal(tiny_lab, empty_store, monkeypatch):
    params = {"n": 2, "k": 2, "pool": 4}
    ships = hl.score(tiny_lab, "safety", save=False, n=params["n"])
    result = sahara(tiny_lab, scores=ships, **params)
    path = only_record(empty_store)
    assert path.name.startswith("sahara-")
    record = store.read_json(path)
    assert store.run_path(tiny_lab.info.slug, "sahara", record["params"], empty_store) == path
    assert SaharaResult.load(path) == result
    assert len(set(result.heads)) == params["k"] and set(result.heads) <= set(result.candidates)
    assert len(result.candidates) == params["pool"] and all(math.isfinite(v) for v in result.curve)

    monkeypatch.setattr(safety_module, "_search", refuse_compute)
    assert sahara(tiny_lab, scores=ships, **params) == result
    with pytest.raises(ComputeCalled):
        sahara(tiny_lab, scores=ships, recompute=True, **params)


def test_sahara_without_scores_ranks_by_its_own_ships_run(tiny_lab, empty_store):
    result = sahara(tiny_lab, n=2, k=1, pool=2)
    ships = hl.stored(tiny_lab, "safety", n=2)
    assert ships is not None and result.candidates == ships.top_heads(2)
