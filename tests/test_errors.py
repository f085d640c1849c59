"""What a user reads when something goes wrong that is not a bug."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import SafetensorError

from headlab import cli, store
from headlab.errors import EXPECTED_ERRORS, user_message
from headlab.validate import KVPRESS_HINT


def test_gpu_out_of_memory_reads_as_advice():
    message = user_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "ran out of memory" in message and "fewer samples" in message and "2.00 GiB" in message
    assert user_message(KeyError("Unknown task 'x'.")) == "Unknown task 'x'."


@pytest.mark.parametrize("error, expected", [
    (PermissionError(13, "Permission denied", "/results/x.json"), "Permission denied: /results/x.json (choose a path"),
    (IsADirectoryError(21, "Is a directory", "/results"), "Is a directory: /results"),
    (FileNotFoundError("No head mask at m.json: give a .json file or a DuoAttention folder."), "No head mask at m.json"),
    (json.JSONDecodeError("Expecting value", "{x", 1), "not valid JSON (Expecting value: line 1 column 2 (char 1))"),
    (SafetensorError("Error while deserializing header: HeaderTooLarge"), "damaged or not a safetensors file"),
    (ImportError(KVPRESS_HINT), "pip install kvpress"),
    (ModuleNotFoundError("No module named 'kvpress'", name="kvpress"), "install it with pip install kvpress"),
    (ValueError("first line\nsecond line"), "first line second line"),
])
def test_every_expected_error_is_one_line_with_no_traceback(error, expected, monkeypatch, capsys):
    assert isinstance(error, EXPECTED_ERRORS) and expected in user_message(error)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(store, "list_runs", fail)  # `headlab runs` reads the store through it
    assert cli.main(["runs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("headlab: error: ") and expected in err and "Traceback" not in err


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    monkeypatch.setattr(store, "list_runs", lambda *args, **kwargs: [][1])
    with pytest.raises(IndexError):
        cli.main(["runs"])
