"""Multiple-choice questions in the A/B/C/D format, as prompts that know where every option sits.

    Which of these is a fruit?
    A. hammer
    B. banana
    C. France
    D. red
    Answer with the letter of the correct option.      (chat template, or plain text ending "Answer:")

Two sources:
- `synthetic_questions(n, seed)`: generated offline from word categories the model plainly knows
  (fruits, animals, colours, countries, tools, ...): one word of the asked category and distractors
  from other categories. Categories cycle and the correct position is balanced (each letter is the
  answer `n / n_options` times, up to one), then shuffled; everything is seeded.
- `load_questions(path)`: a user's JSONL or CSV file with `question`, the options (a list field
  `options`, or fields/columns `A`, `B`, `C`, `D`, ...) and `answer` (a letter, or a 0-based index).
  Bad rows raise `MCQAFormatError` naming the line and the field.

`build_prompts(lab, questions, chat=...)` renders each question (chat template or plain text; the
prompt records which), tokenizes it with offsets and finds, for every option, the token position of
its label letter and of the option's last token; the final prompt token is the query the
select-and-copy scores read from. `letter_logits` gives the model's own answer: its next-token
logits restricted to the option letters.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headlab.lab import Lab

LETTERS = "ABCDEFGHIJ"
MAX_OPTIONS = len(LETTERS)
INSTRUCTION = "Answer with the letter of the correct option."
PLAIN_CUE = "Answer:"

# One-token-ish common words; categories are mutually exclusive so every question has one answer.
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fruit": ("Which of these is a fruit?", (
        "apple", "banana", "orange", "grape", "lemon", "cherry", "peach", "pear", "mango", "plum", "strawberry", "pineapple",
    )),
    "animal": ("Which of these is an animal?", (
        "dog", "cat", "horse", "lion", "tiger", "elephant", "rabbit", "monkey", "bear", "wolf", "cow", "sheep",
    )),
    "colour": ("Which of these is a colour?", (
        "red", "blue", "green", "yellow", "purple", "black", "white", "pink", "brown", "grey",
    )),
    "country": ("Which of these is a country?", (
        "France", "Germany", "Japan", "Brazil", "Canada", "Italy", "Spain", "India", "China", "Mexico", "Egypt", "Norway",
    )),
    "tool": ("Which of these is a tool?", (
        "hammer", "screwdriver", "saw", "wrench", "drill", "shovel", "axe", "pliers", "chisel", "rake",
    )),
    "vehicle": ("Which of these is a vehicle?", (
        "car", "bus", "truck", "bicycle", "train", "airplane", "boat", "motorcycle", "tractor", "helicopter",
    )),
    "body_part": ("Which of these is a part of the body?", (
        "hand", "foot", "nose", "ear", "elbow", "knee", "shoulder", "finger", "mouth", "eye",
    )),
    "number": ("Which of these is a number?", (
        "seven", "three", "twelve", "five", "nine", "twenty", "eight", "four", "eleven", "six",
    )),
}
DEFAULT_CATEGORIES = tuple(CATEGORIES)


class MCQAFormatError(ValueError):
    """A multiple-choice file or question is malformed; the message names the line and the field."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: `answer` is the 0-based index of the correct option."""

    question: str
    options: tuple[str, ...]
    answer: int
    category: str = ""

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


@dataclass
class Prompt:
    """A rendered, tokenized question.

    Attributes:
        tokens: `[pos]` token ids (CPU), BOS first where the model has one.
        label_positions: per option, the position of its label letter token ("A" of "A. banana").
        last_positions: per option, the position of the option text's last token.
        chat: whether the chat template was used (else plain text ending with "Answer:").
    """

    question: Question
    text: str
    tokens: torch.Tensor
    label_positions: list[int]
    last_positions: list[int]
    chat: bool
    meta: dict = field(default_factory=dict)

    @property
    def n_options(self) -> int:
        return len(self.question.options)

    @property
    def query_position(self) -> int:
        """The final prompt token: the query whose scores pick the answer."""
        return len(self.tokens) - 1


# --- questions ---------------------------------------------------------------------------------


def check_question(question: Question, where: str = "question") -> Question:
    """Raise `MCQAFormatError` (prefixed by `where`) unless `question` is well formed."""
    if not isinstance(question.question, str) or not question.question.strip():
        raise MCQAFormatError(f"{where}: field 'question' is empty.")
    n = len(question.options)
    if not 2 <= n <= MAX_OPTIONS:
        raise MCQAFormatError(f"{where}: field 'options' has {n} options; a question needs 2 to {MAX_OPTIONS}.")
    for i, option in enumerate(question.options):
        if not isinstance(option, str) or not option.strip():
            raise MCQAFormatError(f"{where}: option {LETTERS[i]} is empty.")
        if "\n" in option:
            raise MCQAFormatError(f"{where}: option {LETTERS[i]} contains a line break; each option must be one line.")
    if not 0 <= question.answer < n:
        raise MCQAFormatError(f"{where}: field 'answer' points at option {question.answer} but there are {n} options.")
    return question


def synthetic_questions(n: int, seed: int = 0, categories: tuple[str, ...] | list[str] | None = None,
                        n_options: int = 4) -> list[Question]:
    """`n` category questions ("Which of these is a fruit?"), seeded, answer positions balanced.

    Each question asks for one of `categories` (cycled in a shuffled order) and draws its
    distractors from `n_options - 1` other categories of all the known ones.
    """
    categories = list(categories or DEFAULT_CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise KeyError(f"Unknown question categories {unknown}. Known: {', '.join(CATEGORIES)}.")
    if not 2 <= n_options <= min(MAX_OPTIONS, len(CATEGORIES)):
        raise ValueError(f"n_options must be from 2 to {min(MAX_OPTIONS, len(CATEGORIES))}, got {n_options}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    rng = random.Random(f"mcqa/{seed}")
    answers = [i % n_options for i in range(n)]
    rng.shuffle(answers)
    asked = [categories[i % len(categories)] for i in range(n)]
    rng.shuffle(asked)
    questions = []
    for category, answer in zip(asked, answers):
        text, words = CATEGORIES[category]
        others = rng.sample([c for c in CATEGORIES if c != category], n_options - 1)
        options = [rng.choice(CATEGORIES[c][1]) for c in others]
        options.insert(answer, rng.choice(words))
        questions.append(Question(text, tuple(options), answer, category))
    return questions


def _parse_answer(value, n_options: int, where: str) -> int:
    """A letter ('B', 'b', ' B ') or a 0-based index (1, '1') -> index."""
    if isinstance(value, bool) or value is None:
        raise MCQAFormatError(f"{where}: field 'answer' is missing; give a letter (A-{LETTERS[n_options - 1]}) or a 0-based index.")
    if isinstance(value, int):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str) and value.strip().upper() in LETTERS[:n_options] and len(value.strip()) == 1:
        index = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    else:
        raise MCQAFormatError(
            f"{where}: field 'answer' is {value!r}; give a letter (A-{LETTERS[n_options - 1]}) or a 0-based index (0-{n_options - 1})."
        )
    if not 0 <= index < n_options:
        raise MCQAFormatError(f"{where}: field 'answer' is {value!r}, outside the {n_options} options (0-{n_options - 1} or A-{LETTERS[n_options - 1]}).")
    return index


def question_from_record(record: dict, where: str) -> Question:
    """One question from a dict with `question`, `options` (list) or `A`, `B`, ... fields, and `answer`."""
    if not isinstance(record, dict):
        raise MCQAFormatError(f"{where}: expected an object with fields question, options, answer; got {type(record).__name__}.")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise MCQAFormatError(f"{where}: field 'question' is missing or empty.")
    options = record.get("options")
    if options not in (None, ""):
        if isinstance(options, str):  # a CSV cell holding a JSON list
            try:
                options = json.loads(options)
            except json.JSONDecodeError:
                raise MCQAFormatError(f"{where}: field 'options' is not a list (write a JSON list, or use columns A, B, C, D).") from None
        if not isinstance(options, list):
            raise MCQAFormatError(f"{where}: field 'options' must be a list of strings, got {type(options).__name__}.")
        if not all(isinstance(o, (str, int, float)) for o in options):
            raise MCQAFormatError(f"{where}: field 'options' must hold strings.")
        options = [str(o) for o in options]
    else:
        options = []
        for letter in LETTERS:
            value = record.get(letter, record.get(letter.lower()))
            if value is None or (isinstance(value, str) and not value.strip()):
                break
            options.append(str(value))
        if not options:
            raise MCQAFormatError(f"{where}: no options: give field 'options' (a list) or fields 'A', 'B', 'C', 'D'.")
    if not 2 <= len(options) <= MAX_OPTIONS:
        raise MCQAFormatError(f"{where}: field 'options' has {len(options)} options; a question needs 2 to {MAX_OPTIONS}.")
    answer = _parse_answer(record.get("answer"), len(options), where)
    return check_question(Question(question.strip(), tuple(o.strip() for o in options), answer, str(record.get("category", ""))), where)


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a `.jsonl` (one JSON object a line) or `.csv` (header row) file.

    Raises `FileNotFoundError` for a missing file and `MCQAFormatError` naming the line and field
    of the first bad row (CSV line numbers count the header as line 1).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No multiple-choice file at {path}.")
    suffix = path.suffix.lower()
    questions = []
    if suffix in (".jsonl", ".ndjson", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MCQAFormatError(f"{path.name} line {number}: not valid JSON ({err.msg}).") from None
            questions.append(question_from_record(record, f"{path.name} line {number}"))
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            fields = set(reader.fieldnames or [])
            if "question" not in fields or "answer" not in fields or not ({"options", "A"} & fields or "a" in fields):
                raise MCQAFormatError(
                    f"{path.name} line 1: the header must name the columns question, answer and either options or A, B, C, D; "
                    f"got {sorted(fields)}."
                )
            for record in reader:
                questions.append(question_from_record(record, f"{path.name} line {reader.line_num}"))
    else:
        raise MCQAFormatError(f"{path.name}: unknown file type '{suffix}'; use .jsonl or .csv.")
    if not questions:
        raise MCQAFormatError(f"{path.name}: the file holds no questions.")
    return questions


# --- prompts -----------------------------------------------------------------------------------


def question_text(question: Question) -> str:
    """The question and its labelled options, one per line."""
    lines = [question.question] + [f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options)]
    return "\n".join(lines)


def render(lab: Lab, question: Question, chat: bool = True) -> str:
    """The full prompt text: the chat template around question + instruction, or plain text ending with 'Answer:'."""
    if chat and getattr(lab.tokenizer, "chat_template", None):
        return lab.chat(question_text(question) + "\n" + INSTRUCTION)
    return "Question: " + question_text(question) + "\n" + PLAIN_CUE


def _token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """The index of the token whose character span holds `char`."""
    for index, (start, end) in enumerate(offsets):
        if start <= char < end:
            return index
    raise ValueError(f"No token covers character {char} of the prompt.")


def build_prompt(lab: Lab, question: Question, chat: bool = True) -> Prompt:
    """Render and tokenize `question`, locating each option's label letter and last token."""
    check_question(question)
    text = render(lab, question, chat)
    used_chat = chat and bool(getattr(lab.tokenizer, "chat_template", None))
    encoded = lab.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    bos = lab.bos_token_id
    if bos is not None and not (ids and ids[0] == bos):
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    lab.check_length(len(ids), "multiple-choice prompt")
    block = question_text(question)
    base = text.index(block)
    labels, lasts = [], []
    cursor = base + len(question.question)
    for i, option in enumerate(question.options):
        line = f"\n{LETTERS[i]}. {option}"
        start = text.index(line, cursor)
        label_char = start + 1
        last_char = start + len(line) - 1
        labels.append(_token_at(offsets, label_char))
        lasts.append(_token_at(offsets, last_char))
        cursor = start + len(line)
    return Prompt(question, text, torch.tensor(ids), labels, lasts, used_chat)


def build_prompts(lab: Lab, questions: list[Question], chat: bool = True) -> list[Prompt]:
    return [build_prompt(lab, q, chat) for q in questions]


def letter_token_ids(lab: Lab, n_options: int = 4) -> torch.Tensor:
    """`[n_options, 2]` ids of each letter alone ('A') and with a leading space (' A') — the model's
    answer after 'assistant\\n' is 'A', after 'Answer:' it is ' A'. Letters that are not one token
    in a form fall back to the first token of that form."""
    rows = []
    for letter in LETTERS[:n_options]:
        forms = [lab.tokenizer(form, add_special_tokens=False)["input_ids"] for form in (letter, " " + letter)]
        rows.append([form[0] for form in forms])
    return torch.tensor(rows)


def answer_letter_scores(final_logits: torch.Tensor, letter_ids: torch.Tensor, n_options: list[int]) -> torch.Tensor:
    """`[n, max_options]` per prompt: each letter's logit (the larger of 'A' and ' A'); -inf past a prompt's options.

    Args:
        final_logits: `[n, d_vocab]` next-token logits at the final prompt token.
        letter_ids: `[max_options, forms]` from `letter_token_ids`.
    """
    scores = final_logits[:, letter_ids].amax(-1)  # [n, max_options]
    for row, count in enumerate(n_options):
        scores[row, count:] = float("-inf")
    return scores


def length_groups(prompts: list[Prompt], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of equal token length (no padding needed)."""
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt.tokens), []).append(index)
    return [group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]


@torch.no_grad()
def final_logits(lab: Lab, prompts: list[Prompt], hooks=None, batch_size: int = 8) -> torch.Tensor:
    """`[n, d_vocab]` next-token logits at each prompt's final token, with forward `hooks` active."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    with lab.model.hooks(fwd_hooks=hooks or []):
        for batch in length_groups(prompts, batch_size):
            tokens = torch.stack([prompts[i].tokens for i in batch]).to(lab.device)
            # The HF model the bridge wraps, keeping only the last position's logits; the bridge's hooks fire on it.
            logits = lab.hf_model(tokens, logits_to_keep=1).logits[:, -1].float().cpu()
            for row, index in enumerate(batch):
                out[index] = logits[row]
    return torch.stack(out)


def letter_logits(lab: Lab, prompts: list[Prompt], hooks=None, batch_size: int = 8) -> torch.Tensor:
    """`[n, max_options]`: the model's logit for each option letter (-inf past a prompt's options)."""
    most = max(p.n_options for p in prompts)
    return answer_letter_scores(final_logits(lab, prompts, hooks, batch_size), letter_token_ids(lab, most),
                                [p.n_options for p in prompts])


def answers_of(prompts: list[Prompt]) -> torch.Tensor:
    return torch.tensor([p.question.answer for p in prompts])


def questions_for(dataset: str | None, n: int, seed: int, categories=None) -> list[Question]:
    """The synthetic set (`dataset` None or 'synthetic') or the first `n` questions of a user file (all when n <= 0)."""
    if dataset in (None, "", "synthetic"):
        return synthetic_questions(n, seed, categories)
    questions = load_questions(dataset)
    return questions[:n] if n and n > 0 else questions
