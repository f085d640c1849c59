"""`Workbench`: which model each visitor works on, and the job that runs on it now.

Plain Python on top of `headlab` (no gradio). The app holds one `Workbench`: a shared `ModelPool` of loaded
models, and per visitor session the pool key of the model that visitor chose (the launch model until they load
another). A handler runs bound to its session (`bind`, done by `app.feedback`): inside it `bench.lab` is that
visitor's `Lab`, and for a job the model's lock is held, so hooks added by one job never reach another job on
the same model. `bench.progress(fraction, message)` reports progress; `watch` also counts the forward passes a
job makes (real movement where the library reports none) and stops the job at its next forward pass once the
visitor presses Cancel (`cancel`). `files` (an `app.inputs.FileAccess`) says which server files the inputs read.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

import headlab as hl
from app.inputs import FileAccess
from app.pool import Entry, ModelPool
from headlab import store

Progress = Callable[[float, str], None]
MAX_SESSIONS = 10_000  # visitors remembered; the oldest forget their choice and get the launch model back
REPORT_SECONDS = 0.2  # forward-pass counts are reported at most this often


class JobCancelled(Exception):
    """The visitor pressed Cancel: raised inside the job at its next forward pass or progress report."""


def _no_progress(fraction: float, message: str) -> None:
    """The default progress callback: report nothing."""


@dataclass
class Job:
    """What one running handler is bound to: the model entry, the session's cancel flag and the progress sink."""

    entry: Entry
    cancelled: threading.Event
    report: Callable[[float | None, str, int], None] = lambda fraction, message, forwards: None
    fraction: float | None = None
    message: str = ""
    forwards: int = 0
    last_report: float = field(default=0.0)

    def progress(self, fraction: float, message: str) -> None:
        """A library progress callback: remembered, shown, and a point where Cancel takes effect."""
        if self.cancelled.is_set():
            raise JobCancelled("Cancelled.")
        self.fraction, self.message = float(fraction), message
        self.report(self.fraction, self.message, self.forwards)

    def forward(self) -> None:
        """One forward pass of the model (a pre-hook): count it, report it now and then, stop if cancelled."""
        if self.cancelled.is_set():
            raise JobCancelled("Cancelled.")
        self.forwards += 1
        now = time.monotonic()
        if now - self.last_report >= REPORT_SECONDS:
            self.last_report = now
            self.report(self.fraction, self.message, self.forwards)


_BOUND: ContextVar[Job | None] = ContextVar("headlab_app_job", default=None)


@contextlib.contextmanager
def watch(lab: hl.Lab, job: Job) -> Iterator[None]:
    """While inside, every linear layer of `lab`'s model checks the cancel flag, and its last block's last linear
    layer counts forward passes (pre-hooks, removed on exit; the weights are untouched)."""
    model = getattr(lab.model, "original_model", lab.model)
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]

    def check(module, args):
        if job.cancelled.is_set():
            raise JobCancelled("Cancelled.")

    handles = [module.register_forward_pre_hook(check) for module in linears]
    if len(linears) > 1:  # the last linear layer before the unembedding runs once per forward pass
        handles.append(linears[-2].register_forward_pre_hook(lambda module, args: job.forward()))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Workbench:
    """The model pool, each visitor session's model choice, and the model bound to the running handler."""

    def __init__(self, lab: hl.Lab, files: FileAccess | None = None, *, pool: ModelPool | None = None,
                 default: str = "embedded"):
        self.pool = pool if pool is not None else ModelPool(files)
        self.files = self.pool.files
        self.default = default
        self.pool.add(default, lab, pinned=True)
        self._choices: OrderedDict[str, str] = OrderedDict()  # session -> pool key
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.loads = 0  # successful `load` calls

    # --- what a visitor chose -------------------------------------------------------------------------
    def model_key(self, session: str | None) -> str:
        with self._lock:
            return self._choices.get(session or "", self.default)

    def choose(self, session: str | None, key: str) -> None:
        if not session:
            return
        with self._lock:
            self._choices[session] = key
            self._choices.move_to_end(session)
            while len(self._choices) > MAX_SESSIONS:
                self._choices.popitem(last=False)

    def forget(self, session: str | None) -> None:
        """A visitor left: drop their choice and cancel flag."""
        with self._lock:
            self._choices.pop(session or "", None)
            self._cancels.pop(session or "", None)

    def cancel_flag(self, session: str | None) -> threading.Event:
        with self._lock:
            return self._cancels.setdefault(session or "", threading.Event())

    def cancel(self, session: str | None) -> None:
        """Stop the visitor's running job at its next forward pass or progress report."""
        self.cancel_flag(session).set()

    def load(self, name_or_path: str, session: str | None = None, progress: Progress = _no_progress) -> hl.Lab:
        """Load a model into the pool (or find it there) and make it `session`'s model. Raises `hl.ModelLoadError`
        (or `ValueError` for an empty name); the visitor's previous model stays. Only what `files` allows loads."""
        name_or_path = (name_or_path or "").strip()
        if not name_or_path:
            raise ValueError("Type a model: 'embedded', a Hugging Face name such as 'gpt2', or a local folder.")
        progress(0.0, f"loading {name_or_path}")
        entry = self.pool.get(name_or_path)
        self.choose(session, name_or_path)
        self.loads += 1
        progress(1.0, f"loaded {entry.lab.info.name}")
        return entry.lab

    # --- the handler now running ----------------------------------------------------------------------
    @contextlib.contextmanager
    def bind(self, session: str | None, job: bool, report: Callable[[float | None, str, int], None] | None = None) -> Iterator[Job]:
        """Run the body on `session`'s model: `bench.lab` is it. A `job` holds the model's lock (waiting for a job
        of another visitor on the same model), counts forward passes and can be cancelled; a read only reads."""
        entry = self.pool.get(self.model_key(session))
        flag = self.cancel_flag(session)
        bound = Job(entry, flag, report) if report else Job(entry, flag)
        with contextlib.ExitStack() as stack:
            if job:
                stack.enter_context(entry.lock)
                flag.clear()  # a Cancel pressed before this job started was for an earlier one
                stack.enter_context(watch(entry.lab, bound))
            token = _BOUND.set(bound)
            try:
                yield bound
            finally:
                _BOUND.reset(token)

    @property
    def lab(self) -> hl.Lab:
        """The running handler's model (the visitor's choice); outside a handler, the launch model."""
        bound = _BOUND.get()
        return bound.entry.lab if bound is not None else self.pool.get(self.default).lab

    @property
    def info(self) -> hl.ModelInfo:
        return self.lab.info

    def progress(self, fraction: float, message: str) -> None:
        """Report progress of the running job (and stop it here if the visitor cancelled)."""
        bound = _BOUND.get()
        if bound is not None:
            bound.progress(fraction, message)

    def model_summary(self) -> str:
        lab = self.lab
        return (
            f"Model: **{lab.info.name}** ({lab.info.architecture}, {lab.info.n_layers} layers × "
            f"{lab.info.n_heads} heads, {lab.info.n_kv_heads} KV heads) on {lab.device}, {str(lab.dtype).removeprefix('torch.')}."
        )

    # --- stored results, computing nothing ------------------------------------------------------------
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
        path = self.newest_run("head_scores", kind, lambda params: not params.get("prompts"))
        return hl.HeadScores.load(path) if path else None

    def newest_run(self, record: str, kind: str, accept: Callable[[dict], bool] = lambda params: True) -> Path | None:
        """The newest stored record of type `record` (head_scores, ablation_curve, ...) and `kind` for the current
        model whose params `accept`, or None: the user's results before the shipped ones."""
        runs = [run for run in store.list_runs()
                if run["model"] == self.info.slug and run["record"] == record and run["kind"] == kind and accept(run["params"])]
        if not runs:
            return None
        return Path(max(runs, key=lambda run: (run.get("where") != "shipped", Path(run["path"]).stat().st_mtime))["path"])

    def stored_curve(self, scores: hl.HeadScores):
        """The newest stored top-k vs random-k curve (`AblationCurve`) made from `scores`' run, or None."""
        from headlab.ablation.curve import AblationCurve

        source = {"kind": scores.kind, "params": scores.params}
        path = self.newest_run("ablation_curve", scores.kind, lambda params: params.get("scores") == source)
        return AblationCurve.load(path) if path else None
