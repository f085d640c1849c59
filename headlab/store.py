"""The results store: `cached_runs/<model-slug>/<name>-<params-hash>.json` (+ `.safetensors`).

Files are written atomically (temporary file in the same folder, then `os.replace`), so a crash
never leaves a half-written result. Only JSON and safetensors are read back: nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import torch
from safetensors.torch import load_file, save_file

REPO_RUNS = Path(__file__).resolve().parent.parent / "cached_runs"


def slugify(model_name: str) -> str:
    """File-system name of a model: lower case, runs of other characters become '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", model_name.lower()).strip("-")


def runs_dir() -> Path:
    """`$HEADLAB_RUNS`, else the repository's `cached_runs/`."""
    return Path(os.environ.get("HEADLAB_RUNS", REPO_RUNS)).expanduser()


def params_hash(params: dict) -> str:
    """A short stable hash of JSON-able parameters."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run_path(model_slug: str, name: str, params: dict, root: Path | None = None) -> Path:
    """Where the run `name` with `params` of the model `model_slug` lives: the one place that decides it."""
    return (root or runs_dir()) / model_slug / f"{name}-{params_hash(params)}.json"


class Record(Protocol):
    """A result the store keeps: written by `save(path)`, read by the class's `load(path)`."""

    def save(self, path: Path) -> Path: ...


R = TypeVar("R", bound=Record)


def cached_run(path: Path, load: Callable[[Path], R], compute: Callable[[], R], *, recompute: bool = False,
               save: bool = True) -> R:
    """The run stored at `path` (read with `load`), else `compute()`d and saved there (unless `save` is False).

    The one load-or-compute-and-save path for scores, ablation curves, composition maps, channel
    experiments and Sahara groups.
    """
    if path.exists() and not recompute:
        return load(path)
    result = compute()
    if save:
        result.save(path)
    return result


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary shared files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` as JSON at `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write(Path(path), write)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as safetensors at `path` atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def read_record(path: Path | str, fmt: str, what: str) -> dict:
    """The JSON record at `path`, checked to be of format `fmt` (`what` names it in the error)."""
    record = read_json(Path(path))
    if record.get("format") != fmt:
        raise ValueError(f"{path} is not a headlab {what} file (format {record.get('format')!r}, expected {fmt!r}).")
    return record


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def list_runs(root: Path | None = None) -> list[dict]:
    """One row per stored run: model, name, file, and the record's kind/params where present."""
    root = root or runs_dir()
    rows = []
    for path in sorted(root.glob("*/*.json")):
        try:
            record = read_json(path)
        except (OSError, json.JSONDecodeError):
            continue
        rows.append(
            {
                "model": path.parent.name,
                "record": record.get("record", "?"),
                "kind": record.get("kind", ""),
                "params": record.get("params", {}),
                "path": str(path),
            }
        )
    return rows
