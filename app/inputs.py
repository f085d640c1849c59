"""Reading what users type into the app: heads and head lists, number lists, k lists and counts, with
messages that say how to fix them. Heads are read as 'L18H6' or '18.6' and written back as 'L18H6'.

`FileAccess` decides which server files the app's file and model inputs may read: uploads always, typed
paths only inside the one folder given at launch (`files_dir`), and its refusals never say whether a
path outside exists. `hiding_file_text` keeps a user file's contents out of its error messages.

Everything here is plain Python (no gradio), raises `ValueError` with a user-facing message, and
knows the model's shape only through `ModelInfo`.
"""
import contextlib
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from headlab import ModelInfo, ModelLoadError, validate
from headlab.heads import Head, check_head, format_heads, parse_heads  # noqa: F401  (the app's head inputs)



def check_whole(value: float | None, name: str) -> int:
    """A whole-number input (`validate.whole`), or `ValueError` naming the input when it is empty."""
    if value is None or value != value:  # an empty box, or NaN
        raise ValueError(f"Fill in {name} (a whole number).")
    return validate.whole(value, name)


def check_count(value: float | None, name: str, low: int, high: int) -> int:
    """A whole-number input within `[low, high]`, or `ValueError` naming the input and the range."""
    number = check_whole(value, name)
    if not low <= number <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {number}.")
    return number


def parse_numbers(text: str, name: str, cast: Callable = float) -> list:
    """'256, 512' -> [256, 512]: whole numbers when `cast` is int (`validate.int_list` / `float_list`)."""
    return (validate.int_list if cast is int else validate.float_list)(str(text or "").replace(";", ","), name)


def parse_head(text: str, info: ModelInfo) -> Head:
    """Exactly one head ('L18H6' or '18.6'), checked against the model."""
    heads = parse_heads(text, info)
    if len(heads) != 1:
        raise ValueError(f"Give exactly one head (e.g. 'L18H6'); got {len(heads)}.")
    return heads[0]


def parse_ks(text: str, info: ModelInfo) -> list[int]:
    """Parse '1, 2, 4, 8' into sorted distinct k values a top-k vs random-k curve can use (`validate.curve_ks`)."""
    ks = validate.int_list(str(text or "").replace(";", ","), "k values", example="1, 2, 4, 8")
    return sorted(set(validate.curve_ks(ks, info, "k values")))


# --- server files ------------------------------------------------------------------------------

BUILTIN_MODELS = ("embedded", "embedded-refusal")
# A Hugging Face repository id: 'gpt2' or 'org/name', word characters, '.', '-' (huggingface_hub's rule).
MAX_HUB_NAME = 96
_HUB_NAME = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?)?")


@dataclass(frozen=True)
class FileAccess:
    """Which server files the app may read for whoever uses it.

    Uploaded files always. A typed path only when it resolves (symlinks followed) inside `files_dir`.
    The Model field also loads built-in and Hugging Face names; a local model folder only inside
    `files_dir`, or anywhere when there is no `files_dir` and the app is not `remote` (one user on
    their own machine, as before). Refusals read the same whether or not the path exists.
    """

    files_dir: Path | None = None
    remote: bool = False

    def __post_init__(self):
        object.__setattr__(self, "files_dir", validate.files_dir(self.files_dir))

    @property
    def any_folder(self) -> bool:
        """Whether the Model field may load a local folder anywhere (loopback, no files_dir)."""
        return self.files_dir is None and not self.remote

    def inside(self, text: str) -> Path | None:
        """`text` (relative to `files_dir`, or absolute) resolved, when it stays inside `files_dir`; else None."""
        if self.files_dir is None or not text:
            return None
        try:
            path = (self.files_dir / text).resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
            return None
        return path if path.is_relative_to(self.files_dir) else None

    def user_file(self, typed: str, upload: str | None, builtins: Iterable[str], what: str) -> str:
        """What a haystack or dataset input names: the uploaded file first, else a built-in name, else a
        file inside `files_dir`. `ValueError` for anything else, the same for existing and missing paths."""
        if upload:
            return str(upload)
        typed, builtins = (typed or "").strip(), tuple(builtins)
        if typed in builtins:
            return typed
        path = self.inside(typed)
        if path is None:
            names = " or ".join(repr(name) for name in builtins if name)
            if self.files_dir is None:
                raise ValueError(f"The {what} {typed!r} is refused: use {names} or upload a file (typed paths are off; "
                                 "start the app with a files folder, --files-dir, to allow some).")
            raise ValueError(f"The {what} {typed!r} is refused: use {names}, upload a file, or give a path inside the app's files folder.")
        if not path.is_file():
            raise ValueError(f"No file {typed!r} in the app's files folder: upload the {what} or check the name.")
        return str(path)

    def model_source(self, typed: str) -> str:
        """What `hl.load` may be given for the Model field's `typed`: a built-in or hub name, or a folder (a name
        that is a folder inside `files_dir` loads that folder). `ModelLoadError` (`model_refused`) otherwise."""
        if typed in BUILTIN_MODELS or self.any_folder:
            return typed
        folder = self.inside(typed)
        if folder is not None and folder.is_dir():
            return str(folder)
        # A hub name must not also name a server path (relative to the working directory): hl.load and
        # transformers would load that folder instead.
        if len(typed) <= MAX_HUB_NAME and _HUB_NAME.fullmatch(typed) and ".." not in typed and not Path(typed).exists():
            return typed
        raise self.model_refused(typed)

    def model_refused(self, typed: str) -> ModelLoadError:
        """The one message for a model this app will not or cannot load: it never says whether a path exists."""
        folders = "a folder inside the app's files folder" if self.files_dir is not None else (
            "no local folder (start the app with a files folder, --files-dir, to allow some)")
        return ModelLoadError(
            f"Could not load {typed!r}: load 'embedded', a Hugging Face model this server can fetch or finds in its "
            f"cache (such as 'gpt2' or 'Qwen/Qwen2.5-0.5B'), or {folders}."
        )


# Quoted values in a message (Python reprs, backslash escapes included) and the ones safe to show.
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
_FIELD_NAMES = {"question", "options", "answer", "category", "A", "B", "C", "D", "E", "F", "a", "b", "c", "d", "e", "f"}


def without_file_text(message: str, file_name: str) -> str:
    """`message` about the user file `file_name` ('name line 3: ...') with every quoted value other than a field
    name hidden."""
    if message.startswith(file_name):
        message = "Your file" + message[len(file_name):]

    def hide(match: re.Match) -> str:
        return match.group(0) if match.group(0)[1:-1] in _FIELD_NAMES else "(a value from the file)"

    return _QUOTED.sub(hide, message)


@contextlib.contextmanager
def hiding_file_text(path: str | None) -> Iterator[None]:
    """Within it, errors about the user file at `path` (a bad row, header or encoding) become `ValueError`s naming the
    line and the problem without echoing the file's text (no row, header or cell). Other errors pass unchanged."""
    if not path or not Path(path).is_file():
        yield
        return
    name = Path(path).name
    try:
        yield
    except UnicodeDecodeError as err:
        raise ValueError(f"Your file is not UTF-8 text (byte {err.start} cannot be read): save it as UTF-8.") from None
    except csv.Error as err:
        raise ValueError(f"Your file is not a readable CSV ({without_file_text(str(err), name)}).") from None
    except ValueError as err:
        if not str(err).startswith(name):  # not about the file's contents (those messages start with its name)
            raise
        raise ValueError(without_file_text(str(err), name)) from None
