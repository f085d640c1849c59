"""How event handlers run and report back to the UI.

`shows_errors` (jobs) and `reads_store` (light reads) wrap every handler: they find the app's `Workbench` and the
visitor's session from gradio's event context, bind the handler to that visitor's model (`Workbench.bind`), and
turn exceptions into a short `gr.Error` (the UI and API clients see the message, the app lives on). A job also
holds its model's lock, shows real progress (the library's fractions and the forward passes counted so far) and
stops when the visitor presses Cancel. Event settings: `JOB_EVENT` puts an event in the one job queue (visible
queue position), `READ_EVENT` in a group of its own with no limit, so reading stored results never waits behind a job.
"""
from __future__ import annotations

import functools
from typing import Callable

import gradio as gr
from gradio.context import LocalContext

from app.workbench import JobCancelled, Progress, Workbench
from headlab.errors import EXPECTED_ERRORS, user_message

ERROR_SECONDS = 12  # short, so errors of earlier jobs do not pile up
JOBS = "jobs"  # the concurrency group of every event that computes on a model
READS = "reads"
JOB_EVENT = {"concurrency_id": JOBS}
READ_EVENT = {"concurrency_id": READS, "concurrency_limit": None, "show_progress": "minimal"}
ATTRIBUTE = "headlab_bench"  # the Blocks attribute holding the app's Workbench


def attach(demo: gr.Blocks, bench: Workbench) -> None:
    """Let the handlers of `demo` find `bench`."""
    setattr(demo, ATTRIBUTE, bench)


def current_session() -> tuple[Workbench | None, str | None]:
    """The app's `Workbench` and the visitor's session id of the event being handled (None, None outside one)."""
    blocks, request = LocalContext.blocks.get(None), LocalContext.request.get(None)
    root = getattr(blocks, "root_block", blocks)
    bench = getattr(blocks, ATTRIBUTE, None) or getattr(root, ATTRIBUTE, None)
    return bench, getattr(request, "session_hash", None)


def _bar(fraction: float | None, message: str, forwards: int) -> None:
    """Drive gradio's progress bar of the running event: the library's fraction when it gives one, and the
    forward passes run so far (a count: most scorers do not know their total)."""
    passes = f"{forwards} forward passes" if forwards else ""
    desc = " · ".join(part for part in (message, passes) if part) or "working"
    if fraction is None:
        gr.Progress()((forwards, None), desc=desc, unit="forward passes")
    else:
        gr.Progress()(min(max(fraction, 0.0), 1.0), desc=desc)


def _runs_bound(handler: Callable, job: bool) -> Callable:
    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        bench, session = current_session()
        try:
            if bench is None:  # called directly (not from an event): no visitor to bind
                return handler(*args, **kwargs)
            with bench.bind(session, job=job, report=_bar if job else None):
                return handler(*args, **kwargs)
        except gr.Error:
            raise
        except JobCancelled:
            raise gr.Error("Cancelled: the job stopped; nothing was stored.", duration=ERROR_SECONDS, print_exception=False)
        except Exception as err:
            raise gr.Error(
                user_message(err), duration=ERROR_SECONDS, print_exception=not isinstance(err, EXPECTED_ERRORS)
            ) from err

    return wrapped


def shows_errors(handler: Callable) -> Callable:
    """Decorator for a job: bound to the visitor's model (its lock held), progress shown, cancellable, errors shown."""
    return _runs_bound(handler, job=True)


def reads_store(handler: Callable) -> Callable:
    """Decorator for a light read (stored results, the current model's facts): bound to the visitor's model without
    its lock, so it never waits for a job; it must not run the model."""
    return _runs_bound(handler, job=False)


def progress_to(progress: gr.Progress) -> Progress:
    """A library `progress(fraction, message)` callback for the running job: the workbench's (counts forward
    passes, honours Cancel), shown on `progress` (gradio's bar)."""
    bench, _ = current_session()
    if bench is not None:
        return bench.progress

    def report(fraction: float, message: str) -> None:
        progress(fraction, desc=message)

    return report


def selected_row(table, evt: gr.SelectData):
    """The clicked row of a `gr.Dataframe` (a pandas Series), or None for a header click or an empty table."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    return table.iloc[row] if isinstance(row, int) and 0 <= row < len(table) else None
