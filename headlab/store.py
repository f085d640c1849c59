"""The results store: `<runs>/<model-slug>/<name>-<params-hash>.json` (+ raw `.safetensors`).

Two roots. What a user computes is written to their own results folder, `runs_dir()`: `$HEADLAB_RUNS`,
else `~/.cache/headlab/runs` (under `$XDG_CACHE_HOME` when set). The runs shipped with the repository
in `cached_runs/` (`shipped_dir()`) are read, never written, at run time: a lookup reads the user's
folder first, then the shipped twin of the same file (`stored_run`). Only `make cache` and the
analyses scripts, which produce the shipped runs, point `$HEADLAB_RUNS` at `cached_runs/`.

A record and its raw data are one unit (`write_record`): the raw tensors go to a file named by the
hash of its bytes (`<stem>.<sha12>.safetensors`), written first; the JSON, which names that file, is
swapped in last; raw files of the record that the JSON no longer names are removed after. Writers of
one model folder take turns (a lock on the folder), so two writers of the same run end with one
consistent record. Every file is written atomically (temporary file in the same folder, then
`os.replace`), so a crash never leaves a half-written result; temporaries a killed write left behind
are swept by later writes. JSON is strict: NaN and infinities are written as `null`.

Readers never trust a record: `cached_run` treats a damaged one (bad JSON, missing or truncated raw
file, wrong format) as missing and recomputes it, with a warning; `list_runs` skips and reports it.
Only JSON and safetensors are read back: nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Protocol, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes

try:
    import fcntl
except ImportError:  # Windows: no folder lock; each file is still replaced atomically
    fcntl = None

REPO_RUNS = Path(__file__).resolve().parent.parent / "cached_runs"  # the shipped runs: read-only at run time
STALE_SECONDS = 300  # a temporary (or unnamed raw file) older than this belongs to a killed write
CHUNK = 1 << 22  # raw files are written in 4 MiB pieces

# What reading a damaged record raises: unreadable or malformed files, missing fields, wrong format.
DAMAGE_ERRORS = (OSError, ValueError, KeyError, TypeError, SafetensorError)


class DamagedRecord(ValueError):
    """A stored file is malformed or truncated."""


def slugify(model_name: str) -> str:
    """File-system name of a model: lower case, runs of other characters become '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", model_name.lower()).strip("-")


def runs_dir() -> Path:
    """The user's results folder, where computed runs are written: `$HEADLAB_RUNS`, else
    `$XDG_CACHE_HOME/headlab/runs` (default `~/.cache/headlab/runs`)."""
    if os.environ.get("HEADLAB_RUNS"):
        return Path(os.environ["HEADLAB_RUNS"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "headlab" / "runs"


def shipped_dir() -> Path:
    """The runs shipped with the repository (`cached_runs/`), read after the user's folder and never written
    at run time; `$HEADLAB_SHIPPED_RUNS` moves it, and setting it empty turns the shipped runs off."""
    value = os.environ.get("HEADLAB_SHIPPED_RUNS")
    return REPO_RUNS if value is None else Path(value).expanduser()


def shipped_twin(path: Path) -> Path | None:
    """The shipped run that answers the same lookup as `path` in the user's folder (None when `path` is not
    under it, the shipped runs are off, or the user's folder is the shipped one)."""
    if os.environ.get("HEADLAB_SHIPPED_RUNS") == "":
        return None
    user, shipped = runs_dir().resolve(), shipped_dir().resolve()
    try:
        relative = Path(path).resolve().relative_to(user)
    except ValueError:
        return None
    return None if user == shipped else shipped / relative


def params_hash(params: dict) -> str:
    """A short stable hash of JSON-able parameters."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run_path(model_slug: str, name: str, params: dict, root: Path | None = None) -> Path:
    """Where the run `name` with `params` of the model `model_slug` lives: the one place that decides it."""
    return (root or runs_dir()) / model_slug / f"{name}-{params_hash(params)}.json"


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def names_a_file(value: object) -> bool:
    """Whether the parameter `value` is a path (with a folder, `~` or a suffix) to an existing file.

    Bare names ("filler", "synthetic", "train") are never files, whatever the working folder holds.
    """
    if not isinstance(value, (str, Path)) or not str(value).strip():
        return False
    text = str(value)
    if not ("/" in text or os.sep in text or text.startswith("~") or Path(text).suffix):
        return False
    try:
        return Path(text).expanduser().is_file()
    except OSError:
        return False


def file_hashes(params: dict) -> dict[str, str]:
    """`{parameter: sha256 of the file}` for each of `params` that names a readable file."""
    hashes = {}
    for name, value in params.items():
        if names_a_file(value):
            with contextlib.suppress(OSError):
                hashes[name] = file_sha256(value)
    return hashes


class Record(Protocol):
    """A result the store keeps: written by `save(path)`, read by the class's `load(path)`."""

    def save(self, path: Path) -> Path: ...


R = TypeVar("R", bound=Record)


def stored_run(path: Path, load: Callable[[Path], R], *, then: str = "it is treated as missing") -> R | None:
    """The run stored at `path` (read with `load`), else its shipped twin (`shipped_twin`), or None when there is
    none or it is damaged (a warning says so, ending with `then`).

    A damaged record is read twice before giving up: a writer may swap the record (and remove its old
    raw file) between our reading its JSON and its raw file.
    """
    for candidate in (path, shipped_twin(path)):
        if candidate is None:
            continue
        for attempt in range(2):
            if not candidate.exists():
                break
            try:
                return load(candidate)
            except DAMAGE_ERRORS as err:
                if attempt:
                    warnings.warn(f"The stored record {candidate} is damaged ({type(err).__name__}: {err}); {then}.",
                                  stacklevel=2)
    return None


def cached_run(path: Path, load: Callable[[Path], R], compute: Callable[[], R], *, recompute: bool = False,
               save: bool = True) -> R:
    """The run stored at `path` (read with `load`), else `compute()`d and saved there (unless `save` is False).

    A damaged record at `path` counts as missing: it is recomputed and overwritten, with a warning.
    The one load-or-compute-and-save path for scores, ablation curves, composition maps, channel
    experiments and Sahara groups.
    """
    if not recompute:
        stored = stored_run(path, load, then="recomputing it" + (" and overwriting it" if save else ""))
        if stored is not None:
            return stored
    result = compute()
    if save:
        result.save(path)
    return result


# --- writing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive use of `folder` among headlab writers (an advisory lock on the folder itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def sweep_temporaries(folder: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove the temporaries (`.*.tmp`) in `folder` older than `older_than` seconds: left by killed writes."""
    removed, cutoff = [], time.time() - older_than
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed.append(tmp)
    return removed


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent)
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


def strict_json(value: object) -> object:
    """`value` with every NaN or infinite float (also in tensors' lists) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def nan_for_null(value: object) -> object:
    """`value` (nested lists) with every None replaced by NaN: the inverse of `strict_json` for numbers."""
    if isinstance(value, list):
        return [nan_for_null(v) for v in value]
    return math.nan if value is None else value


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` as strict JSON at `path` atomically (NaN and infinities become null)."""
    payload = strict_json(payload)

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write(Path(path), write)


def write_bytes(tmp: str, data: bytes) -> None:
    """Write `data` to the file `tmp` in pieces, then sync it to disk."""
    with open(tmp, "wb") as fh:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            fh.write(view[start:start + CHUNK])
        fh.flush()
        os.fsync(fh.fileno())


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return tensors_to_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _raw_files(path: Path) -> list[Path]:
    """Every raw file of the record at `path`: `<stem>.safetensors` and `<stem>.<sha12>.safetensors`."""
    pattern = re.compile(re.escape(path.stem) + r"(\.[0-9a-f]{12})?\.safetensors")
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]


def write_record(path: Path, payload: dict, tensors: dict[str, torch.Tensor] | None = None,
                 file_key: str = "raw_file") -> Path:
    """Write the record at `path`: `tensors` (if any) to `<stem>.<sha12>.safetensors` first, then the JSON
    `payload` (with `payload[file_key]` naming that file, or None) swapped in last; then the record's raw
    files the JSON no longer names are removed. Returns `path`."""
    path = Path(path)
    with folder_lock(path.parent):
        name = None
        if tensors:
            data = _tensor_bytes(tensors)
            name = f"{path.stem}.{hashlib.sha256(data).hexdigest()[:12]}.safetensors"
            _atomic_write(path.parent / name, lambda tmp: write_bytes(tmp, data))
        write_json(path, {**payload, file_key: name})
        for old in _raw_files(path):
            if old.name != name:
                with contextlib.suppress(OSError):
                    old.unlink()
    return path


# --- reading -----------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def read_record(path: Path | str, fmt: str, what: str) -> dict:
    """The JSON record at `path`, checked to be of format `fmt` (`what` names it in the error)."""
    record = read_json(Path(path))
    if not isinstance(record, dict) or record.get("format") != fmt:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path} is not a headlab {what} file (format {found!r}, expected {fmt!r}).")
    return record


def check_tensors(path: Path) -> None:
    """Raise `DamagedRecord` unless `path` is a complete safetensors file (header read, size checked)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise DamagedRecord(f"{path} is truncated ({size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise DamagedRecord(f"{path} is truncated (header of {n} bytes, file of {size}).")
        header = json.loads(fh.read(n))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        raise DamagedRecord(f"{path} is truncated or padded ({size} bytes, its header says {8 + n + max(ends, default=0)}).")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`; `DamagedRecord` if it is truncated."""
    check_tensors(path)
    return load_file(str(path))


def _damage(path: Path, record: object) -> str | None:
    """Why the record at `path` (its JSON `record`) is damaged, or None."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    for key in ("raw_file", "values_file", "tensors_file"):
        name = record.get(key)
        if name:
            try:
                check_tensors(path.parent / name)
            except DAMAGE_ERRORS as err:
                return f"{key} {name}: {err}"
    return None


class RunList(list):
    """The rows of `list_runs`, with `damaged`: `[{"path", "error"}]` for each record skipped."""

    damaged: list[dict]


def _roots(root: Path | None) -> list[tuple[str, Path]]:
    """The folders `list_runs` reads: `root` alone, or the user's folder then the shipped one."""
    if root is not None:
        return [("here", Path(root))]
    roots = [("yours", runs_dir())]
    if os.environ.get("HEADLAB_SHIPPED_RUNS") != "" and shipped_dir().resolve() != runs_dir().resolve():
        roots.append(("shipped", shipped_dir()))
    return roots


def list_runs(root: Path | None = None) -> RunList:
    """One row per stored run: where (yours / shipped), model, name, file, and the record's kind/params.

    Without `root`, the user's results folder and then the shipped runs; a shipped run the user's folder
    also holds (the same file name) is listed once, as the user's. Damaged records (malformed JSON, missing
    or truncated raw file) are skipped, listed in the result's `damaged`, and reported with a warning.
    """
    rows = RunList()
    rows.damaged = []
    seen: set[str] = set()
    for where, folder in _roots(root):
        for path in sorted(folder.glob("*/*.json")):
            key = f"{path.parent.name}/{path.name}"
            if path.name.startswith(".") or key in seen:
                continue
            seen.add(key)
            try:
                record = read_json(path)
                error = _damage(path, record)
            except DAMAGE_ERRORS as err:
                error = f"{type(err).__name__}: {err}"
            if error:
                rows.damaged.append({"path": str(path), "error": error})
                continue
            rows.append({"where": where, "model": path.parent.name, "record": record.get("record", "?"),
                         "kind": record.get("kind", ""), "params": record.get("params", {}), "path": str(path)})
    if rows.damaged:
        warnings.warn(f"{len(rows.damaged)} damaged stored record(s) skipped: "
                      + "; ".join(f"{d['path']} ({d['error']})" for d in rows.damaged), stacklevel=2)
    return rows
