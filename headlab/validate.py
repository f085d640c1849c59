"""Every user input checked before any work starts: one module shared by the CLI, the app and the library.

Each function takes what a user gave (a flag's text, a keyword argument, a file's fields), returns it
in the form the library uses, and raises `ValueError` with the one message the user reads (it names
the input, what was wrong and what to write instead). Checks that need the model take its
`ModelInfo` (`lab.info`): the heads, k, ks and contexts are checked against its real sizes.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import math
import numbers
import os
import types
import typing
from pathlib import Path

from headlab.heads import Head, parse_heads
from headlab.lab import ModelInfo

# Integer fields that count things (samples, sequence lengths, batch sizes, heads): at least 1.
COUNT_FIELDS = frozenset({"n", "n_random", "seq_len", "batch_size", "k", "pool", "stability_k"})
MAX_TOKENS = 2**31 - 1  # the largest token position the runtime indexes (int32)
KVPRESS_HINT = ("kvpress is not installed; it needs transformers<5.3, so install it in an environment of its own: "
                "pip install kvpress 'transformers<5.3'.")
_MISMATCH = object()


# --- numbers and lists --------------------------------------------------------------------------------

def whole(value, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int (an integral float such as 8.0 too), within [minimum, maximum]; else ValueError naming `what`."""
    number = _as_int(value)
    if number is _MISMATCH:
        raise ValueError(f"{what} must be a whole number, got {value!r}.")
    if minimum is not None and number < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {number}.")
    if maximum is not None and number > maximum:
        raise ValueError(f"{what} must be at most {maximum}, got {number}.")
    return number


def count(value, what: str) -> int:
    """A number of things (samples, steps, sets, rows): a whole number >= 1."""
    return whole(value, what, minimum=1)


def int_list(text: str, what: str, example: str = "512,1024") -> list[int]:
    """'512,1024' (commas or spaces) -> [512, 1024]; an empty list or a non-number is an error."""
    try:
        values = [int(item) for item in str(text).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what} must be whole numbers separated by commas, e.g. {example}; got {text!r}.") from None
    if not values:
        raise ValueError(f"{what} is empty: give whole numbers separated by commas, e.g. {example}.")
    return values


def float_list(text: str, what: str) -> list[float]:
    """'0.1,0.5' -> [0.1, 0.5]; an empty list, a non-number or a non-finite number is an error."""
    try:
        values = [float(item) for item in str(text).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what} must be numbers separated by commas, e.g. 0.1,0.5; got {text!r}.") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be finite numbers separated by commas, e.g. 0.1,0.5; got {text!r}.")
    return values


# --- heads, k, ks, contexts against the model -----------------------------------------------------------

def heads(text: str | None, info: ModelInfo, what: str = "--heads") -> list[Head]:
    """A head list ('L18H6,L17H3', '18.6 17.3') checked against the model; an empty list is an error, never a default."""
    if text is None or not str(text).replace(",", " ").replace(";", " ").strip():
        raise ValueError(f"{what} is empty: name at least one head, e.g. 'L18H6,L17H3' "
                         f"({info.name} has layers 0-{info.n_layers - 1} and heads 0-{info.n_heads - 1}).")
    return parse_heads(str(text), info)


def top_k(k, info: ModelInfo, what: str = "--k") -> int:
    """How many top heads to take: 1 to every head of the model."""
    total = info.n_layers * info.n_heads
    return whole(k, f"{what} (top heads to ablate; {info.name} has {total})", minimum=1, maximum=total)


def curve_ks(ks, info: ModelInfo, what: str = "--ks") -> list[int]:
    """A curve's ks: each from 1 to half of the heads (random sets come from the heads outside the top-k)."""
    values = [whole(k, what, minimum=1) for k in ks]
    if not values:
        raise ValueError(f"{what} is empty: give the ks, e.g. 1,2,4,8.")
    most = info.n_layers * info.n_heads // 2
    if max(values) > most:
        raise ValueError(f"{what}: k = {max(values)} is too large: random sets come from the heads outside the top-k, "
                         f"so {info.name} allows k from 1 to {most} (half of its heads).")
    return values


def contexts(values, info: ModelInfo, what: str = "--contexts", extra_tokens: int = 0) -> list[int]:
    """Context lengths from 1 to the model's limit (less `extra_tokens` generated after them)."""
    values = [whole(v, what, minimum=1) for v in values]
    if not values:
        raise ValueError(f"{what} is empty: give context lengths, e.g. 512,1024.")
    longest = info.n_ctx - extra_tokens
    too_long = [v for v in values if v > longest]
    if too_long:
        after = f" with {extra_tokens} generated tokens after it" if extra_tokens else ""
        raise ValueError(f"{what}: {too_long[0]} tokens{after} does not fit {info.name}'s context of {info.n_ctx} "
                         f"tokens: use at most {longest}.")
    return values


# --- head-mask fields ---------------------------------------------------------------------------------

def window(sink, recent, where: str = "") -> tuple[int, int]:
    """A streaming head's window: `sink` >= 0 and `recent` >= 1 (the query sees itself) whole tokens."""
    prefix = f"{where}: " if where else ""
    return (whole(sink, f"{prefix}sink (first tokens a streaming head keeps)", minimum=0, maximum=MAX_TOKENS),
            whole(recent, f"{prefix}recent (last tokens a streaming head keeps; the query sees itself)",
                  minimum=1, maximum=MAX_TOKENS))


def mask_record(record, path, fmt: str) -> dict:
    """A `headlab.head_mask/v1` record read from `path`, every field's type and bounds checked."""
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a headlab head-mask file: its top level is a JSON {_json_type(record)}, "
                         "expected an object.")
    if record.get("format") != fmt:
        raise ValueError(f"{path} is not a headlab head-mask file (format {record.get('format')!r}, expected {fmt!r}).")
    missing = [k for k in ("n_layers", "n_kv_heads", "full", "sink", "recent") if k not in record]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}.")
    n_layers = whole(record["n_layers"], f"{path}: n_layers", minimum=1, maximum=MAX_TOKENS)
    n_kv = whole(record["n_kv_heads"], f"{path}: n_kv_heads", minimum=1, maximum=MAX_TOKENS)
    n_heads = None if record.get("n_heads") is None else whole(record["n_heads"], f"{path}: n_heads", minimum=n_kv)
    sink, recent = window(record["sink"], record["recent"], str(path))
    full = _grid(record["full"], n_layers, n_kv, f"{path}: 'full'", lambda v: v in (0, 1), "values of 0 or 1")
    scores = record.get("scores")
    if scores is not None:
        scores = _grid(scores, n_layers, n_heads, f"{path}: 'scores'", _finite, "finite numbers")
    for key, kind in (("model", str), ("source", dict)):
        if record.get(key) is not None and not isinstance(record[key], kind):
            raise ValueError(f"{path}: {key!r} must be a JSON {_json_type(kind())}, got {record[key]!r}.")
    return {**record, "n_layers": n_layers, "n_kv_heads": n_kv, "n_heads": n_heads, "sink": sink, "recent": recent,
            "full": full, "scores": scores}


def _grid(rows, n_rows: int, n_cols: int | None, what: str, ok, values: str) -> list[list]:
    """`rows` as `n_rows` lists of `n_cols` (any width when None, but all equal) values passing `ok`."""
    if not isinstance(rows, list) or len(rows) != n_rows:
        got = f"{len(rows)} rows" if isinstance(rows, list) else f"a {_json_type(rows)}"
        raise ValueError(f"{what} must be {n_rows} rows (one per layer), got {got}.")
    width = n_cols if n_cols is not None else (len(rows[0]) if isinstance(rows[0], list) else -1)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width or not all(ok(v) for v in row):
            raise ValueError(f"{what} row {i} must be {width} {values}, got {row!r}.")
    return rows


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# --- output paths -------------------------------------------------------------------------------------

def out_file(path, what: str = "--out", suffix: str = ".json", parent_must_exist: bool = True) -> Path:
    """Where a JSON result may be written: a `.json` path (never a raw-data or other file), not a folder,
    in a folder that exists (unless `parent_must_exist` is False) and may be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder: give a file path such as {str(path / ('result' + suffix))!r}.")
    if path.suffix.lower() != suffix:
        raise ValueError(f"{what} must be a {suffix} path (its raw arrays, if any, are written beside it as "
                         f".safetensors); got {str(path)!r}.")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{what}: {str(parent)!r} is a file, not a folder.")
    if not parent.exists():
        if parent_must_exist:
            raise ValueError(f"{what}: the folder {str(parent)!r} does not exist: create it first.")
        return path
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{what}: {str(path)!r} cannot be written here (permission denied).")
    return path


def out_folder(path, what: str = "--duo") -> Path:
    """Where a folder of files may be written: not an existing file, its parent an existing, writable folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file: give a folder path.")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{what}: the folder {str(parent)!r} does not exist: create it first.")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise ValueError(f"{what}: {str(path)!r} cannot be written here (permission denied).")
    return path


# --- parameters typed by a dataclass's fields -----------------------------------------------------------

def dataclass_params(cls: type, params: dict, what: str) -> dict:
    """`params` checked against `cls`'s field annotations (e.g. `prompts: list[str] | None` refuses 'abc'),
    counts (`COUNT_FIELDS`) at least 1; returns them with integral floats (8.0) made ints."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved is not checked
        hints = {}
    checked = {}
    for name, value in params.items():
        annotation = hints.get(name, typing.Any)
        value = _coerce(value, annotation)
        if value is _MISMATCH:
            raise ValueError(f"{what}: parameter {name!r} must be {_describe(annotation)}, got {params[name]!r} "
                             f"({type(params[name]).__name__}){_list_hint(annotation)}.")
        if name in COUNT_FIELDS and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"{what}: parameter {name!r} must be at least 1, got {value}.")
        checked[name] = value
    return checked


def _as_int(value):
    if isinstance(value, bool):
        return _MISMATCH
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return _MISMATCH


def _coerce(value, annotation):
    """`value` as `annotation` wants it (an integral float becomes an int), or `_MISMATCH`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return next((out for out in (_coerce(value, option) for option in args) if out is not _MISMATCH), _MISMATCH)
    if annotation is typing.Any:
        return value
    if annotation is type(None):
        return value if value is None else _MISMATCH
    if annotation is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if annotation is int:
        return _as_int(value)
    if annotation is float:
        return value if _finite(value) else _MISMATCH
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, args)
    if origin is dict:
        if not isinstance(value, dict):
            return _MISMATCH
        key_type, value_type = args or (typing.Any, typing.Any)
        items = [(_coerce(k, key_type), _coerce(v, value_type)) for k, v in value.items()]
        return _MISMATCH if any(part is _MISMATCH for item in items for part in item) else dict(items)
    if isinstance(annotation, type):
        return value if isinstance(value, annotation) else _MISMATCH
    return value  # an annotation this checker does not know: accepted as given


def _coerce_sequence(value, origin, args):
    if not isinstance(value, (list, tuple)):
        return _MISMATCH
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            return _MISMATCH
        items = [_coerce(v, a) for v, a in zip(value, args)]
    else:
        items = [_coerce(v, args[0] if args else typing.Any) for v in value]
    if any(item is _MISMATCH for item in items):
        return _MISMATCH
    return type(value)(items)


def _describe(annotation) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _list_hint(annotation) -> str:
    wants = {typing.get_origin(a) for a in (typing.get_args(annotation) or (annotation,))} | {typing.get_origin(annotation)}
    if wants & {list, tuple, dict}:
        return "; write lists and mappings as JSON, e.g. [\"first text\", \"second\"], [256, 512] or {\"name\": \"text\"}"
    return ""


# --- runtime caches and the app server ------------------------------------------------------------------

def caches(text: str, known) -> list[str]:
    """'hf_full,compressed' -> names checked against `known`; kvpress_duo needs kvpress installed (ImportError)."""
    names = [kind.strip() for kind in str(text).split(",") if kind.strip()]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise ValueError(f"--caches: kind must be one of {', '.join(known)}; got {text!r}.")
    if "kvpress_duo" in names and importlib.util.find_spec("kvpress") is None:
        raise ImportError(KVPRESS_HINT)
    return names


def is_loopback(host: str | None) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.1, ::1, 127.x): only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def serve_host(host: str, allow_remote: bool, share: bool = False) -> bool:
    """Whether serving on `host` (or a public `share` link) reaches beyond this machine; that needs `allow_remote`,
    else ValueError. The one rule for the CLI (checked before the model loads) and the app's `launch`."""
    remote = share or not is_loopback(str(host).strip().lower())
    if remote and not allow_remote:
        where = "a public share link" if share else f"--host {host}"
        raise ValueError(f"{where} serves the app to every machine that can reach this one (it runs the model and "
                         "reads files for anyone): add --allow-remote (launch(..., allow_remote=True)) to do so on "
                         "purpose, with --auth USER:PASS.")
    return remote


def auth_pair(text: str | None) -> tuple[str, str] | None:
    """'USER:PASS' -> (user, password); both must be non-empty."""
    if text is None:
        return None
    user, sep, password = str(text).partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASS with both parts non-empty, e.g. --auth alice:s3cret.")
    return user, password


def files_dir(path) -> Path | None:
    """The one folder whose files the app may read: an existing folder, resolved."""
    if path is None:
        return None
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"--files-dir {str(path)!r} is not an existing folder.")
    return folder
