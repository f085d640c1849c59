"""HeadMask: budgets and the GQA group rule from scores, both file formats, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from headlab.lab import ModelInfo
from headlab.masks import HeadMask
from headlab.scores import HeadScores

SMOL = ModelInfo(name="SmolLM2-135M-Instruct", n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_model=576,
                 n_ctx=8192, d_vocab=49152, architecture="LlamaForCausalLM")
TOY = ModelInfo(name="toy", n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_model=32, n_ctx=64, d_vocab=10,
                architecture="LlamaForCausalLM")


def toy_scores() -> HeadScores:
    # 4 query heads over 2 KV heads: query heads 0,1 read KV head 0; 2,3 read KV head 1.
    values = torch.tensor([[0.9, 0.0, 0.1, 0.2],
                           [0.3, 0.3, 0.5, 0.0]])
    return HeadScores(kind="retrieval", model="toy", params={"n": 3}, values=values)


def test_from_scores_groups_query_heads_by_h_div_group_size():
    mask = HeadMask.from_scores(toy_scores(), full_fraction=0.5, sink=4, recent=16, n_kv_heads=2)
    # KV scores by max: layer 0 [0.9, 0.2], layer 1 [0.3, 0.5] -> the top 2 of 4 KV heads.
    # (Grouping h % 2 instead would pick layer 1's KV head 0: [0.5, 0.3].)
    assert mask.full.tolist() == [[True, False], [False, True]]
    assert (mask.sink, mask.recent, mask.n_heads, mask.n_kv_heads, mask.model) == (4, 16, 4, 2, "toy")
    assert mask.source["kind"] == "retrieval" and mask.source["params"] == {"n": 3}
    assert mask.source["budget"] == {"full_fraction": 0.5, "n_full": 2} and mask.source["group"] == "max"
    assert torch.equal(mask.scores, toy_scores().values)
    assert mask.streaming_query_heads() == [(0, 2), (0, 3), (1, 0), (1, 1)]


def test_from_scores_mean_group_threshold_and_extremes():
    scores = toy_scores()
    # By mean: layer 0 [0.45, 0.15], layer 1 [0.3, 0.25].
    assert HeadMask.from_scores(scores, full_fraction=0.5, group="mean", n_kv_heads=2).full.tolist() == [[True, False], [True, False]]
    assert HeadMask.from_scores(scores, threshold=0.25, info=TOY).full.tolist() == [[True, False], [True, True]]
    assert HeadMask.from_scores(scores, threshold=0.25, group="mean", info=TOY).full.tolist() == [[True, False], [True, False]]
    assert HeadMask.from_scores(scores, full_fraction=0.0, n_kv_heads=2).n_full == 0
    assert HeadMask.from_scores(scores, full_fraction=1.0, n_kv_heads=2).n_full == 4
    assert HeadMask.from_scores(scores, full_fraction=0.25, n_kv_heads=2).full.tolist() == [[True, False], [False, False]]


def test_from_scores_refuses_unclear_requests():
    scores = toy_scores()
    with pytest.raises(ValueError, match="exactly one"):
        HeadMask.from_scores(scores, n_kv_heads=2)
    with pytest.raises(ValueError, match="exactly one"):
        HeadMask.from_scores(scores, full_fraction=0.5, threshold=0.1, n_kv_heads=2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        HeadMask.from_scores(scores, full_fraction=0.5)  # "toy" has no config to read it from
    with pytest.raises(ValueError, match="cannot be split"):
        HeadMask.from_scores(scores, full_fraction=0.5, n_kv_heads=3)
    with pytest.raises(ValueError, match="full_fraction"):
        HeadMask.from_scores(scores, full_fraction=1.5, n_kv_heads=2)
    with pytest.raises(ValueError, match="group"):
        HeadMask.from_scores(scores, full_fraction=0.5, group="median", n_kv_heads=2)
    with pytest.raises(ValueError, match="recent"):
        HeadMask.from_scores(scores, full_fraction=0.5, recent=0, n_kv_heads=2)


def test_random_and_constant_masks():
    a = HeadMask.random(SMOL, 0.25, seed=1)
    assert a.full.shape == (30, 3) and a.n_full == round(0.25 * 90)
    assert torch.equal(a.full, HeadMask.random(SMOL, 0.25, seed=1).full)
    assert not torch.equal(a.full, HeadMask.random(SMOL, 0.25, seed=2).full)
    assert HeadMask.all_full(SMOL).n_full == 90 and HeadMask.all_streaming(SMOL).n_full == 0
    assert HeadMask.all_streaming(SMOL, sink=4, recent=8).streaming_query_heads()[:3] == [(0, 0), (0, 1), (0, 2)]


def test_ideal_kv_bytes_by_hand():
    mask = HeadMask.from_scores(toy_scores(), full_fraction=0.5, sink=4, recent=16, n_kv_heads=2)  # 2 full, 2 streaming
    assert mask.ideal_kv_bytes(10, dtype_bytes=2, d_head=8) == 2 * (2 * 10 + 2 * 10) * 8 * 2
    assert mask.ideal_kv_bytes(100, dtype_bytes=4, d_head=8) == 2 * (2 * 100 + 2 * 20) * 8 * 4
    assert mask.ideal_kv_bytes(100, dtype_bytes=4, d_head=8, batch=3) == 3 * 2 * (2 * 100 + 2 * 20) * 8 * 4


def test_kv_memory_against_context_and_the_mask_figure():
    from headlab.masks import MIB, kv_memory

    mask = HeadMask.from_scores(toy_scores(), full_fraction=0.5, sink=4, recent=16, n_kv_heads=2)
    memory = kv_memory(mask, TOY, dtype_bytes=2, points=4)
    frame = memory.to_frame()
    assert list(frame["context"]) == [16, 32, 48, 64]  # up to the model's n_ctx
    assert frame["this mask"].iloc[-1] == pytest.approx(2 * (2 * 64 + 2 * 20) * 8 * 2 / MIB)
    assert (frame["all streaming"] <= frame["this mask"]).all() and (frame["this mask"] <= frame["full cache"]).all()
    assert "64 tokens" in memory.summary() and "4 + 16" in memory.summary()
    assert [trace.name for trace in memory.figure().data] == ["full cache", "this mask", "all streaming"]
    assert mask.figure().data[0].z.tolist() == mask.full.int().T.tolist()


def test_json_round_trip(tmp_path):
    mask = HeadMask.from_scores(toy_scores(), full_fraction=0.5, sink=4, recent=16, n_kv_heads=2)
    path = mask.save(tmp_path / "sub" / "mask.json")
    record = json.loads(path.read_text())
    assert record["format"] == "headlab.head_mask/v1" and record["full"] == [[1, 0], [0, 1]]
    back = HeadMask.load(path)
    assert torch.equal(back.full, mask.full) and torch.equal(back.scores, mask.scores)
    assert (back.model, back.n_layers, back.n_heads, back.n_kv_heads, back.sink, back.recent, back.source) == (
        mask.model, mask.n_layers, mask.n_heads, mask.n_kv_heads, mask.sink, mask.recent, mask.source)
    assert not list(path.parent.glob("*.tmp"))  # written atomically, nothing left behind


def test_duo_round_trip(tmp_path):
    mask = HeadMask.random(SMOL, 0.3, seed=0, sink=64, recent=256)
    folder = mask.save_duo(tmp_path / "duo")
    rows = (folder / "full_attention_heads.tsv").read_text().splitlines()
    assert len(rows) == 30 and all(len(r.split("\t")) == 3 for r in rows)
    assert [[float(v) for v in r.split("\t")] for r in rows] == mask.full.float().tolist()
    config = json.loads((folder / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"]) == (64, 256)
    back = HeadMask.load(folder, info=SMOL)
    assert torch.equal(back.full, mask.full) and (back.sink, back.recent, back.model, back.n_heads) == (64, 256, SMOL.name, 9)
    assert torch.equal(HeadMask.load(folder / "full_attention_heads.tsv").full, mask.full)


def test_bare_duo_attention_folder_is_clipped_and_thresholded(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("0.7\t-0.2\t1.3\n0.49\t0.5\t0.0\n")
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 8, "recent_size": 32, "lr": 0.02}))
    mask = HeadMask.load(tmp_path)
    assert mask.full.tolist() == [[True, False, True], [False, True, False]]
    assert (mask.sink, mask.recent, mask.n_heads, mask.model) == (8, 32, None, "")
    assert torch.allclose(torch.tensor(mask.source["budget"]["values"]), torch.tensor([[0.7, 0.0, 1.0], [0.49, 0.5, 0.0]]))
    with pytest.raises(ValueError, match="query-head count"):
        mask.streaming_query_heads()


def test_check_names_what_does_not_match(tmp_path):
    short = HeadMask(model="other", n_layers=28, n_heads=9, n_kv_heads=3, full=torch.ones(28, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask has 28 layers, SmolLM2-135M-Instruct has 30"):
        short.check(SMOL)
    wide = HeadMask(model="other", n_layers=30, n_heads=8, n_kv_heads=4, full=torch.ones(30, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask has 4 KV heads per layer, SmolLM2-135M-Instruct has 3") as err:
        wide.check(SMOL)
    assert "mask has 8 query heads per layer" in str(err.value) and "layers" not in str(err.value).split(":", 1)[1]
    HeadMask.all_full(SMOL).check(SMOL)  # fits: no error
    # Loading with info checks too, also for DuoAttention folders.
    short.save_duo(tmp_path / "short")
    with pytest.raises(ValueError, match="mask has 28 layers"):
        HeadMask.load(tmp_path / "short", info=SMOL)


@pytest.mark.parametrize(
    "tsv, message",
    [
        ("1\t0\t1\n1\t0\n1\t1\t1\n", r"row 2 has 2 tab-separated values, the first row has 3"),
        ("1\t0\t1\n1\t0\t1\n1\tyes\t1\n", r"row 3, column 2: 'yes' is not a number"),
        ("1\t0\tnan\n", r"row 1, column 3: 'nan' is not a finite number"),
        ("\n\n", r"is empty"),
    ],
)
def test_malformed_duo_tsv_says_which_row(tmp_path, tsv, message):
    (tmp_path / "full_attention_heads.tsv").write_text(tsv)
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 4, "recent_size": 8}))
    with pytest.raises(ValueError, match=message):
        HeadMask.load(tmp_path)


def test_other_bad_files(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("1\t0\n")
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 4}))
    with pytest.raises(ValueError, match="recent_size"):
        HeadMask.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="full_attention_heads.tsv"):
        HeadMask.load(_empty_dir(tmp_path))
    scores_file = tmp_path / "scores.json"
    toy_scores().save(scores_file)
    with pytest.raises(ValueError, match="not a headlab head-mask file"):
        HeadMask.load(scores_file)
    bad = tmp_path / "bad.json"
    mask = HeadMask.from_scores(toy_scores(), full_fraction=0.5, n_kv_heads=2)
    record = mask.to_record()
    record["full"] = [[1, 0], [0, 2]]
    bad.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="row 1 must be 2 values of 0 or 1"):
        HeadMask.load(bad)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadMask.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        HeadMask.load(tmp_path / "missing.json")


def _empty_dir(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_window_fields_are_whole_token_counts_within_bounds(tmp_path):
    full = torch.ones(2, 2, dtype=torch.bool)
    mask = HeadMask(model="toy", n_layers=2, n_heads=4, n_kv_heads=2, full=full, sink=4.0, recent=16)
    assert (mask.sink, mask.recent) == (4, 16) and type(mask.sink) is int  # a whole float (a slider's 4.0) is 4
    for sink, recent, message in [(4.5, 16, "sink .* must be a whole number, got 4.5"),
                                  (4, float("inf"), "recent .* must be a whole number"),
                                  ("4", 16, "sink .* got '4'"), (-1, 16, "sink .* at least 0"),
                                  (4, 0, "recent .* at least 1"), (4, 10**30, "recent .* at most 2147483647")]:
        with pytest.raises(ValueError, match=message):
            HeadMask(model="toy", n_layers=2, n_heads=4, n_kv_heads=2, full=full, sink=sink, recent=recent)


@pytest.mark.parametrize("config, message", [
    ('{"sink_size": "4", "recent_size": 8}', "sink .* must be a whole number, got '4'"),
    ('{"sink_size": 4, "recent_size": 1e30}', "recent .* must be at most"),
    ('{"sink_size": 4, "recent_size": NaN}', "recent .* must be a whole number"),
    ('[4, 8]', "must be a JSON object with sink_size and recent_size"),
    ('{"sink_size": 4', "is not valid JSON"),
])
def test_duo_config_fields_are_checked(tmp_path, config, message):
    (tmp_path / "full_attention_heads.tsv").write_text("1\t0\n")
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=message) as err:
        HeadMask.load(tmp_path)
    assert "config.json" in str(err.value)


def test_save_refuses_a_folder_or_a_non_json_path(tmp_path):
    mask = HeadMask.from_scores(toy_scores(), full_fraction=0.5, n_kv_heads=2)
    with pytest.raises(ValueError, match="is a folder"):
        mask.save(tmp_path)
    raw = tmp_path / "scores.safetensors"
    raw.write_bytes(b"raw")
    with pytest.raises(ValueError, match="must be a .json path"):
        mask.save(raw)
    assert raw.read_bytes() == b"raw"


def test_top_k_is_exact_with_ties_and_the_config_names_the_sources():
    from headlab.masks import MaskConfig, choose_full, top_k_full

    tied = torch.tensor([[0.5, 0.5], [0.5, 0.1]])
    assert top_k_full(tied, 2).tolist() == [[True, True], [False, False]]  # ties: earlier layer, then earlier KV head
    assert [int(top_k_full(tied, k).sum()) for k in range(5)] == [0, 1, 2, 3, 4]
    full, budget = choose_full(tied, None, 0.4)
    assert full.tolist() == [[True, True], [True, False]] and budget == {"threshold": 0.4, "n_full": 3}
    with pytest.raises(ValueError, match="Mask source must be one of .*duo.*razor.*; got 'nope'"):
        MaskConfig(source="nope")
