"""View pieces every tab shares: readable tables with a CSV download, a result's JSON record offered for download
(`result_json` for a result with `save(path)`, `record_json` for one without), and linked views: a per-head heatmap
whose cell click (or a table row, or a typed head) outlines that head on it and says what the heatmap holds for it
beside it, then shows the tab's own view of that head (`link_heads`); on a pair map (head labels on both axes) a click
picks a (sender, receiver) pair, whose cell `outline_pair` outlines.

The link reads the heatmap the visitor sees (gradio sends a `gr.Plot` input as its plotly JSON), not the store: what
it says about a head is exactly what is drawn, for a stored run or one just computed, and it needs no model. The
click itself is `app.page.PAGE_JS`'s (one listener for every `CLICKABLE` heatmap).
"""
from __future__ import annotations

import base64
import json
import re
import tempfile
from pathlib import Path
from typing import Sequence

import gradio as gr
import numpy as np
import pandas as pd
from gradio.components.plot import PlotData

from app.feedback import READ_EVENT, current_session, reads_store, selected_row
from app.inputs import parse_head
from app.page import CLICKABLE, clicked_head
from headlab import store
from headlab.heads import Head, head_label, parse_heads

TABLE = {"max_height": 460, "wrap": True, "buttons": ["fullscreen", "copy"]}
DIGITS = 4
EMPTY = "(no result yet: press the button above)"
_DOWNLOADS = Path(tempfile.mkdtemp(prefix="headlab-app-downloads-"))


def rounded(frame: pd.DataFrame | None, digits: int = DIGITS) -> pd.DataFrame | None:
    """`frame` with its float columns rounded for reading (the CSV download keeps these values)."""
    if not isinstance(frame, pd.DataFrame):
        return frame
    floats = [column for column in frame.columns if pd.api.types.is_float_dtype(frame[column])]
    # float64 first: a rounded float32 (0.068) is shown as its nearest float64 (0.0680000036954878)
    return frame.astype({column: "float64" for column in floats}).round({column: digits for column in floats})


OUTLINE = "headlab-outline"  # the name of the shape that outlines the chosen head


def _rect(x0: float, x1: float, y0: float, y1: float) -> dict:
    """The outline shape (named `OUTLINE`) of the rectangle x0..x1, y0..y1 in the first subplot's data coordinates."""
    return {"type": "rect", "name": OUTLINE, "x0": x0, "x1": x1, "y0": y0, "y1": y1, "line": {"color": "#ff2d55", "width": 3}}


def _outline(head: Head, trace: dict) -> dict:
    """The rectangle around `head` on a heatmap `trace`: its cell on a layer x head grid, or its row when the rows
    are heads (`L18H6` labels on y, e.g. the Sinks head x domain matrix)."""
    layer, index = head
    rows = trace.get("y")
    if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], str):
        row = list(rows).index(head_label(layer, index))
        return _rect(-0.5, len(trace.get("x") or [0]) - 0.5, row - 0.5, row + 0.5)
    return _rect(index - 0.5, index + 0.5, layer - 0.5, layer + 0.5)


def _pair_outline(sender: Head, receiver: Head, trace: dict) -> dict:
    """The rectangle around the (sender, receiver) cell of a pair map `trace` (head labels on both axes, senders on y)."""
    column, row = list(trace["x"]).index(head_label(*receiver)), list(trace["y"]).index(head_label(*sender))
    return _rect(column - 0.5, column + 0.5, row - 0.5, row + 0.5)


def highlighted(figure, head: Head):
    """`figure` (a `head_heatmap`: heads on x, layers on y, or head rows) with `head` outlined (and no other)."""
    figure.layout.shapes = [shape for shape in figure.layout.shapes if shape.name != OUTLINE]
    figure.add_shape(**_outline(head, figure.data[0].to_plotly_json()))
    return figure


def _array(value) -> np.ndarray:
    """A plotly JSON array (a nested list, or the `{dtype, bdata, shape}` plotly packs numbers into) as numpy."""
    if isinstance(value, dict) and "bdata" in value:
        shape = [int(part) for part in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape)
    return np.array(value, dtype=float)


def head_details(values, head: Head, what: str, more: str = "") -> str:
    """One line on `head` from per-head `values` `[layer, head]`: its value and rank among all heads (NaN: unranked)."""
    values = np.asarray(values, dtype=float)
    value = values[head]
    finite = values[np.isfinite(values)]
    rank = f", rank {int((finite > value).sum()) + 1} of {finite.size}" if np.isfinite(value) else ""
    return f"**{head_label(*head)}**: {what} {value:.3f}{rank}.{' ' + more if more else ''}"


def _heatmap_details(trace: dict, head: Head) -> str:
    """What a heatmap trace holds for `head`: its cell (value, rank) or, for head rows, its row per column."""
    z, what = _array(trace["z"]), ((trace.get("colorbar") or {}).get("title") or {}).get("text", "value")
    rows = trace.get("y")
    if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], str):
        row = z[list(rows).index(head_label(*head))]
        return f"**{head_label(*head)}**, {what}: " + " · ".join(f"{column} {value:.3f}" for column, value in zip(trace["x"], row))
    return head_details(z, head, what)


def _plot_json(value) -> dict | None:
    """The plotly figure of a `gr.Plot` input (gradio's `PlotData`, or its dict from an API client), or None."""
    plot = getattr(value, "plot", None) or (value.get("plot") if isinstance(value, dict) else None)
    return json.loads(plot) if isinstance(plot, str) else None


def _with_outline(figure: dict, shape: dict) -> PlotData:
    """A plotly figure (JSON) with `shape` as its only outline, as a `gr.Plot` value."""
    layout = figure.setdefault("layout", {})
    layout["shapes"] = [kept for kept in layout.get("shapes", []) if kept.get("name") != OUTLINE] + [shape]
    return PlotData(type="plotly", plot=json.dumps(figure))


def focus(plot, head_text: str) -> tuple:
    """A head chosen on a linked heatmap: (the heatmap with it outlined, its label, what the heatmap holds for it)."""
    bench, _ = current_session()
    head = parse_head(head_text, bench.info) if bench is not None else parse_heads(head_text)[0]
    figure = _plot_json(plot)
    if figure is None or not figure.get("data"):
        return gr.skip(), head_label(*head), f"**{head_label(*head)}** (no heatmap shown yet)."
    trace = figure["data"][0]
    try:
        details = _heatmap_details(trace, head)
    except (ValueError, IndexError):
        raise ValueError(f"{head_label(*head)} is not on this heatmap.") from None
    return _with_outline(figure, _outline(head, trace)), head_label(*head), details


def outlined(plot, head_text: str):
    """The heatmap with the head outlined (`focus` without its words): another heatmap of the same heads."""
    return focus(plot, head_text)[0]


def outline_pair(plot, sender: Head, receiver: Head):
    """A pair map (a `gr.Plot` value) with the (sender, receiver) cell outlined; skip when no map is shown."""
    figure = _plot_json(plot)
    if figure is None or not figure.get("data"):
        return gr.skip()
    try:
        return _with_outline(figure, _pair_outline(sender, receiver, figure["data"][0]))
    except (ValueError, KeyError):
        raise ValueError(f"{head_label(*sender)} → {head_label(*receiver)} is not on this map: widen its layers.") from None


def clickable_heatmap(label: str, elem_id: str, **kw) -> tuple[gr.Plot, gr.Textbox]:
    """A per-head heatmap whose cells can be clicked, and the hidden box `PAGE_JS` writes the clicked head into."""
    plot = gr.Plot(label=f"{label} — click a cell", elem_id=elem_id, elem_classes=[CLICKABLE], **kw)
    return plot, gr.Textbox(visible="hidden", elem_id=f"{elem_id}-click")


def heatmap_with_top(prefix: str, heatmap_label: str, table_label: str) -> dict:
    """The usual linked layout in a row: a `clickable_heatmap` (`{prefix}-heatmap`) and beside it the head box,
    the details line, the top table (`{prefix}-top`) and the run's JSON download. Returns the components by name
    (heatmap, clicked, head, details, top, download); wire them with `link_heads`."""
    with gr.Row():
        with gr.Column(scale=3):
            heatmap, clicked = clickable_heatmap(heatmap_label, f"{prefix}-heatmap")
        with gr.Column(scale=2):
            head = gr.Textbox(head_label(0, 0), label="head (L18H6 or 18.6)", elem_id=f"{prefix}-head")
            details = gr.Markdown(elem_id=f"{prefix}-details")
            top = table(label=f"{table_label} — click a row", elem_id=f"{prefix}-top")
            download = json_button(f"{prefix}-json", "⬇ JSON of this run")
    return dict(heatmap=heatmap, clicked=clicked, head=head, details=details, top=top, download=download)


def picked_head(frame: pd.DataFrame, evt: gr.SelectData):
    """The `head` cell of the clicked table row (skip for a header or an empty table)."""
    row = selected_row(frame, evt)
    return gr.skip() if row is None or "head" not in row else str(row["head"])


def link_heads(heatmap: gr.Plot, clicked: gr.Textbox, head: gr.Textbox, details: gr.Markdown, *,
               tables: Sequence[gr.Dataframe] = (), then: Sequence[dict] = (),
               also: Sequence[tuple[gr.Plot, gr.Textbox]] = (), api_name: str | None = None):
    """Link a `clickable_heatmap` to a head box: a cell click, a row of one of `tables` (its `head` column) or a head
    typed (Enter) outlines that head on the heatmap and writes what it holds into `details`, then runs the events
    `then` (the tab's own view of the head, e.g. its pattern) one after another. `also`: more `clickable_heatmap`s
    (plot, clicked) of the same heads: a click on one chooses the head too, and each outlines it. Returns
    `follow(dependency)`, which chains the same after any event that sets the head box (e.g. a table with more
    columns to read)."""
    focus_event = dict(fn=reads_store(focus), inputs=[heatmap, head], outputs=[heatmap, head, details], **READ_EVENT)
    views = [dict(fn=reads_store(outlined), inputs=[plot, head], outputs=[plot], **READ_EVENT) for plot, _ in also] + list(then)

    def follow(dependency, named: bool = False):
        event = dependency.success(**focus_event, **({"api_name": api_name} if named and api_name else {"api_visibility": "private"}))
        for view in views:
            event = event.success(api_visibility="private", **view)
        return event

    follow(clicked.change(clicked_head, inputs=[clicked], outputs=[head], api_visibility="private", **READ_EVENT), named=True)
    for _, other in also:
        follow(other.change(clicked_head, inputs=[other], outputs=[head], api_visibility="private", **READ_EVENT))
    for frame in tables:
        follow(frame.select(picked_head, inputs=[frame], outputs=[head], api_visibility="private", **READ_EVENT))
    follow(head.submit(lambda text: text, inputs=[head], outputs=[head], api_visibility="private", **READ_EVENT))
    return follow


def _download_path(name: str, suffix: str) -> Path:
    folder = Path(tempfile.mkdtemp(dir=_DOWNLOADS))
    return folder / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") + suffix)


def frame_csv(frame, name: str) -> str | None:
    """The table as a CSV file to download (None for an empty table)."""
    if not isinstance(frame, pd.DataFrame) or frame.empty:
        return None
    path = _download_path(name, ".csv")
    frame.to_csv(path, index=False)
    return str(path)


def frame_records(frame: pd.DataFrame) -> list[dict]:
    """A table's rows as JSON-ready dicts (numpy numbers as Python's, NaN as None), for a `record_json`."""
    return json.loads(frame.to_json(orient="records", double_precision=15))


def record_json(record: dict, name: str) -> str:
    """A result that has no `save(path)` (a single ablation, a live measurement) as one JSON file to download: `record`,
    written atomically (NaN and infinities as null) into a fresh folder of the downloads folder."""
    path = _download_path(name, ".json")
    store.write_json(path, record)
    return str(path)


MAX_EMBEDDED = 2_000_000  # numbers of raw tensors written into a download; beyond, they are left out (and named)


def result_json(result, name: str) -> str | None:
    """A result (`HeadScores`, `AblationCurve`, `ModelDiff`, ... anything with `save(path)`) as one self-contained JSON
    file to download: its record, with the tensors the store keeps in a safetensors file (the record's `*_file` key)
    written in as nested lists under `"tensors"` (up to `MAX_EMBEDDED` numbers each; larger ones are named under
    `"tensors_left_out"`). None for no result."""
    if result is None:
        return None
    path = Path(result.save(_download_path(name, ".json")))
    record = json.loads(path.read_text())
    files = [key for key, value in record.items() if key.endswith("_file") and (value is None or str(value).endswith(".safetensors"))]
    tensors = {}
    for key in files:
        if record.get(key):
            tensors.update(store.read_tensors(path.parent / record[key]))
        del record[key]
    if tensors:
        record["tensors"] = {key: store.strict_json(t.float().tolist()) if t.is_floating_point() else t.tolist()
                             for key, t in tensors.items() if t.numel() <= MAX_EMBEDDED}
        record["tensors_left_out"] = sorted(set(tensors) - set(record["tensors"]))
    path.write_text(json.dumps(record))
    return str(path)


def json_button(elem_id: str, label: str = "⬇ JSON of this result") -> gr.DownloadButton:
    """The download of a result's JSON record (`result_json`), next to its view."""
    return gr.DownloadButton(label, size="sm", elem_id=elem_id)


def table(value=None, *, label: str, elem_id: str, scale: int | None = None, **kw) -> gr.Dataframe:
    """A read-only, rounded (`rounded`), scrollable table with a "CSV" download button under it that follows its contents
    (same arguments as `gr.Dataframe`)."""
    kw.pop("interactive", None)
    value = pd.DataFrame(columns=[EMPTY]) if value is None else value  # not gradio's placeholder headers "1 2 3"
    with gr.Column(scale=scale or 1, min_width=kw.pop("min_width", 160)):
        frame = gr.Dataframe(rounded(value), label=label, interactive=False, elem_id=elem_id, **{**TABLE, **kw})
        # Float columns are rounded for reading whatever the handler returns (an instance override: a subclass
        # of a gradio component makes gradio write a .pyi stub beside this module).
        frame.postprocess = lambda shown, show=frame.postprocess: show(rounded(shown))
        button = gr.DownloadButton("⬇ CSV", value=frame_csv(value, elem_id), size="sm", elem_id=f"{elem_id}-csv")
    frame.change(lambda shown: frame_csv(shown, elem_id), inputs=[frame], outputs=[button], api_visibility="private", **READ_EVENT)
    return frame
