"""`duo`: DuoAttention's own optimisation of which KV heads stay full (Xiao et al. 2024, "DuoAttention:
Efficient Long-Context LLM Inference with Retrieval and Streaming Heads"; mit-han-lab/duo-attention).

A gate alpha per KV head mixes its heads' attention as `(1 - alpha) * streaming + alpha * full`
(`duo_gates`); the gates, initialised at 1, are trained by AdamW (no weight decay) to keep the final
hidden states on the answers of synthetic multi-passkey prompts (`duo_passkeys`) close to the full
model's, plus an L1 push of the gates towards 0 (streaming); they are clamped to [0, 1] before every
step. The mask keeps the top-k gates full (the budget's quantile), or, with `full_fraction=None`,
DuoAttention's own cut (gate >= 0.5).

What carries over from the reference (`scripts/train.sh`, `duo_attn/train.py`): lr 0.02, reg_weight
0.05, initial gates 1.0, batch 1, AdamW with weight decay 0, the learning-rate schedule (linear warm-up
over the first fifth of the steps from 0.1x, linear decay over the last fifth down to 0.1x), passkeys
of NATO-alphabet words in a book-like haystack, needle depths in [0.05, 0.95], 50 context lengths
spread over the range. What is scaled down so the embedded model trains on this 2-core CPU in minutes:
the reference runs 2000 steps on 1k-32k-token prompts with 10 passkeys of 32 words on 8 GPUs; the
defaults here are 48 steps on 640-1024-token prompts with 3 passkeys of 8 words (the window is the
mask's, 64 + 256 by default, so most of each prompt is out of a streaming head's reach); with the
reference's learning rate a gate can travel about 0.8 in 48 steps, enough to order the heads. For a larger
model on a GPU, raise them towards the reference's (e.g. steps=2000, context_max=32000,
num_passkeys=10, passkey_words=32), within what `check` says fits in memory.

The trained gates are a stored run (`headlab.store`, record `duo_gates`, keyed by the model and every
parameter, the window included), so the second mask at any budget is instant.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from headlab import store
from headlab.lab import Lab, free_bytes
from headlab.longpass import CHUNK_TOKENS
from headlab.mask_sources import MaskSource, budget_of
from headlab.mask_sources import duo_gates, duo_passkeys
from headlab.masks import HeadMask, MaskConfig, duo_full
from headlab.runtime.weights import model_modules

FORMAT = "headlab.duo_gates/v1"


@dataclass
class DuoGates:
    """Trained DuoAttention gates: `gates` `[n_layers, n_kv_heads]` in [0, 1]; `history` the per-step losses."""

    model: str
    params: dict
    gates: torch.Tensor
    history: dict
    seconds: float
    device: str = "cpu"

    def save(self, path: Path | str) -> Path:
        store.write_record(Path(path), {
            "format": FORMAT, "record": "duo_gates", "kind": "duo", "model": self.model, "params": self.params,
            "gates": self.gates.tolist(), "history": self.history, "seconds": self.seconds, "device": self.device})
        return Path(path)

    @classmethod
    def load(cls, path: Path | str) -> "DuoGates":
        record = store.read_record(path, FORMAT, "DuoAttention gates")
        return cls(model=record["model"], params=record["params"], gates=torch.tensor(record["gates"], dtype=torch.float32),
                   history=record["history"], seconds=record["seconds"], device=record.get("device", "cpu"))


@dataclass(frozen=True)
class Duo(MaskSource):
    """DuoAttention's trained gates, binarised at the budget (top-k gates full).

    Cost: `steps` training steps, each a full forward pass (no gradients), a gated forward and its backward
    (gradients for the gates only): about 3 forward passes of a `context_min`..`context_max`-token prompt,
    so time grows with steps x mean length x model size (plus length^2 attention). Memory (`step_bytes`, `plan`):
    plain, the gated pass's activations, about `(8 d_model + 4 heads*d_head + 2 kv_heads*d_head + 3 d_mlp) x bytes`
    per token and layer, plus a `[length, length]` boolean mask. Where that does not fit, the step is streamed
    (`duo_gates.streamed_step`: the same loss and gradients, one more forward pass): the teacher is prefilled in
    chunks against its KV cache, and the student runs layer by layer and window by window, so the device holds the
    larger of the KV cache and six `[length, d_model]` tensors, plus one window's activations; each layer's input and
    the teacher's attention output, `length x n_layers x (d_model + heads*d_head) x bytes`, go to host memory (to
    the device where the host has no room). `check` refuses a `context_max` that does not fit even so.
    Measured: on an H100 (Llama-3.1-8B shape, 2026-12-06, plain) 8k-token prompts took 39.9 GiB (estimate 46) and
    ~5 s a step; on the CPU (embedded model, 2 steps, `analyses/scoring_scale.py cpu`) plain 2.59 / 6.76 / 16.57 GiB
    at 2k / 4k / 8k tokens (estimates 3.0 / 6.6 / 15.5 with the CPU's attention-backward buffers, which grow with the
    square of the length), 14 / 182 / 381 s.
    For the 8B shape, streamed (estimates; the GPU runs are in `analyses/README.md`): at 32k 5.9 GiB on the device
    (the KV cache is 4.0), 16 GiB in host memory; at 128k 18.4 GiB on the device (KV cache 16), 64 GiB in host memory.
    The embedded model at the defaults on the 2-core CPU (2026-12-06): 5.8 s per step idle (48 steps ~ 4.6 min),
    13.3 s per step (639 s in all) while the test suite shared the cores, 40-120 s while 8-12 other processes ran.
    Stored: a second call is instant.
    """

    name = "duo"
    own_cut = True
    steps: int = 48
    lr: float = 0.02
    reg_weight: float = 0.05
    init_value: float = 1.0
    context_min: int = 640
    context_max: int = 1024
    num_passkeys: int = 3
    passkey_words: int = 8
    seed: int = MaskConfig.seed

    def __post_init__(self):
        from headlab import validate

        for field in ("steps", "context_min", "context_max", "num_passkeys", "passkey_words"):
            validate.count(getattr(self, field), f"Mask source 'duo': {field}")
        if self.context_min > self.context_max:
            raise ValueError(f"Mask source 'duo': context_min ({self.context_min}) is above context_max ({self.context_max}).")
        if not (self.lr > 0 and self.reg_weight >= 0 and 0.0 <= self.init_value <= 1.0):
            raise ValueError(f"Mask source 'duo' needs lr > 0, reg_weight >= 0 and init_value in [0, 1]; got lr={self.lr}, "
                             f"reg_weight={self.reg_weight}, init_value={self.init_value}.")

    def check(self, lab: Lab, config: MaskConfig) -> None:
        super().check(lab, config)
        lab.check_length(self.context_max, "duo training prompt (context_max)")
        if self.context_min <= config.sink + config.recent:
            raise ValueError(f"Mask source 'duo': context_min ({self.context_min}) must exceed sink + recent "
                             f"({config.sink} + {config.recent}); shorter prompts never reach past a streaming head's window, "
                             f"so the gates would learn nothing.")
        needed = duo_passkeys.PasskeyPrompts(lab, self.num_passkeys, self.passkey_words).most_overhead()
        if needed >= self.context_min:
            raise ValueError(f"Mask source 'duo': {self.num_passkeys} passkeys of {self.passkey_words} words take up to "
                             f"{needed} tokens, no room left in context_min={self.context_min}: lower num_passkeys or "
                             f"passkey_words, or raise context_min.")
        check_memory(lab, self.context_max)

    def run_path(self, lab: Lab, config: MaskConfig) -> Path:
        """Where the gates of this training run of `lab` are stored."""
        return store.run_path(lab.info.slug, "duo_gates", {**self.params(), "sink": config.sink, "recent": config.recent})

    def gates(self, lab: Lab, config: MaskConfig, *, recompute: bool = False) -> DuoGates:
        """The trained gates for `config`'s window: read from the store, else trained (with a progress bar) and stored."""
        self.check(lab, config)
        return self._stored_or_trained(lab, config, recompute)

    def _stored_or_trained(self, lab: Lab, config: MaskConfig, recompute: bool = False) -> DuoGates:
        return store.cached_run(self.run_path(lab, config), DuoGates.load, lambda: train(lab, self, config.sink, config.recent),
                                recompute=recompute)

    def make(self, lab: Lab, config: MaskConfig) -> HeadMask:
        trained = self._stored_or_trained(lab, config)
        extra = {"seconds": trained.seconds, "history": {k: v[-1:] for k, v in trained.history.items()}}
        full_fraction, threshold = budget_of(config, self.name, self.own_cut)
        if full_fraction is None and threshold is None:
            full = duo_full(trained.gates)
            return HeadMask.for_model(lab.info, full, config.sink, config.recent, self.record(
                budget={"threshold": 0.5, "n_full": int(full.sum()), "own_cut": True}, values=trained.gates.tolist(), **extra))
        return self.from_values(lab, trained.gates, config, **extra)


def check_model(m) -> None:
    """Refuse what the gated run does not model: sliding-window layers (their heads stream already) and logit soft-capping."""
    if any(m.sliding_windows) or any(layer.softcap for layer in m.layers):
        raise ValueError(f"Mask source 'duo' trains gates on full-attention layers without logit soft-capping; "
                         f"{m.name} has sliding-window layers or soft-capping.")


def step_bytes(m, length: int, chunk: int | None = None) -> tuple[int, int]:
    """`(device, kept)` bytes of a training step on a `length`-token prompt (see `Duo`'s cost). `chunk` None: the plain
    autograd pass, every layer's activations (`kept` 0). Else `duo_gates.streamed_step` with `chunk`-token windows:
    on the device the larger of the teacher's prefill (its KV cache when chunked, its output, a chunk's activations)
    and the student's passes (six `[pos, d_model]` tensors, a few windows' activations); `kept` is each layer's input
    and the teacher's attention outputs, wherever `Plan.store` puts them."""
    d_model, d_mlp, size = m.embed.weight.shape[1], m.layers[0].down.in_features, m.embed.weight.element_size()
    layer = 8 * d_model + (4 * m.n_heads + 2 * m.n_kv_heads) * m.d_head + 3 * d_mlp  # one layer's, per token
    if chunk is None:  # on the CPU the attention backward also holds two float32 [heads, length, length] buffers
        cpu = 2 * m.n_heads * length * length * 4 if m.device.type == "cpu" else 0
        return length * layer * m.n_layers * size + length * length + cpu, 0
    window = min(length, 2 * chunk)
    kv = 2 * m.n_layers * m.n_kv_heads * m.d_head * length * size if length > chunk else 0
    teacher = kv + length * d_model * size + 2 * min(length, chunk) * layer * size  # its prefill: cache, output, a chunk
    student = 6 * length * d_model * size + 3 * window * layer * size + window * window  # its layer-by-layer passes
    return max(teacher, student), length * m.n_layers * (d_model + m.n_heads * m.d_head) * size


def plan(m, length: int) -> duo_gates.Plan:
    """How a `length`-token step runs within 80% of free memory: plain if it fits; else streamed, the kept tensors in
    host memory (a GPU's memory is the scarce one: the device then holds about the teacher's KV cache and a few GiB),
    or on the device where the host has no room; a MemoryError naming the shortfall when none fits."""
    room = 0.8 * free_bytes(m.device)
    if step_bytes(m, length)[0] <= room:
        return duo_gates.Plan()
    chunk = CHUNK_TOKENS.get(m.device.type, CHUNK_TOKENS["cpu"])
    device, kept = step_bytes(m, length, chunk)
    host = 0.8 * free_bytes("cpu") if m.device.type != "cpu" else 0
    if device <= room and kept <= host:
        return duo_gates.Plan(streamed=True, chunk=chunk, store="cpu")
    if device + kept <= room:
        return duo_gates.Plan(streamed=True, chunk=chunk, store=str(m.device))
    raise MemoryError(f"Mask source 'duo': training on {length}-token prompts needs about {device / 2**30:.1f} GiB on "
                      f"{m.device} ({room / 0.8 / 2**30:.1f} GiB free) and {kept / 2**30:.1f} GiB for the layers' inputs "
                      f"(in host memory, {host / 0.8 / 2**30:.1f} GiB free there, or on the device) even streamed layer by "
                      f"layer: lower context_max.")


def check_memory(lab: Lab, length: int) -> None:
    """Refuse a training length that does not fit even streamed (`plan`)."""
    m = model_modules(lab.hf_model)
    check_model(m)
    plan(m, length)


def lr_factor(step: int, steps: int) -> float:
    """The reference's schedule: linear warm-up over the first fifth from 0.1x, linear decay over the last fifth to 0.1x."""
    fifth = max(1, steps // 5)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


def train(lab: Lab, config: Duo, sink: int, recent: int, progress: bool = True) -> DuoGates:
    """Train DuoAttention gates on `lab` for the streaming window `sink` + `recent`; returns them with the per-step losses."""
    started = time.perf_counter()
    m = model_modules(lab.hf_model)
    torch.manual_seed(config.seed)
    gates = torch.full((m.n_layers, m.n_kv_heads), float(config.init_value), device=m.device, requires_grad=True)
    optimizer = torch.optim.AdamW([gates], lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config.steps))
    prompts = duo_passkeys.PasskeyPrompts(lab, config.num_passkeys, config.passkey_words)
    samples = duo_passkeys.sample_stream(prompts, config.context_min, config.context_max, config.seed)
    history: dict[str, list[float]] = {"loss": [], "distill": [], "reg": [], "length": []}
    bar = tqdm(range(config.steps), desc=f"duo gates ({lab.info.name})", disable=not progress)
    with frozen(lab.hf_model):
        for _ in bar:
            with torch.no_grad():
                gates.clamp_(0, 1)
            sample = next(samples)
            optimizer.zero_grad()
            loss, distill, reg = step(m, sample, gates, sink, recent, config.reg_weight, plan(m, sample.tokens.shape[1]))
            optimizer.step()
            schedule.step()
            for key, value in (("loss", loss), ("distill", distill), ("reg", reg)):
                history[key].append(round(value.item(), 6))
            history["length"].append(int(sample.tokens.shape[1]))
            bar.set_postfix(distill=f"{distill.item():.4f}", reg=f"{reg.item():.3f}", length=sample.tokens.shape[1])
    final = gates.detach().clamp(0, 1).float().cpu()
    return DuoGates(model=lab.info.name, params={**config.params(), "sink": sink, "recent": recent}, gates=final,
                    history=history, seconds=round(time.perf_counter() - started, 2), device=str(m.device))


def step_loss(m, sample: duo_passkeys.PasskeySample, gates: torch.Tensor, sink: int, recent: int, reg_weight: float):
    """`(loss, distill, reg)` of the gated model against the full model on one sample (`duo_gates.losses`), plain."""
    tokens, labels = sample.tokens.to(m.device), sample.labels.to(m.device)
    full = duo_gates.teacher(m, tokens, start=min(sink + recent, tokens.shape[1] - 1))
    hidden = duo_gates.student(m, tokens, gates, full, sink, recent)
    return duo_gates.losses(hidden, full, labels, gates, reg_weight)


def step(m, sample: duo_passkeys.PasskeySample, gates: torch.Tensor, sink: int, recent: int, reg_weight: float,
         how: duo_gates.Plan = duo_gates.Plan()):
    """One step's gradient into `gates.grad`, plain (`step_loss` and its backward) or streamed (`how.streamed`);
    returns the detached `(loss, distill, reg)`."""
    if how.streamed:
        return duo_gates.streamed_step(m, sample, gates, sink, recent, reg_weight, how)
    loss, distill, reg = step_loss(m, sample, gates, sink, recent, reg_weight)
    loss.backward()
    return loss.detach(), distill.detach(), reg.detach()


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Within the block no parameter of `module` asks for a gradient (only the gates get one); restored after."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
