"""`Workbench`: the one loaded model the app works on, and where its stored runs are looked up.

Plain Python on top of `headlab` (no gradio). Tabs call library functions with `bench.lab`; the
workbench only loads models, describes the current one, and finds stored runs without computing.
Long actions take a `progress(fraction, message)` callback. The app runs one job at a time, so the
workbench needs no locking of its own. `files` (an `app.inputs.FileAccess`) says which server files and
model folders the app's inputs may read.
"""
from pathlib import Path
from typing import Callable

import headlab as hl
from app.inputs import BUILTIN_MODELS, FileAccess
from headlab import store

Progress = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    """The default progress callback: report nothing."""


class Workbench:
    """Holds the current `Lab`; a failed `load` leaves it unchanged."""

    def __init__(self, lab: hl.Lab, files: FileAccess | None = None):
        self.lab = lab
        self.files = files if files is not None else FileAccess()
        self.loads = 0  # successful `load` calls, so the UI can tell that the model changed

    @property
    def info(self) -> hl.ModelInfo:
        return self.lab.info

    def load(self, name_or_path: str, progress: Progress = _no_progress) -> hl.Lab:
        """Load a model and make it current. Raises `hl.ModelLoadError`; the previous model stays.

        Only what `self.files` allows is loaded; a refused path and a missing one get the same message.
        """
        name_or_path = (name_or_path or "").strip()
        if not name_or_path:
            raise ValueError("Type a model: 'embedded', a Hugging Face name such as 'gpt2', or a local folder.")
        source = self.files.model_source(name_or_path)
        progress(0.0, f"loading {name_or_path}")
        try:
            lab = hl.load(source)
        except hl.ModelLoadError as err:
            # Outside the open mode, a hub name that cannot be fetched gets the refusal's words, so the
            # message cannot tell a path refused above from a name the hub does not know.
            hub_name = source == name_or_path and source not in BUILTIN_MODELS
            if hub_name and not self.files.any_folder and isinstance(err.__cause__, OSError):
                raise self.files.model_refused(name_or_path) from err
            raise
        self.lab = lab
        self.loads += 1
        progress(1.0, f"loaded {lab.info.name}")
        return lab

    def model_summary(self) -> str:
        lab = self.lab
        return (
            f"Current model: **{lab.info.name}** ({lab.info.architecture}, {lab.info.n_layers} layers × "
            f"{lab.info.n_heads} heads, {lab.info.n_kv_heads} KV heads) on {lab.device}, {str(lab.dtype).removeprefix('torch.')}."
        )

    def stored_scores(self, kind: str, newest: bool = False, **params) -> hl.HeadScores | None:
        """The stored run of `kind` with `params` for the current model (`hl.stored`), computing nothing.

        With `newest`, a missing exact run falls back to the newest stored run of `kind` on the default
        prompts. None when there is none (or `kind` is not a score kind).
        """
        if kind not in hl.kinds():
            return None
        exact = hl.stored(self.lab, kind, **params)
        if exact is not None or not newest:
            return exact
        runs = [
            run for run in store.list_runs()
            if run["model"] == self.info.slug and run["record"] == "head_scores" and run["kind"] == kind
            and not run["params"].get("prompts")
        ]
        if not runs:
            return None
        return hl.HeadScores.load(max(runs, key=lambda run: Path(run["path"]).stat().st_mtime)["path"])
