"""`Lab`: a loaded model (TransformerBridge + tokenizer) and the facts about it the rest of headlab needs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from headlab import store


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts of a loaded model. `n_kv_heads < n_heads` means grouped-query attention.

    `fingerprint` identifies a model loaded from a local folder (a hash of its resolved path and its files'
    names, sizes and modification times, see `loading.folder_fingerprint`); it is None for the embedded
    models, hub names and `hl.from_model`, which are keyed by their name alone.
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    n_ctx: int
    d_vocab: int
    architecture: str
    fingerprint: str | None = None

    @property
    def slug(self) -> str:
        """File-system name of the model, used for `cached_runs/<slug>/`: the slugified name, followed by
        `-<fingerprint[:10]>` when the model has a fingerprint, so two folders both called `model` never share runs."""
        name = store.slugify(self.name)
        return f"{name}-{self.fingerprint[:10]}" if self.fingerprint else name

    def to_dict(self) -> dict:
        return asdict(self)


class PromptTooLongError(ValueError):
    """A prompt does not fit in the model's context window."""


class DoesNotFitError(ValueError):
    """A request would need more memory than the device has free: refused before any work starts."""


def free_bytes(device: str) -> int:
    """Memory free for new tensors on `device`: CUDA's `mem_get_info` (plus what torch's allocator holds unused),
    on the CPU the available RAM (/proc/meminfo's MemAvailable; elsewhere `psutil`'s, where installed)."""
    if str(device).startswith("cuda"):
        index = torch.device(device).index
        free, _ = torch.cuda.mem_get_info(index)
        return free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux: psutil knows the platform's notion of available memory

    return psutil.virtual_memory().available


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


@dataclass
class Lab:
    """A model ready for head analysis.

    Attributes:
        model: the TransformerLens `TransformerBridge` (hooks: `blocks.{l}.attn.hook_pattern`, ...).
        tokenizer: the Hugging Face tokenizer.
        info: `ModelInfo`.
    """

    model: object
    tokenizer: object
    info: ModelInfo
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    load_seconds: float = field(default=0.0, compare=False)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The underlying transformers model (same weights the bridge runs)."""
        return self.model.original_model

    @property
    def placement(self) -> dict[str, list[int]]:
        """Which decoder layers each device holds, `{"cuda:0": [0, ..., 39], "cuda:1": [40, ...]}` (one entry when the
        model is on one device); `hf_model.hf_device_map` has accelerate's module-level map of a sharded load."""
        from headlab import placement

        return placement.layers_by_device(placement.layer_devices(self.hf_model))

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def check_length(self, n_tokens: int, what: str = "prompt") -> None:
        """Raise `PromptTooLongError` when `n_tokens` exceeds the context window."""
        if n_tokens > self.info.n_ctx:
            raise PromptTooLongError(
                f"The {what} is {n_tokens} tokens, longer than {self.info.name}'s context of "
                f"{self.info.n_ctx} tokens: shorten it (or use fewer/shorter samples)."
            )

    def require_memory(self, nbytes: int, what: str, fix: str) -> None:
        """Raise `DoesNotFitError` when `nbytes` (an estimate of what `what` adds to peak memory) exceeds the device's
        free memory; `fix` says which parameters to lower."""
        free = free_bytes(self.device)
        if nbytes > free:
            raise DoesNotFitError(
                f"{what} needs about {gib(nbytes)} on {self.device} beyond what is in use, but only {gib(free)} is free: "
                f"{fix}, or use a device with more memory."
            )

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        """Tokenize one text. Returns `[1, pos]` on the lab's device, BOS first if the model has one."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if prepend_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        self.check_length(len(ids))
        return torch.tensor([ids], device=self.device)

    def to_str_tokens(self, tokens: torch.Tensor) -> list[str]:
        """`[pos]` or `[1, pos]` token ids to their strings, one per position."""
        return [self.tokenizer.decode([t]) for t in tokens.reshape(-1).tolist()]

    def chat(self, messages: list[dict] | str, add_generation_prompt: bool = True) -> str:
        """Apply the model's chat template. A bare string is one user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not getattr(self.tokenizer, "chat_template", None):
            return "\n".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
