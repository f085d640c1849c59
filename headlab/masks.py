"""`HeadMask`: which KV heads keep their whole cache (full / retrieval) and which stream (sink + recent).

A mask is per KV head, `full` `[n_layers, n_kv_heads]` bool, because KV memory is per KV head.
Scores are per query head; with grouped-query attention query head `h` reads KV head
`h // (n_heads // n_kv_heads)` (the layout Hugging Face's `repeat_kv` gives), so a KV head's score
is the max (or mean) of its group's query-head scores.

Files:
- `headlab.head_mask/v1` JSON (`save` / `load`), written atomically.
- The DuoAttention folder (`save_duo` / `load`): `full_attention_heads.tsv` (n_layers rows of
  n_kv_heads tab-separated floats, 1 = full) and `config.json` with `sink_size`, `recent_size`.
  Import clips the values to [0, 1] and keeps a head full when its value is >= 0.5.
Nothing is ever unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headlab import store, validate
from headlab.scores import Head, HeadScores

FORMAT = "headlab.head_mask/v1"
DUO_TSV = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"
DUO_THRESHOLD = 0.5
GROUP_RULE = "query head h reads KV head h // (n_heads // n_kv_heads)"


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The KV head query head `head` reads (grouped-query attention, Hugging Face layout)."""
    return head // (n_heads // n_kv_heads)


def group_scores(values: torch.Tensor, n_kv_heads: int, group: str = "max") -> torch.Tensor:
    """Query-head scores `[n_layers, n_heads]` -> KV-head scores `[n_layers, n_kv_heads]` (max or mean of each group)."""
    n_layers, n_heads = values.shape
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot be split into {n_kv_heads} KV-head groups.")
    grouped = values.float().reshape(n_layers, n_kv_heads, n_heads // n_kv_heads)
    if group == "max":
        return grouped.amax(-1)
    if group == "mean":
        return grouped.mean(-1)
    raise ValueError(f"group must be 'max' or 'mean', not {group!r}.")


def _check_window(sink: int, recent: int) -> tuple[int, int]:
    return validate.window(sink, recent)


def _n_full(fraction: float, total: int) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"full_fraction must be in [0, 1], not {fraction}.")
    return int(round(fraction * total))


def mask_sources() -> list[str]:
    """The name of every registered mask source (`headlab.mask_sources`), e.g. "retrieval", "duo", "random"."""
    from headlab.mask_sources import source_names

    return source_names()


@dataclass(frozen=True)
class MaskConfig:
    """How `make_mask` builds a mask: the defaults every view (CLI, app, analyses) starts from.

    `source` names a registered mask source (`mask_sources()`); `full_fraction` is the budget, the share of
    KV heads kept full (`round(full_fraction * n_layers * n_kv_heads)` of them, exactly), or `threshold`, a
    minimum value, instead; `full_fraction=None` with no threshold asks for the source's own cut (only the
    DuoAttention sources have one: gates >= 0.5). `sink` and `recent` are what a streaming head keeps
    (DuoAttention's defaults, 64 + 256). `kind` is the score whose top KV heads stay full (`source="score"`)
    and `seed` the draw of a seeded source (`"random"`): the sources that have such a parameter read them here.
    """

    source: str = "score"
    kind: str = "retrieval"
    full_fraction: float | None = 0.5
    threshold: float | None = None
    sink: int = 64
    recent: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        names = mask_sources()
        if self.source not in names:
            raise ValueError(f"Mask source must be one of {', '.join(names)}; got {self.source!r}.")
        if self.full_fraction is not None:
            _n_full(self.full_fraction, 1)
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite score, not {self.threshold}.")
        _check_window(self.sink, self.recent)

    def n_full(self, total: int) -> int | None:
        """How many of `total` KV heads the budget keeps full (None when a threshold or the source's own cut decides)."""
        return None if self.threshold is not None or self.full_fraction is None else _n_full(self.full_fraction, total)


def top_k_full(values: torch.Tensor, k: int) -> torch.Tensor:
    """`[n_layers, n_kv_heads]` values -> bool of the same shape, True for exactly the `k` largest
    (ties go to the earlier layer, then the earlier KV head: a stable sort)."""
    order = torch.argsort(values.flatten().float(), descending=True, stable=True)
    full = torch.zeros(values.numel(), dtype=torch.bool)
    full[order[:k]] = True
    return full.reshape(values.shape)


def choose_full(values: torch.Tensor, full_fraction: float | None, threshold: float | None) -> tuple[torch.Tensor, dict]:
    """KV-head values `[n_layers, n_kv_heads]` -> (`full` bool, budget record): the top `full_fraction` of all
    KV heads (`top_k_full`), or those whose value is above `threshold`."""
    if (full_fraction is None) == (threshold is None):
        raise ValueError("Give exactly one of full_fraction (share of KV heads kept full) or threshold (minimum group score).")
    if full_fraction is not None:
        k = _n_full(full_fraction, values.numel())
        return top_k_full(values, k), {"full_fraction": float(full_fraction), "n_full": k}
    full = values.float() > float(threshold)
    return full, {"threshold": float(threshold), "n_full": int(full.sum())}


def duo_full(values: torch.Tensor) -> torch.Tensor:
    """DuoAttention's own cut: gate values `[n_layers, n_kv_heads]` clipped to [0, 1], full where >= 0.5."""
    return values.float().clamp(0.0, 1.0) >= DUO_THRESHOLD


@dataclass
class HeadMask:
    """Which KV heads keep a full cache.

    Attributes:
        model: name of the model the mask is for ("" when unknown, e.g. a bare DuoAttention file).
        n_layers, n_heads, n_kv_heads: the model's shape (`n_heads` is None when unknown).
        full: `[n_layers, n_kv_heads]` bool; True = full-KV (retrieval) head, False = streaming head.
        sink, recent: what a streaming head keeps: the first `sink` tokens and the last `recent`.
        source: how the mask was made: kind, params, budget, group rule.
        scores: optional `[n_layers, n_heads]` query-head scores the mask came from.
    """

    model: str
    n_layers: int
    n_heads: int | None
    n_kv_heads: int
    full: torch.Tensor
    sink: int = MaskConfig.sink
    recent: int = MaskConfig.recent
    source: dict = field(default_factory=dict)
    scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.full = torch.as_tensor(self.full).to(torch.bool).cpu()
        if tuple(self.full.shape) != (self.n_layers, self.n_kv_heads):
            raise ValueError(f"full has shape {tuple(self.full.shape)}, expected [n_layers, n_kv_heads] = [{self.n_layers}, {self.n_kv_heads}].")
        if self.n_heads is not None and (self.n_heads < self.n_kv_heads or self.n_heads % self.n_kv_heads):
            raise ValueError(f"{self.n_heads} query heads cannot be split into {self.n_kv_heads} KV-head groups.")
        self.sink, self.recent = _check_window(self.sink, self.recent)
        if self.scores is not None:
            self.scores = torch.as_tensor(self.scores, dtype=torch.float32).cpu()

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def from_scores(
        cls,
        scores: HeadScores,
        full_fraction: float | None = None,
        threshold: float | None = None,
        sink: int = MaskConfig.sink,
        recent: int = MaskConfig.recent,
        group: str = "max",
        *,
        n_kv_heads: int | None = None,
        info=None,
    ) -> "HeadMask":
        """Full heads = the top `full_fraction` of all KV heads by group score, or those scoring above `threshold`.

        A KV head's score is the `group` ("max" or "mean") of its query heads' scores. `HeadScores`
        does not record the KV-head count: give `n_kv_heads=` or `info=` (a `ModelInfo`), else it is
        read from `scores.meta["n_kv_heads"]` or the model's local config.
        """
        if (full_fraction is None) == (threshold is None):
            raise ValueError("Give exactly one of full_fraction (share of KV heads kept full) or threshold (minimum group score).")
        n_kv = n_kv_heads or (info.n_kv_heads if info is not None else None) or scores.meta.get("n_kv_heads") or _config_kv_heads(scores.model)
        if not n_kv:
            raise ValueError(f"How many KV heads does {scores.model} have? HeadScores do not say: pass n_kv_heads= or info=lab.info.")
        values = scores.values.float()
        kv_scores = group_scores(values, int(n_kv), group)
        full, budget = choose_full(kv_scores, full_fraction, threshold)
        return cls(
            model=scores.model, n_layers=values.shape[0], n_heads=values.shape[1], n_kv_heads=int(n_kv), full=full,
            sink=sink, recent=recent,
            source={"kind": scores.kind, "params": scores.params, "budget": budget, "group": group, "group_rule": GROUP_RULE},
            scores=values,
        )

    @classmethod
    def random(cls, info, full_fraction: float, seed: int = 0, sink: int = MaskConfig.sink, recent: int = MaskConfig.recent) -> "HeadMask":
        """`full_fraction` of `info`'s KV heads chosen uniformly at random (seeded) to stay full."""
        total = info.n_layers * info.n_kv_heads
        k = _n_full(full_fraction, total)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
        full = torch.zeros(total, dtype=torch.bool)
        full[order[:k]] = True
        return cls.for_model(info, full.reshape(info.n_layers, info.n_kv_heads), sink, recent,
                        {"kind": "random", "params": {"seed": int(seed)}, "budget": {"full_fraction": float(full_fraction), "n_full": k}})

    @classmethod
    def all_streaming(cls, info, sink: int = MaskConfig.sink, recent: int = MaskConfig.recent) -> "HeadMask":
        """Every KV head streams (keeps sink + recent tokens)."""
        return cls.for_model(info, torch.zeros(info.n_layers, info.n_kv_heads, dtype=torch.bool), sink, recent,
                        {"kind": "all_streaming", "params": {}, "budget": {"full_fraction": 0.0, "n_full": 0}})

    @classmethod
    def all_full(cls, info, sink: int = MaskConfig.sink, recent: int = MaskConfig.recent) -> "HeadMask":
        """Every KV head keeps its whole cache (the plain model)."""
        n = info.n_layers * info.n_kv_heads
        return cls.for_model(info, torch.ones(info.n_layers, info.n_kv_heads, dtype=torch.bool), sink, recent,
                        {"kind": "all_full", "params": {}, "budget": {"full_fraction": 1.0, "n_full": n}})

    @classmethod
    def for_model(cls, info, full: torch.Tensor, sink: int, recent: int, source: dict) -> "HeadMask":
        """The mask `full` `[n_layers, n_kv_heads]` for the model `info` (a `ModelInfo`), with its `source` record."""
        source = {**source, "group_rule": GROUP_RULE}
        return cls(model=info.name, n_layers=info.n_layers, n_heads=info.n_heads, n_kv_heads=info.n_kv_heads,
                   full=full, sink=sink, recent=recent, source=source)

    # --- facts -------------------------------------------------------------------------------

    @property
    def n_full(self) -> int:
        return int(self.full.sum())

    @property
    def full_fraction(self) -> float:
        return self.n_full / self.full.numel()

    def full_kv_heads(self, layer: int) -> list[int]:
        return [int(h) for h in torch.nonzero(self.full[layer]).flatten()]

    def streaming_kv_heads(self, layer: int) -> list[int]:
        return [int(h) for h in torch.nonzero(~self.full[layer]).flatten()]

    def streaming_query_heads(self) -> list[Head]:
        """Every `(layer, query head)` whose KV head streams (what a streaming-window ablation must cover)."""
        if self.n_heads is None:
            raise ValueError("This mask does not know the model's query-head count (a bare DuoAttention file): load it with info=lab.info.")
        return [(layer, h) for layer in range(self.n_layers) for h in range(self.n_heads)
                if not self.full[layer, kv_head_of(h, self.n_heads, self.n_kv_heads)]]

    def ideal_kv_bytes(self, context_len: int, dtype_bytes: int, d_head: int, batch: int = 1) -> int:
        """Bytes of K and V the mask must keep at `context_len` tokens: full heads all of them,
        streaming heads `min(context_len, sink + recent)`."""
        n_full = self.n_full
        n_stream = self.full.numel() - n_full
        tokens = n_full * context_len + n_stream * min(context_len, self.sink + self.recent)
        return 2 * batch * tokens * d_head * dtype_bytes

    def check(self, info) -> "HeadMask":
        """Raise `ValueError` naming every way this mask does not fit `info` (a `ModelInfo`); else return self."""
        name = getattr(info, "name", "the model")
        problems = []
        if self.n_layers != info.n_layers:
            problems.append(f"mask has {self.n_layers} layers, {name} has {info.n_layers}")
        if self.n_kv_heads != info.n_kv_heads:
            problems.append(f"mask has {self.n_kv_heads} KV heads per layer, {name} has {info.n_kv_heads}")
        if self.n_heads is not None and self.n_heads != info.n_heads:
            problems.append(f"mask has {self.n_heads} query heads per layer, {name} has {info.n_heads}")
        if problems:
            made_for = f" (made for {self.model})" if self.model and self.model != name else ""
            raise ValueError(f"Head mask does not fit {name}{made_for}: " + "; ".join(problems) + ".")
        return self

    def figure(self):
        """Plotly: the mask as a layer x KV-head grid, full-cache heads in red."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Heatmap(
            z=self.full.int().T.numpy(), x=list(range(self.n_layers)), y=[f"KV {h}" for h in range(self.n_kv_heads)],
            colorscale=[[0, "#cbd5e1"], [1, "#dc2626"]], zmin=0, zmax=1, showscale=False,
            hovertemplate="layer %{x}, %{y}: %{z}<extra>1 = full cache, 0 = streaming</extra>",
        ))
        fig.update_layout(title=f"{self.n_full} of {self.full.numel()} KV heads keep the full cache (red)",
                          xaxis_title="layer", height=260, margin={"l": 60, "r": 20, "t": 50, "b": 40})
        return fig

    def __repr__(self) -> str:
        return (f"HeadMask({self.model or '?'}: {self.n_full}/{self.full.numel()} KV heads full, "
                f"sink={self.sink}, recent={self.recent}, source={self.source.get('kind', '?')})")

    # --- storage -----------------------------------------------------------------------------

    def to_record(self) -> dict:
        return {
            "format": FORMAT, "record": "head_mask", "model": self.model, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "full": self.full.int().tolist(),
            "sink": self.sink, "recent": self.recent, "source": self.source,
            "scores": self.scores.tolist() if self.scores is not None else None,
        }

    def save(self, path: Path | str) -> Path:
        """Write `headlab.head_mask/v1` JSON atomically (a `.json` path, not a folder); returns the path."""
        path = validate.out_file(path, "A head mask's path", parent_must_exist=False)
        store.write_json(path, self.to_record())
        return path

    def save_duo(self, folder: Path | str) -> Path:
        """Write the DuoAttention folder: `full_attention_heads.tsv` + `config.json`; returns the folder."""
        folder = Path(folder)
        rows = "".join("\t".join("1.0" if v else "0.0" for v in row) + "\n" for row in self.full.tolist())
        store._atomic_write(folder / DUO_TSV, lambda tmp: Path(tmp).write_text(rows))
        config = {"sink_size": self.sink, "recent_size": self.recent,
                  "headlab": {"model": self.model, "n_heads": self.n_heads, "source": self.source}}
        store.write_json(folder / DUO_CONFIG, config)
        return folder

    @classmethod
    def load(cls, path: Path | str, info=None) -> "HeadMask":
        """Read a `headlab.head_mask/v1` JSON file or a DuoAttention folder (or its .tsv file).

        With `info`, the mask is checked against the model (`check`) and a DuoAttention mask gets
        the model's name and query-head count.
        """
        path = Path(path)
        if path.is_dir() or path.suffix == ".tsv":
            mask = cls._load_duo(path if path.is_dir() else path.parent, path if path.suffix == ".tsv" else path / DUO_TSV, info)
        elif not path.exists():
            raise FileNotFoundError(f"No head mask at {path}: give a .json file or a DuoAttention folder.")
        else:
            mask = cls._load_json(path)
        return mask.check(info) if info is not None else mask

    @classmethod
    def _load_json(cls, path: Path) -> "HeadMask":
        record = validate.mask_record(_read_json(path), path, FORMAT)
        full, n_layers, n_kv = record["full"], record["n_layers"], record["n_kv_heads"]
        return cls(model=record.get("model") or "", n_layers=n_layers, n_heads=record.get("n_heads"), n_kv_heads=n_kv,
                   full=torch.tensor(full, dtype=torch.bool).reshape(n_layers, n_kv), sink=record["sink"], recent=record["recent"],
                   source=record.get("source") or {}, scores=record.get("scores"))

    @classmethod
    def _load_duo(cls, folder: Path, tsv: Path, info) -> "HeadMask":
        if not tsv.exists():
            raise FileNotFoundError(f"{folder} is not a DuoAttention mask folder: it has no {DUO_TSV}.")
        values = read_duo_tsv(tsv)
        config_path = folder / DUO_CONFIG
        config = _read_json(config_path) if config_path.exists() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must be a JSON object with sink_size and recent_size.")
        missing = [k for k in ("sink_size", "recent_size") if k not in config]
        if missing:
            raise ValueError(f"{config_path} must give {' and '.join(missing)} (DuoAttention's streaming window).")
        validate.window(config["sink_size"], config["recent_size"], f"{config_path} (sink_size, recent_size)")
        extra = config.get("headlab") if isinstance(config.get("headlab"), dict) else {}
        clipped = values.clamp(0.0, 1.0)
        n_layers, n_kv = values.shape
        return cls(
            model=extra.get("model") or (info.name if info is not None else ""),
            n_layers=n_layers,
            n_heads=extra.get("n_heads") or (info.n_heads if info is not None and info.n_kv_heads == n_kv else None),
            n_kv_heads=n_kv, full=duo_full(values), sink=config["sink_size"], recent=config["recent_size"],
            source=extra.get("source") or {"kind": "duo_attention", "params": {"file": str(tsv)},
                                            "budget": {"threshold": DUO_THRESHOLD, "values": clipped.tolist()}},
        )


def _read_json(path: Path):
    """The JSON at `path`, any top-level type; a file that is not JSON text is a ValueError naming it."""
    try:
        return store.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err


def make_mask(lab, source: str = MaskConfig.source, **params) -> HeadMask:
    """A `HeadMask` for `lab` from the registered mask source `source` (`mask_sources()`).

    `params` are `MaskConfig`'s budget and window (`full_fraction`, `threshold`, `sink`, `recent`) and the
    source's own parameters (its dataclass fields, e.g. `seed=` for "random", `kind=`/`score_params=` for
    "score", `steps=` for "duo"). `kind` and `seed` are `MaskConfig` fields too: a source without such a
    parameter ignores them, so one form can pass them to every source. Anything else is an error naming
    the parameters the source takes. Every source keeps exactly `round(full_fraction * n_kv_heads_total)`
    KV heads full (but "all_streaming", which keeps none).
    """
    from headlab.mask_sources import make_source, source_fields

    common = {f.name for f in dataclasses.fields(MaskConfig)}
    takes = source_fields(source)  # raises for an unknown source, naming the known ones
    unknown = sorted(set(params) - common - set(takes))
    if unknown:
        raise TypeError(f"Mask source '{source}' takes no parameter {unknown}; it takes "
                        f"{sorted(set(takes) | (common - {'source', 'kind', 'seed'}))}.")
    config = MaskConfig(source=source, **{k: v for k, v in params.items() if k in common})
    own = {k: v for k, v in params.items() if k in takes}
    return make_source(source, **own).build(lab, config)


MIB = 2**20


@dataclass
class KVMemory:
    """Ideal KV bytes against context length for the full cache, a mask and all-streaming (same window), in MiB."""

    mask: HeadMask
    context: list[int]
    full_cache: list[float]
    this_mask: list[float]
    all_streaming: list[float]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"context": self.context, "full cache": self.full_cache, "this mask": self.this_mask,
                             "all streaming": self.all_streaming})

    def figure(self):
        """Plotly: MiB against context length, one line per cache."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, values, dash in (("full cache", self.full_cache, "solid"), ("this mask", self.this_mask, "solid"),
                                   ("all streaming", self.all_streaming, "dot")):
            fig.add_trace(go.Scatter(x=self.context, y=values, name=name, mode="lines", line={"dash": dash}))
        fig.update_layout(title="KV cache the runtime must hold (batch 1)", xaxis_title="context length (tokens)",
                          yaxis_title="MiB", height=340, margin={"l": 60, "r": 20, "t": 50, "b": 40})
        return fig

    def summary(self) -> str:
        mask, mine, full = self.mask, self.this_mask[-1], self.full_cache[-1]
        return (f"{mask!r}. At {self.context[-1]} tokens the KV cache needs **{mine:.1f} MiB** instead of {full:.1f} MiB "
                f"({100 * mine / full:.0f}%); streaming heads keep {mask.sink} + {mask.recent} tokens.")


def kv_memory(mask: HeadMask, info, dtype_bytes: int, points: int = 16) -> KVMemory:
    """`mask`'s ideal KV memory at `points` context lengths up to `info.n_ctx`, beside the full cache and all-streaming."""
    lengths = sorted({max(1, round(info.n_ctx * i / points)) for i in range(1, points + 1)})
    streaming = HeadMask.all_streaming(info, sink=mask.sink, recent=mask.recent)

    def mib(m: HeadMask) -> list[float]:
        return [m.ideal_kv_bytes(n, dtype_bytes, info.d_head) / MIB for n in lengths]

    return KVMemory(mask=mask, context=lengths, full_cache=mib(HeadMask.all_full(info)), this_mask=mib(mask),
                    all_streaming=mib(streaming))


def read_duo_tsv(path: Path) -> torch.Tensor:
    """`full_attention_heads.tsv` -> `[n_layers, n_kv_heads]` float tensor (unclipped); `ValueError` on a malformed row."""
    rows: list[list[float]] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.strip().split("\t")
        row = []
        for column, cell in enumerate(cells, start=1):
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(f"{path} row {number}, column {column}: {cell.strip()!r} is not a number.") from None
            if not math.isfinite(value):
                raise ValueError(f"{path} row {number}, column {column}: {cell.strip()!r} is not a finite number.")
            row.append(value)
        if rows and len(row) != len(rows[0]):
            raise ValueError(f"{path} row {number} has {len(row)} tab-separated values, the first row has {len(rows[0])} (one per KV head).")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty: expected one row of KV-head values per layer.")
    return torch.tensor(rows, dtype=torch.float32)


def _config_kv_heads(model_name: str) -> int | None:
    """The KV-head count from the model's local config (the embedded model's cache folder, or the HF cache)."""
    try:
        from headlab import loading

        if model_name in (loading.EMBEDDED, loading.EMBEDDED_NAME):
            config_path = loading.embedded_folder() / "config.json"
            if config_path.exists():
                return int(store.read_json(config_path)["num_key_value_heads"])
            return None
        if Path(model_name).expanduser().exists():
            return None  # a bare folder name could be another model in the working folder: ask the caller instead
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name, local_files_only=True, trust_remote_code=False)
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    except Exception:  # no local config: the caller asks for n_kv_heads
        return None
