"""The RULER-style suite: samples are deterministic per seed, fit their length, and are scored as RULER scores."""
from __future__ import annotations

import pytest
import torch

from headlab.datasets import ruler


@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_are_deterministic_per_seed_and_fit_their_length(tiny_lab, task):
    a = ruler.make_samples(tiny_lab, task, 1024, 2, seed=3)
    b = ruler.make_samples(tiny_lab, task, 1024, 2, seed=3)
    other = ruler.make_samples(tiny_lab, task, 1024, 2, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens) and x.answers == y.answers
    assert a[0].answers != other[0].answers
    assert a[0].answers != a[1].answers  # samples of one seed differ from each other
    # sample i is the same whatever n is asked for
    assert torch.equal(ruler.make_samples(tiny_lab, task, 1024, 1, seed=3)[0].tokens, a[0].tokens)
    for sample in a:
        assert sample.tokens.shape[1] + sample.max_new_tokens <= 1024
        assert sample.tokens.shape[1] + sample.max_new_tokens > 1024 - 80  # the haystack fills the length
        assert sample.tokens[0, 0] == tiny_lab.bos_token_id


def test_needles_and_chains_are_in_the_prompt(tiny_lab):
    decode = tiny_lab.tokenizer.decode
    multivalue = ruler.make_sample(tiny_lab, "niah_multivalue", 1024, 0)
    text = decode(multivalue.tokens[0])
    assert len(multivalue.answers) == 4
    assert all(f"is: {value}." in text for value in multivalue.answers)
    assert text.endswith("mentioned in the provided text are")
    multikey = ruler.make_sample(tiny_lab, "niah_multikey", 1024, 0)
    assert decode(multikey.tokens[0]).count("One of the special magic numbers for") == 4
    vt = ruler.make_sample(tiny_lab, "variable_tracking", 1024, 0)
    vt_text = decode(vt.tokens[0]).split("they are: ")[1]  # past the worked example
    first, *rest = vt.answers
    assert f"VAR {first} = " in vt_text and all(f"VAR {name} = VAR " in vt_text for name in rest)
    cwe = ruler.make_sample(tiny_lab, "common_words", 1024, 0)
    listed = decode(cwe.tokens[0]).split("list are:")[1]  # the real list, after the worked example
    counts = {word: listed.count(f". {word} ") for word in cwe.answers}
    assert len(cwe.answers) == 10 and min(counts.values()) >= 5  # each common word repeated (6 times below 4096)


def test_scorer_accepts_exactly_the_right_answers():
    assert ruler.string_match_all(" 7481763.", ["7481763"]) == 1.0
    assert ruler.string_match_all("The answer is 7481763", ["7481763"]) == 1.0
    assert ruler.string_match_all(" 7481764.", ["7481763"]) == 0.0  # one digit off
    assert ruler.string_match_all(" 748176", ["7481763"]) == 0.0  # cut short
    assert ruler.string_match_all("", ["7481763"]) == 0.0
    assert ruler.string_match_all(" 1111111, 2222222, 3333333", ["1111111", "2222222", "3333333", "4444444"]) == 0.75
    assert ruler.string_match_all(" abcde FGHIJ", ["ABCDE", "fghij"]) == 1.0  # case-insensitive, as RULER
    assert ruler.string_match_all("\x00 7481763\n", ["7481763"]) == 1.0
    assert ruler.string_match_part(" 2222222", ["1111111", "2222222"]) == 1.0
    assert ruler.string_match_part(" 2222223", ["1111111", "2222222"]) == 0.0


def test_sample_score_is_the_ruler_score(tiny_lab):
    sample = ruler.make_sample(tiny_lab, "variable_tracking", 1024, 1)
    assert sample.score(" " + " ".join(sample.answers)) == 1.0
    assert sample.score(" " + " ".join(sample.answers[:-1])) == pytest.approx(0.8)
    assert sample.score(" " + " ".join(a[:-1] for a in sample.answers)) == 0.0


def test_bad_requests_are_refused(tiny_lab):
    with pytest.raises(ruler.RulerError, match="Unknown RULER task"):
        ruler.make_sample(tiny_lab, "niah_triple", 1024, 0)
    with pytest.raises(ruler.RulerError, match="longer length"):
        ruler.make_sample(tiny_lab, "common_words", 256, 0)
    with pytest.raises(ruler.RulerError, match="n must be"):
        ruler.make_samples(tiny_lab, "niah_single", 1024, 0)
