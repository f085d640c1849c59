"""How event handlers report back to the UI: exceptions become `gr.Error` (the UI and API clients see
the message, the app lives on) and workbench progress callbacks drive `gr.Progress`."""
import functools
from typing import Callable

import gradio as gr

from app.workbench import Progress
from headlab.errors import EXPECTED_ERRORS, user_message

ERROR_SECONDS = 30


def shows_errors(handler: Callable) -> Callable:
    """Decorator: re-raise any exception from `handler` as a `gr.Error` carrying its message."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:
            raise gr.Error(
                user_message(err), duration=ERROR_SECONDS, print_exception=not isinstance(err, EXPECTED_ERRORS)
            ) from err

    return wrapped


def progress_to(progress: gr.Progress) -> Progress:
    """A workbench `progress(fraction, message)` callback that drives gradio's progress bar."""

    def report(fraction: float, message: str) -> None:
        progress(fraction, desc=message)

    return report


def selected_row(table, evt: gr.SelectData):
    """The clicked row of a `gr.Dataframe` (a pandas Series), or None for a header click or an empty table."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    return table.iloc[row] if isinstance(row, int) and 0 <= row < len(table) else None
