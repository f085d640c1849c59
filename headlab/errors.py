"""Which errors mean "bad input or unavailable resource", and the one-line message a user sees for them."""
from __future__ import annotations

import json

import torch
from safetensors import SafetensorError

from headlab.lab import PromptTooLongError
from headlab.loading import ModelLoadError

# Errors that describe what the user asked for (a bad name, head, prompt, size or file) or a resource that is
# not there (a package, a folder, permission, memory): show the message alone, no traceback.
# OSError covers FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError and a full disk;
# ImportError a missing optional package (kvpress); SafetensorError a damaged or foreign .safetensors file.
EXPECTED_ERRORS = (
    ModelLoadError, PromptTooLongError, ValueError, KeyError, TypeError, OSError, ImportError, SafetensorError,
    torch.OutOfMemoryError,
)

OOM_HINT = (
    "The GPU ran out of memory. Use fewer samples (n), shorter prompts or a smaller model, "
    "or load with dtype='bfloat16'."
)


def _os_message(err: OSError) -> str:
    if not err.strerror:  # raised with a message of ours, e.g. FileNotFoundError("No head mask at ...")
        return str(err)
    where = f": {err.filename}" if err.filename else ""
    hint = " (choose a path you may write, or fix its permissions)" if isinstance(err, PermissionError) else ""
    return f"{err.strerror}{where}{hint}"


def user_message(err: BaseException) -> str:
    """What to tell the user about `err`, on one line: the message of an expected error, else its type and message."""
    if isinstance(err, torch.OutOfMemoryError):
        message = f"{OOM_HINT} ({str(err).splitlines()[0] if str(err) else 'out of memory'})"
    elif isinstance(err, KeyError) and err.args:
        message = str(err.args[0])  # str(KeyError) adds quotes
    elif isinstance(err, json.JSONDecodeError):
        message = f"A file is not valid JSON ({err})."
    elif isinstance(err, SafetensorError):
        message = f"A .safetensors file is damaged or not a safetensors file ({err})."
    elif isinstance(err, OSError):
        message = _os_message(err)
    elif isinstance(err, ModuleNotFoundError) and err.name and "install" not in str(err):
        message = f"{err}: install it with pip install {err.name.split('.')[0]}."
    elif isinstance(err, EXPECTED_ERRORS):
        message = str(err)
    else:
        message = f"{type(err).__name__}: {err}"
    return " ".join(message.split()) or type(err).__name__
