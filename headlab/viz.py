"""Attention-pattern views with CircuitsVis, rendered from the JS bundled in the package (no network)."""
from __future__ import annotations

import html
import re

from headlab.activations import attention_pattern
from headlab.heads import check_head, check_layer, head_label
from headlab.lab import Lab

MAX_VIEW_TOKENS = 512
# CircuitsVis draws a head selector and a square zoomed pattern about as wide as its 960 px column.
PATTERN_VIEW_HEIGHT = 1250


def attention_view_html(lab: Lab, prompt: str, layer: int, heads: list[int] | None = None) -> str:
    """A standalone HTML document showing the attention of `heads` (default: all) of `layer` on `prompt`.

    The first head in `heads` is the one CircuitsVis shows selected.
    """
    from circuitsvis.attention import attention_heads

    layer = check_layer(lab.info, layer)
    tokens = lab.to_tokens(prompt)
    if tokens.shape[1] > MAX_VIEW_TOKENS:
        raise ValueError(f"The prompt is {tokens.shape[1]} tokens; the pattern view shows at most {MAX_VIEW_TOKENS}.")
    pattern = attention_pattern(lab, tokens, layer)  # [head, q, k]
    heads = list(range(lab.info.n_heads)) if heads is None else heads
    heads = [check_head(lab.info, layer, h)[1] for h in heads]
    view = attention_heads(
        attention=pattern[heads],
        tokens=lab.to_str_tokens(tokens),
        attention_head_names=[head_label(layer, h) for h in heads],
    )
    # `local_src` inlines the bundled JS; `_repr_html_` would probe the network first.
    body = view.local_src
    return f"<!doctype html><html><head><meta charset='utf-8'></head><body>{body}</body></html>"


def head_pattern_view(lab: Lab, prompt: str, layer: int, head: int, *, whole_layer: bool = True,
                      height: int = PATTERN_VIEW_HEIGHT) -> str:
    """An `<iframe>` showing head `L{layer}H{head}` on `prompt`, selected first (with `whole_layer`, the
    other heads of its layer follow)."""
    layer, head = check_head(lab.info, check_layer(lab.info, layer), head)
    if not (prompt or "").strip():
        raise ValueError("Type a prompt to see the attention pattern on it.")
    others = [h for h in range(lab.info.n_heads) if h != head] if whole_layer else []
    return iframe(attention_view_html(lab, prompt, layer, heads=[head, *others]), height=height)


def iframe(document: str, height: int = 620) -> str:
    """Wrap an HTML document in an `<iframe srcdoc>` so hosts that strip scripts (gr.HTML) still run it."""
    return (
        f'<iframe srcdoc="{html.escape(document, quote=True)}" '
        f'style="width:100%;height:{height}px;border:0" sandbox="allow-scripts"></iframe>'
    )


def head_heatmap(
    values,
    title: str,
    colorbar_title: str,
    *,
    x: list | None = None,
    y: list | None = None,
    x_title: str = "head",
    y_title: str = "layer",
    hovertemplate: str | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    height: int | None = None,
) -> "go.Figure":
    """The one plotly heatmap of per-head values: `values` `[n_layers, n_heads]` (tensor or array), layer 0 at the bottom.

    `x`/`y` default to head and layer indices; the hover text names the head `L%{y}H%{x}`. Callers with
    other axes (e.g. sender/receiver head labels) pass their own `x`, `y`, titles and `hovertemplate`.
    """
    import plotly.graph_objects as go

    z = values.numpy() if hasattr(values, "numpy") else values
    n_rows, n_cols = len(z), len(z[0]) if len(z) else 0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x if x is not None else list(range(n_cols)),
            y=y if y is not None else list(range(n_rows)),
            colorscale="Viridis",
            zmin=zmin,
            zmax=zmax,
            colorbar={"title": colorbar_title},
            hoverongaps=False,
            hovertemplate=hovertemplate or "L%{y}H%{x}<br>score %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title=y_title,
        height=height or max(360, 18 * n_rows + 120),
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    for axis, labels in (("x", x), ("y", y)):
        if labels is not None and len(labels) > MAX_HEAD_TICKS and all(_HEAD_LABEL.fullmatch(str(label)) for label in labels):
            layer_bands(fig, axis, list(labels))
    return fig


MAX_HEAD_TICKS = 40  # an axis of more head labels (`L18H6`) than this is ticked per layer instead
_HEAD_LABEL = re.compile(r"L(\d+)H\d+")


def layer_bands(fig, axis: str, labels: list[str]) -> None:
    """Tick a categorical axis of head labels once per layer (`L18` at the layer's first head) and draw a thin line
    between layers: 270 head names cannot be read, 30 layer bands can. Hover still names every head."""
    layers = [int(_HEAD_LABEL.fullmatch(label).group(1)) for label in labels]
    starts = [i for i, layer in enumerate(layers) if i == 0 or layer != layers[i - 1]]
    fig.update_layout({f"{axis}axis": {"tickmode": "array", "tickvals": [labels[i] for i in starts],
                                       "ticktext": [f"L{layers[i]}" for i in starts], "type": "category"}})
    other = "y" if axis == "x" else "x"
    for i in starts[1:]:
        fig.add_shape(type="line", layer="above", line={"color": "rgba(255,255,255,0.6)", "width": 0.6},
                      **{f"{axis}ref": axis, f"{axis}0": i - 0.5, f"{axis}1": i - 0.5, f"{other}ref": "paper", f"{other}0": 0, f"{other}1": 1})


def curve_figure(curve) -> "go.Figure":
    """Plotly figure of an `AblationCurve`: the metric vs k for top-k (line) and random-k (mean ± std band, each set a dot)."""
    import plotly.graph_objects as go

    mean, std = curve.random_mean, curve.random_std
    fig = go.Figure()
    # The band is an area between two invisible lines (mode "lines": plotly's default adds markers that read as
    # data points); a one-k curve has no area to fill, so its ± std is an error bar on the mean instead.
    band = len(curve.ks) > 1
    if band:
        fig.add_trace(go.Scatter(x=curve.ks, y=[m + s for m, s in zip(mean, std)], mode="lines", line={"width": 0},
                                 showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=curve.ks, y=[m - s for m, s in zip(mean, std)], mode="lines", fill="tonexty",
                                 line={"width": 0}, fillcolor="rgba(120,120,120,0.25)", name="random-k ± std", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=curve.ks, y=mean, mode="lines+markers", line={"color": "grey"},
                             error_y=None if band else {"type": "data", "array": std, "visible": True},
                             name="random-k mean" + ("" if band else " ± std")))
    xs = [k for k, r in zip(curve.ks, curve.random) for _ in r]
    ys = [v for r in curve.random for v in r]
    sets = [", ".join(head_label(*head) for head in heads) for per_k in curve.random_heads for heads in per_k]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker={"color": "grey", "size": 5, "opacity": 0.6}, name="random-k sets",
                             text=sets if len(sets) == len(ys) else None,
                             hovertemplate="k=%{x}: %{y:.3f}<br>%{text}<extra>random set</extra>" if len(sets) == len(ys) else None))
    fig.add_trace(go.Scatter(x=curve.ks, y=curve.top, mode="lines+markers", line={"color": "crimson", "width": 3}, name=f"top-k {curve.scores['kind']}"))
    fig.add_hline(y=curve.baseline, line_dash="dot", annotation_text="intact")
    fig.update_layout(
        title=f"{curve.method}-ablating top-k {curve.scores['kind']} heads vs random heads — {curve.model}",
        xaxis_title="k (heads ablated)",
        yaxis_title=curve.metric,
        xaxis={"type": "log", "tickvals": curve.ks},
        height=420,
    )
    return fig
