"""Where a model's layers live when it is sharded over the devices of one host (accelerate's `device_map`).

A model larger than one GPU is split by layers (pipeline placement, as transformers' `device_map="auto"` does):
each decoder layer sits whole on one device, the hidden state `[batch, pos, d_model]` moves to the next layer's
device between layers, and each layer's KV cache lives beside its weights. This module has the facts about such a
placement and nothing else:
- `check_device_map`: a `device_map` a user gave, refused before loading when it names a device this machine lacks
  or offloads to "disk"/"meta" (headlab runs every layer where its weights are);
- `dispatch`: accelerate's `dispatch_model` on a loaded model, so every `device_map` load (even one on a single
  device, which transformers leaves undispatched) carries `hf_device_map` and accelerate's hooks;
- `layer_devices`: the device of each decoder layer of a (dispatched or plain) transformers model;
- `balanced_device_map`: an even layer split over N devices, built from module names alone (works on a meta model);
- `by_device` / `ideal_kv_bytes_by_device`: per-layer quantities summed per device.

Decoder layers are found the way accelerate finds the blocks it never splits: modules whose class is in the
model's `_no_split_modules`, in module order.
"""
from __future__ import annotations

import json

import torch
from torch import nn

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' own strategies
OFFLOAD_TARGETS = ("disk", "meta")
BRIDGE = "_original_component"  # where a TransformerLens bridge wrapper keeps the module it wraps
FIX = ("spread the model over more GPUs (device_map=\"auto\" uses every visible GPU), load it in bfloat16 "
       "(dtype=\"bfloat16\"), or pick a smaller model")


def parse_device_map(text: str | None):
    """A `--device-map` flag: a strategy name ("auto", "balanced", ...), a device ("cuda:1") or a JSON object
    `{"module name": device}`; None stays None."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if not text.startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--device-map: {text!r} is not a JSON object ({err.msg}); write e.g. "
                         '\'{"model.embed_tokens": 0, "model.layers": 0, "model.norm": 1, "lm_head": 1}\'.') from None
    if not isinstance(value, dict):
        raise ValueError("--device-map must be a strategy (auto, balanced, ...), a device or a JSON object.")
    return value


def _as_device(value, where: str) -> torch.device:
    """A device_map value (an int = a CUDA index, "cpu", "cuda:1", a torch.device) as a torch.device that exists."""
    if isinstance(value, str) and value.strip().lower() in OFFLOAD_TARGETS:
        raise ValueError(f"device_map puts {where} on {value!r}: headlab runs every layer on the device that holds its "
                         f"weights and does not offload to disk or meta; {FIX}.")
    try:
        device = torch.device("cuda", value) if isinstance(value, int) and not isinstance(value, bool) else torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map puts {where} on {value!r}, which is not a device: write 'cpu', 'cuda:0', ... "
                         "or a CUDA index.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device_map puts {where} on {value!r}, but this machine has no CUDA device: use 'cpu', "
                             "or run where the GPUs are.")
        if (device.index or 0) >= count:
            raise ValueError(f"device_map puts {where} on {value!r}, but this machine has {count} CUDA device(s) "
                             f"(cuda:0 .. cuda:{count - 1}): name one of those.")
    elif device.type != "cpu":
        raise ValueError(f"device_map puts {where} on {value!r}: headlab shards over CUDA GPUs (or the CPU) only.")
    return device


def check_device_map(device_map):
    """Return `device_map` when every device it names exists and nothing is offloaded; else ValueError saying what to
    change. A map mixing the CPU with GPUs is refused too: accelerate would offload the CPU part (weights moved in per
    call), which the runtime, reading weights directly, cannot run."""
    if device_map is None or (isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES):
        return device_map
    if not isinstance(device_map, dict):
        _as_device(device_map, "the whole model")
        return device_map
    if not device_map:
        raise ValueError("device_map is an empty dict: name a device for each module, or pass 'auto'.")
    devices = {str(_as_device(value, repr(name))) for name, value in device_map.items()}
    if "cpu" in devices and len(devices) > 1:
        raise ValueError(f"device_map mixes the CPU with GPUs ({', '.join(sorted(devices))}): accelerate would offload "
                         f"the CPU part, which headlab does not run; put every module on a GPU ({FIX}).")
    return device_map


def check_dispatched(hf_model: nn.Module) -> None:
    """After loading: ValueError when accelerate offloaded part of the model (a strategy such as "auto" does so when
    the GPUs are too small), naming the modules it left on the CPU or disk."""
    mapped = getattr(hf_model, "hf_device_map", None) or {}
    values = {str(v) if not isinstance(v, int) else f"cuda:{v}" for v in mapped.values()}
    offloaded = sorted(name for name, v in mapped.items() if str(v) in ("cpu", *OFFLOAD_TARGETS))
    if offloaded and (values - {"cpu"}):
        raise ValueError(f"The model does not fit the GPUs: accelerate offloaded {len(offloaded)} module(s) "
                         f"({', '.join(offloaded[:4])}{', ...' if len(offloaded) > 4 else ''}) to the CPU or disk, which "
                         f"headlab does not run; {FIX}.")


def dispatch(hf_model: nn.Module, device_map) -> nn.Module:
    """Make sure `hf_model`, loaded with `device_map`, is dispatched (`hf_device_map` set, accelerate's hooks on its
    blocks): transformers dispatches only maps naming several devices, so a map on one device is dispatched here with
    `force_hooks` and every `device_map` load runs the same code path."""
    if getattr(hf_model, "hf_device_map", None):
        return hf_model
    from accelerate import dispatch_model

    if not isinstance(device_map, dict):  # a strategy that landed on one device: everything where it is
        device_map = {"": input_device(hf_model)}
    return dispatch_model(hf_model, device_map=device_map, force_hooks=True)


def input_device(hf_model: nn.Module) -> torch.device:
    """Where input tokens go: the input embedding's device (the first parameter's for a model without one)."""
    embed = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    return next((embed if embed is not None else hf_model).parameters()).device


def decoder_layers(hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of every decoder layer, in order: modules whose class is in `_no_split_modules` (accelerate's
    notion of a block). A TransformerLens bridge's wrappers are skipped (the original module is found inside)."""
    classes = set(getattr(hf_model, "_no_split_modules", None) or ())
    if not classes:
        raise ValueError(f"{type(hf_model).__name__} does not name its decoder-layer class (_no_split_modules): "
                         "headlab cannot tell where its layers are.")
    return [(name.replace(f".{BRIDGE}", ""), module) for name, module in hf_model.named_modules()
            if type(module).__name__ in classes]


def module_device(module: nn.Module) -> torch.device:
    """Where `module` runs: its accelerate hook's execution device when dispatched, else its first parameter's."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device


def layer_devices(hf_model: nn.Module) -> list[torch.device]:
    """The device of each decoder layer `[n_layers]` of a transformers model (all the same when not sharded)."""
    return [module_device(module) for _, module in decoder_layers(hf_model)]


def by_device(devices: list, values: list[int]) -> dict[str, int]:
    """Per-layer `values` summed per device: `{str(device): total}` in first-use order."""
    totals: dict[str, int] = {}
    for device, value in zip(devices, values, strict=True):
        totals[str(device)] = totals.get(str(device), 0) + int(value)
    return totals


def layers_by_device(devices: list) -> dict[str, list[int]]:
    """`{str(device): [layer indices]}`: which layers each device holds."""
    out: dict[str, list[int]] = {}
    for layer, device in enumerate(devices):
        out.setdefault(str(device), []).append(layer)
    return out


def ideal_kv_bytes_by_device(mask, devices: list, context_len: int, dtype_bytes: int, d_head: int,
                             batch: int = 1) -> dict[str, int]:
    """`HeadMask.ideal_kv_bytes` of the layers each device holds (`devices` `[n_layers]`), per device."""
    from headlab.masks import HeadMask

    per_layer = [HeadMask(mask.model, 1, mask.n_heads, mask.n_kv_heads, mask.full[layer:layer + 1], mask.sink,
                          mask.recent).ideal_kv_bytes(context_len, dtype_bytes, d_head, batch)
                 for layer in range(mask.n_layers)]
    return by_device(devices, per_layer)


def balanced_device_map(hf_model: nn.Module, devices: list) -> dict[str, str]:
    """An even layer split over `devices`: layer l on `devices[l * N // n_layers]`, the input embedding (and anything
    tied to it, and parameter-free modules such as the rotary embedding) on the first, every other module outside the
    layers (final norm, lm_head) on the last. Works on a model built on the meta device (names and ties only).

    Deviation from accelerate's `infer_auto_device_map` / transformers' "balanced": those fill devices by byte budgets
    (`max_memory`) of devices that must exist, and may give devices unequal layer counts; this split gives each device
    the same number of layers (a decode step's time on a device is proportional to its layers) and can be built for
    devices this machine lacks (planning a run, CPU tests). A tied lm_head stays with the embedding: accelerate places
    a tied parameter once, and TransformerLens refuses a map that splits a tie."""
    devices = [f"cuda:{d}" if isinstance(d, int) else str(torch.device(d)) for d in devices]  # need not exist here
    if not devices:
        raise ValueError("balanced_device_map needs at least one device.")
    layers = decoder_layers(hf_model)
    index = {name: i for i, (name, _) in enumerate(layers)}
    embed = hf_model.get_input_embeddings()
    tied = {id(p) for p in embed.parameters()}
    out: dict[str, str] = {}

    def place(prefix: str, module: nn.Module) -> None:
        from headlab.runtime.weights import unwrap  # names as transformers knows them, through bridge wrappers

        for name, child in unwrap(module).named_children():
            full = f"{prefix}{name}"
            if full in index:
                out[full] = devices[index[full] * len(devices) // len(layers)]
            elif any(layer.startswith(full + ".") for layer in index):
                place(full + ".", child)
            else:
                params = list(child.parameters())
                first = not params or any(id(p) in tied for p in params)
                out[full] = devices[0] if first else devices[-1]

    place("", hf_model)
    return out
