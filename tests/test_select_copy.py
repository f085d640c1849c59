"""Select-and-copy heads: option scores on hand-built attention, MCQA prompts and files, the scorer, task and tab on the embedded model."""
from __future__ import annotations

import json

import pytest
import torch

import headlab as hl
import headlab.scorers.select_copy  # noqa: F401  (registers "select_copy" until it joins _MODULES)
import headlab.tasks.mcqa  # noqa: F401  (registers "mcqa")
from headlab import store
from headlab.datasets import mcqa
from headlab.scorers.select_copy import (
    VARIANTS, accuracy, best_head, option_scores, predictions, split_indices, unrotated_scores,
)
from headlab.tasks import make_task

N_SCORE = 6  # questions scored on the embedded model: 3 validation, 3 test (CPU time)


# --- hand-built scores ---------------------------------------------------------------------------


def _hand_scores() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 prompts x 3 heads x 6 queries x 6 keys; options at keys (1, 2, 3, 4) and (2, 3, 4, 5)."""
    scores = torch.full((2, 3, 6, 6), -1.0)
    positions = torch.tensor([[1, 2, 3, 4], [2, 3, 4, 5]])
    # final query (5): head 0 prefers the 3rd option (C) / 2nd option (B); head 1 the first; head 2 ties everywhere.
    scores[0, 0, 5, 3], scores[1, 0, 5, 3] = 4.0, 4.0
    scores[0, 1, 5, 1], scores[1, 1, 5, 2] = 2.0, 2.0
    scores[:, :, 4] = 9.0  # another query row: must be ignored
    scores[0, 0, 5, 0] = 50.0  # a non-option key (BOS) with the highest score: must be ignored
    return scores, positions, torch.tensor([2, 1])


def test_option_scores_read_the_final_query_at_the_option_keys():
    scores, positions, answers = _hand_scores()
    picked = option_scores(scores, positions)
    assert picked.shape == (2, 3, 4)
    assert picked[0, 0].tolist() == [-1.0, -1.0, 4.0, -1.0] and picked[1, 0].tolist() == [-1.0, 4.0, -1.0, -1.0]
    assert predictions(picked).tolist() == [[2, 0, 0], [1, 0, 0]]  # ties go to the first option
    assert accuracy(picked, answers).tolist() == [1.0, 0.0, 0.0]
    # another query position, per prompt
    assert option_scores(scores, positions, torch.tensor([4, 4]))[0, 0].tolist() == [9.0] * 4
    # a missing option (-1) never wins, even when every real option scores low
    masked = option_scores(scores, torch.tensor([[1, 2, -1, -1], [2, 3, 4, -1]]))
    assert masked[0, 0, 2:].tolist() == [float("-inf")] * 2 and predictions(masked)[0, 0] == 0


def test_attention_weights_pick_what_the_qk_scores_pick():
    """Softmax over one query row is monotone: the attention score and the QK-score agree head by head."""
    torch.manual_seed(0)
    scores = torch.randn(5, 4, 7, 7)
    positions = torch.tensor([[1, 2, 3, 4]] * 5)
    pattern = scores.softmax(-1)
    assert torch.equal(predictions(option_scores(scores, positions)), predictions(option_scores(pattern, positions)))


def test_unrotated_scores_share_kv_heads_across_their_query_group():
    q = torch.zeros(1, 3, 4, 2)  # 4 query heads over 2 KV heads
    k = torch.zeros(1, 3, 2, 2)
    q[0, -1, :, 0] = 1.0  # every final query reads dimension 0
    k[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # KV head 0: growing keys
    k[0, :, 1, 0] = torch.tensor([3.0, 2.0, 1.0])  # KV head 1: shrinking keys
    s = unrotated_scores(q, k)
    assert s.shape == (1, 4, 1, 3)
    expected = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]) / 2**0.5
    assert torch.allclose(s[0, :, 0], expected)


def test_split_and_best_head():
    val, test = split_indices(10, 0.5, 0)
    assert len(val) == 5 and sorted(val + test) == list(range(10)) and split_indices(10, 0.5, 0) == (val, test)
    assert split_indices(10, 0.5, 1) != (val, test)
    assert split_indices(2, 0.9, 0)[1]  # both splits non-empty
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0, 0)
    assert best_head(torch.tensor([[0.1, 0.5], [0.5, 0.2]])) == (0, 1)


# --- questions and files -------------------------------------------------------------------------


def test_synthetic_questions_are_seeded_balanced_and_answerable():
    questions = mcqa.synthetic_questions(40, seed=3)
    assert questions == mcqa.synthetic_questions(40, seed=3) and questions != mcqa.synthetic_questions(40, seed=4)
    assert torch.bincount(torch.tensor([q.answer for q in questions])).tolist() == [10, 10, 10, 10]
    for q in questions:
        words = {c: set(w) for c, (_, w) in mcqa.CATEGORIES.items()}
        assert q.options[q.answer] in words[q.category]
        assert not any(o in words[q.category] for i, o in enumerate(q.options) if i != q.answer)
    assert {q.category for q in mcqa.synthetic_questions(12, 0, ["fruit", "animal", "colour"])} == {"fruit", "animal", "colour"}
    with pytest.raises(KeyError, match="Unknown question categories"):
        mcqa.synthetic_questions(4, 0, ["planets"])


def test_load_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(
        json.dumps({"question": "2+2?", "options": ["3", "4", "5", "6"], "answer": "B"}) + "\n\n"
        + json.dumps({"question": "Sky colour?", "A": "blue", "B": "green", "C": "red", "answer": 0}) + "\n"
    )
    got = mcqa.load_questions(jsonl)
    assert [q.answer for q in got] == [1, 0] and got[1].options == ("blue", "green", "red")
    csv_file = tmp_path / "q.csv"
    csv_file.write_text('question,A,B,C,D,answer\nCapital of France?,Rome,Paris,Oslo,Bern,b\n"Largest, planet?",Mars,Venus,Jupiter,Earth,2\n')
    got = mcqa.load_questions(csv_file)
    assert [q.answer for q in got] == [1, 2] and got[1].question == "Largest, planet?"
    list_csv = tmp_path / "l.csv"
    list_csv.write_text('question,options,answer\nPick one,"[""x"", ""y""]",A\n')
    assert mcqa.load_questions(list_csv)[0].options == ("x", "y")


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"question": "q", "options": ["a", "b"], "answer": "A"}\n{oops\n', "bad.jsonl line 2: not valid JSON"),
    ("bad.jsonl", '{"question": "q", "options": ["a", "b"]}\n', "line 1: field 'answer' is missing"),
    ("bad.jsonl", '{"question": "q", "options": ["a", "b"], "answer": "E"}\n', "line 1: field 'answer' is 'E'"),
    ("bad.jsonl", '{"question": "q", "options": ["a", "b"], "answer": 5}\n', "line 1: field 'answer' is 5, outside the 2 options"),
    ("bad.jsonl", '{"question": "q", "options": ["a"], "answer": 0}\n', "line 1: field 'options' has 1 options"),
    ("bad.jsonl", '{"options": ["a", "b"], "answer": 0}\n', "line 1: field 'question' is missing"),
    ("bad.jsonl", '{"question": "q", "answer": 0}\n', "line 1: no options"),
    ("bad.jsonl", '{"question": "q", "options": "a b", "answer": 0}\n', "line 1: field 'options' is not a list"),
    ("bad.csv", "question,A,B,answer\nq,a,b,A\nq2,a,,A\n", "bad.csv line 3: field 'options' has 1 options"),
    ("bad.csv", "question,answer\nq,A\n", "bad.csv line 1: the header must name"),
    ("bad.csv", "question,A,B,answer\nq,a,b,maybe\n", "bad.csv line 2: field 'answer' is 'maybe'"),
    ("bad.txt", "question\n", "unknown file type"),
    ("empty.jsonl", "\n", "holds no questions"),
])
def test_loader_errors_name_the_line_and_field(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(mcqa.MCQAFormatError, match=message.replace("(", r"\(").replace("?", r"\?")):
        mcqa.load_questions(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No multiple-choice file"):
        mcqa.load_questions(tmp_path / "none.jsonl")


# --- prompts on the embedded model ---------------------------------------------------------------


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_positions_decode_to_the_labels_and_option_ends(lab, chat):
    questions = mcqa.synthetic_questions(8, 1) + [mcqa.Question("Pick the tool.", ("a red screwdriver", "Norway", "banana split"), 2)]
    for prompt in mcqa.build_prompts(lab, questions, chat=chat):
        assert prompt.chat == chat and prompt.tokens[0] == lab.bos_token_id
        assert prompt.tokens[1] != lab.bos_token_id  # the chat template's own first token is not doubled
        decoded = [lab.tokenizer.decode([int(prompt.tokens[p])]) for p in prompt.label_positions]
        letters = list(mcqa.LETTERS[: prompt.n_options])
        assert all(d in (letter, " " + letter) for d, letter in zip(decoded, letters)) and len(decoded) == len(letters)
        for option, last in zip(prompt.question.options, prompt.last_positions):
            assert option.endswith(lab.tokenizer.decode([int(prompt.tokens[last])]).strip())
        assert prompt.label_positions == sorted(prompt.label_positions) and prompt.last_positions[-1] < prompt.query_position
        assert prompt.text.endswith("assistant\n" if chat else "Answer:")


# --- the scorer, the task and the tab on the embedded model --------------------------------------


@pytest.fixture(scope="module")
def sc_scores(lab) -> hl.HeadScores:
    return hl.score(lab, "select_copy", n=N_SCORE)


def test_select_copy_scores_on_the_embedded_model(lab, sc_scores):
    info = lab.info
    assert sc_scores.values.shape == (info.n_layers, info.n_heads)
    assert store.run_path(info.slug, "select_copy", hl.scorers.resolve_params("select_copy", n=N_SCORE)).exists()
    again = hl.score(lab, "select_copy", n=N_SCORE)  # read back from the store
    assert torch.equal(again.values, sc_scores.values) and again.meta["best"] == sc_scores.meta["best"]
    meta, raw = sc_scores.meta, sc_scores.raw
    assert meta["n_val"] == meta["n_test"] == N_SCORE // 2 and meta["format"] == "chat template" and meta["chance"] == 0.25
    assert raw["scores_qk_label"].shape == (N_SCORE, info.n_layers, info.n_heads, 4)
    assert torch.equal(sc_scores.values, raw["test_qk_label"])
    for variant in VARIANTS:
        assert ((raw[f"test_{variant}"] >= 0) & (raw[f"test_{variant}"] <= 1)).all()
    # QK-score and attention weight rank options identically (float ties aside)
    assert (raw["all_qk_label"] - raw["all_attn_label"]).abs().max() <= 1 / N_SCORE
    # What holds however the few questions fall (the measured numbers are in analyses/README.md and the
    # shipped-run test below): among 270 heads the best one on the test split matches or beats the letter
    # logits — a selection effect, not a select-and-copy head — and the model answers A or B.
    assert meta["best"]["qk_label"]["best_test_any_head"] >= meta["logits_accuracy"]["test"]
    assert sum(meta["logits_prediction_counts"][:2]) >= N_SCORE - 1


def test_mcqa_task_for_ablation(lab):
    task = make_task("mcqa", lab, n=2)
    details = task.details()
    assert details["n"] == 2 and details["chance"] == 0.25
    # The metric, recomputed from the plain model: each letter's logit is the larger of 'A' and ' A' at the last position.
    ids = [[lab.tokenizer.encode(form, add_special_tokens=False) for form in (letter, " " + letter)] for letter in "ABCD"]
    assert all(len(i) == 1 for forms in ids for i in forms)
    with torch.no_grad():
        last = torch.stack([lab.hf_model(torch.as_tensor(p.tokens)[None]).logits[0, -1] for p in task.prompts])
    letters = torch.stack([last[:, [a[0], b[0]]].max(-1).values for a, b in ids], dim=1)  # [2, 4]
    answers = torch.tensor([p.question.answer for p in task.prompts])
    assert details["accuracy"] == float((letters.argmax(-1) == answers).float().mean())
    assert details["predicted"] == torch.bincount(letters.argmax(-1), minlength=4).tolist()
    assert details["p_correct"] == pytest.approx(float(letters.softmax(-1)[torch.arange(2), answers].mean()), abs=1e-4)
    reference = task.reference_tokens()
    assert reference.ndim == 2 and reference.shape[0] == 2 and reference[0, 0] == lab.bos_token_id
    fresh = {p.question for p in task.prompts}
    assert not fresh & set(mcqa.synthetic_questions(N_SCORE, 0))  # not the questions the scorer used


def test_select_copy_tab_functions(lab, sc_scores):
    import gradio as gr

    import headlab.scorers.select_copy as sc
    from app import select_copy_tab as tab
    from app.workbench import Workbench

    bench = Workbench(lab)
    with gr.Blocks():
        built = tab.build_select_copy_tab(bench, "lab")
    assert built.n.value == hl.scorers.scorer_fields("select_copy")["n"] and built.check.task_n.value == sc.CHECK.n
    scores = tab.select_copy_scores(bench, N_SCORE, 0)  # from the store
    assert torch.equal(scores.values, sc_scores.values)
    table = sc.validation_frame(scores, 5)
    assert len(table) == 5 and table["val acc (QK)"].is_monotonic_decreasing
    best = scores.meta["best"]["qk_label"]
    assert table["head"][0] == f"L{best['layer']}H{best['head']}"  # the best on validation ranks first
    assert "letter logits" in sc.summary(scores) and table["head"][0] in sc.summary(scores)
    assert sc.accuracy_heatmap(scores, "attn_last", "val").data
    example = sc.example_question(scores, 0)
    assert "Answer **" in example.summary() and len(example.figure().data[0].y) == 4
    assert example.to_frame()["answer"].sum() == 1
    with pytest.raises(ValueError, match="example question"):
        sc.example_question(scores, N_SCORE)
    curve = sc.ablation_check(lab, scores, k=1, n_random=1, n=1, method="zero")
    assert curve.top_heads[0] == [sc.selection_scores(scores).top_heads(1)[0]]
    assert curve.task["chat"] is True and list(curve.to_frame()["k"]) == [1]


def test_the_shipped_run_shows_no_select_and_copy_head_on_the_embedded_model(lab, monkeypatch):
    """The analysis' stored run (64 chat questions, shipped in cached_runs/): the paper's claim does not hold on this
    135M model. Not finding it means the store's key for it drifted (model slug or parameters): a failure."""
    monkeypatch.setenv("HEADLAB_RUNS", str(store.REPO_RUNS))
    shipped = hl.stored(lab, "select_copy", n=64)
    assert shipped is not None, (f"the shipped select_copy run (n=64) of {lab.info.name} is not found under "
                                 f"{store.REPO_RUNS}: its store key drifted; re-run analyses/select_copy_heads.py")
    assert shipped.kind == "select_copy" and shipped.params == hl.scorers.resolve_params("select_copy", n=64)
    meta = shipped.meta
    assert meta["n_val"] == meta["n_test"] == 32 and meta["format"] == "chat template"
    assert float(shipped.raw["all_qk_label"].max()) < 0.5  # no head picks the answer half the time
    assert meta["best"]["qk_label"]["test"] <= meta["logits_accuracy"]["test"]  # the validation pick does not beat the logits
    assert sum(meta["logits_prediction_counts"][:2]) == meta["n_samples"]  # the model only ever answers A or B
