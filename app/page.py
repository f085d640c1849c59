"""What the page itself does in the browser: the JavaScript that links heatmap clicks to head inputs and keeps
the address bar in step with the tab, score kind and head (so a link opens "L18H6 on the induction tab"), marks
results that no longer answer the form as stale, the glossary of terms of art, and the CSS that keeps tables and
titles readable.

`gr.Plot` has no click event, so a heatmap made clickable (`CLICKABLE` class) gets a plotly `plotly_click`
listener that writes the clicked head (`L{layer}H{head}`) into the hidden textbox `#{plot id}-click` and fires its
`input` DOM event (gradio then fires the textbox's `change`); the value is `L18H6@<time>`, new on every click, and
`clicked_head` reads the head back out of it; the Python side then shows that head. On a pair map (head labels on
both axes: senders on y, receivers on x) the click is the pair, `L16H0>L18H6@<time>` (`clicked_pair`); a point that
is no head (e.g. the MLP column of a weight-change map) writes nothing.

Stale results (`wire_staleness`, `STALE_HEAD`): every event's result components remember the form inputs they were
computed from (when the event succeeds); when the visitor changes one of those inputs, or a job meant to replace them
fails, they are dimmed under a "stale: ..." note until an event computes them again. An event also notes, when it
starts, how often each of its inputs had been edited; a result that arrives after one of them was edited meanwhile
answers the earlier inputs and is marked stale at once. Plain DOM classes: nothing of it goes to the server.
"""
from __future__ import annotations

import json

import gradio as gr

CLICKABLE = "head-heatmap"
STALE = "headlab-stale"
CHANGED = "inputs changed since this result: press its button again"
FAILED = "the last run failed: this is an earlier result"
EDITED_WHILE_RUNNING = "inputs changed while it ran: press its button again"
# Components that show a result, and those a visitor fills in.
RESULT_TYPES = (gr.Plot, gr.Dataframe, gr.Markdown, gr.HTML)
FORM_TYPES = (gr.Number, gr.Textbox, gr.Dropdown, gr.Radio, gr.Checkbox, gr.CheckboxGroup, gr.Slider, gr.File)

# Defined in the page's <head>, before any event can call it.
STALE_HEAD = """<script>
(() => {
  const computedFrom = {};  // result element id -> ids of the form inputs it was computed from
  const edits = {};         // form input id -> how many times the visitor has changed it
  const startedWith = {};   // event id -> its inputs' edit counts when it last started
  const editsOf = (asked) => asked.map((id) => edits[id] || 0).join(",");
  const mark = (id, reason) => {
    const element = document.getElementById(id);
    if (!element) return;
    element.classList.toggle("%(stale)s", Boolean(reason));
    if (reason) element.setAttribute("data-stale", reason); else element.removeAttribute("data-stale");
  };
  window.headlabStarted = (event, asked) => { startedWith[event] = editsOf(asked); };
  window.headlabFresh = (shown, asked, event) => {
    const edited = event in startedWith && startedWith[event] !== editsOf(asked);
    shown.forEach((id) => {
      computedFrom[id] = new Set([...(computedFrom[id] || []), ...asked]);
      mark(id, edited ? %(edited)s : null);
    });
  };
  window.headlabFailed = (shown) => shown.forEach((id) => { if (computedFrom[id]) mark(id, %(failed)s); });
  window.headlabChanged = (input) => {
    edits[input] = (edits[input] || 0) + 1;
    Object.entries(computedFrom).forEach(([id, inputs]) => { if (inputs.has(input)) mark(id, %(changed)s); });
  };
})();
</script>""" % {"stale": STALE, "failed": json.dumps(FAILED), "changed": json.dumps(CHANGED), "edited": json.dumps(EDITED_WHILE_RUNNING)}

PAGE_JS = """
() => {
  const setParam = (key, value) => {
    const url = new URL(window.location.href);
    if (value) url.searchParams.set(key, value); else url.searchParams.delete(key);
    window.history.replaceState(null, "", url);
  };
  window.headlabSetParam = setParam;
  const bind = () => {
    document.querySelectorAll(".%(clickable)s").forEach((container) => {
      const plot = container.querySelector(".js-plotly-plot");
      if (!plot || !plot.on) return;
      if (plot.removeAllListeners) plot.removeAllListeners("plotly_click");
      plot.on("plotly_click", (event) => {
        const point = event && event.points && event.points[0];
        const box = document.querySelector("#" + container.id + "-click textarea, #" + container.id + "-click input");
        if (!point || !box) return;
        // A layer x head grid has layers on y and heads on x; a heatmap of head rows has the head's label on y; a pair
        // map has head labels on both axes (sender on y, receiver on x) and its click is the pair.
        const isHead = (value) => /^L\\d+H\\d+$/.test(String(value));
        const picked = isHead(point.y) ? (isHead(point.x) ? point.y + ">" + point.x : point.y) : "L" + point.y + "H" + point.x;
        if (!/^L\\d+H\\d+(>L\\d+H\\d+)?$/.test(picked)) return;  // no head (e.g. the MLP column of a weight-change map)
        box.value = picked + "@" + Date.now();  // a new value even for the same cell again
        box.dispatchEvent(new Event("input", { bubbles: true }));
      });
    });
  };
  // A new job clears the error toasts of earlier ones, so errors do not pile up.
  document.addEventListener("click", (event) => {
    if (event.target.closest("button.primary, button.secondary")) {
      document.querySelectorAll(".toast-close").forEach((close) => close.click());
    }
  }, true);
  let timer = null;
  // Throttled, not debounced: a page whose views keep arriving must still get its listeners.
  new MutationObserver(() => { if (!timer) timer = setTimeout(() => { timer = null; bind(); }, 200); })
    .observe(document.body, { childList: true, subtree: true });
  bind();
}
""" % {"clickable": CLICKABLE}


def clicked_head(value: str) -> str:
    """The head of a heatmap click written by `PAGE_JS` (`L18H6@1733400000000` -> `L18H6`)."""
    return (value or "").split("@")[0]


def clicked_pair(value: str) -> tuple[str, str]:
    """The (sender, receiver) of a pair-map click (`L16H0>L18H6@1733400000000` -> ('L16H0', 'L18H6')); the receiver
    is empty for a click that is one head."""
    sender, _, receiver = clicked_head(value).partition(">")
    return sender, receiver


def edited_js(*elem_ids: str) -> str:
    """JS for an event that fills form inputs for the visitor (e.g. a click on a map): the results computed from
    `elem_ids` are marked stale, as after the visitor's own edit; the event's one input passes on unchanged."""
    calls = " ".join(f"window.headlabChanged({json.dumps(elem_id)});" for elem_id in elem_ids)
    return f"(value) => {{ if (window.headlabChanged) {{ {calls} }} return value; }}"


def set_param_js(key: str) -> str:
    """JS for an event: write the event's first input into the address bar's `key` parameter."""
    return f"(value) => {{ if (window.headlabSetParam) window.headlabSetParam({key!r}, value); return value; }}"


def set_tab_js(tab_id: str) -> str:
    return f"() => {{ if (window.headlabSetParam) window.headlabSetParam('tab', {tab_id!r}); }}"


GLOSSARY = """<details id="glossary"><summary>Glossary</summary>

**Head** `L18H6`: layer 18, head 6 (inputs also take `18.6`). **Ablate**: replace a head's output (`mean`: by its
average over a reference batch; `zero`: by 0) and measure a task. **Top-k vs random-k**: ablate the k best heads of a
score and random k-head sets drawn from the other heads; a real mechanism hurts far more than random heads.
**Ships** (Zhou et al. 2024): KL divergence of the next-token distribution on harmful requests with a head's attention
flattened. **scaled_query**: that flattening (the head's query scaled by ε, so its attention becomes uniform).
**Dormancy**: a head parks ≥ half its attention on the first token (the sink) and writes little. **z_vs_random**: how
many standard deviations a composition score lies above random matrices of the same shapes. **hf_full**: the Hugging
Face model with its full KV cache (the baseline); **hf_static**: the same in a static cache; **compressed**: headlab's
runtime with the head mask. **kl_vs_full**: KL divergence of the next-token distribution from the full cache's, on
prose. **KV head**: with grouped-query attention several query heads share one key/value head; memory is per KV head.
</details>"""

def _ids(components, types: tuple) -> list[str]:
    """The element ids of the visible `components` of `types` (components without an id are not tracked)."""
    return [c.elem_id for c in components if isinstance(c, types) and c.elem_id and c.visible not in (False, "hidden")]


def _tracked(fn) -> tuple[list[str], list[str]] | None:
    """(form input ids, result ids) of an event whose results answer its form inputs; None for one that computes no
    result (or reads a shown result, e.g. outlining a head on its heatmap, which recomputes nothing)."""
    asked = _ids(fn.inputs, FORM_TYPES)
    shown = [elem_id for elem_id in _ids(fn.outputs, RESULT_TYPES) if elem_id not in asked]
    if fn.fn is None or not shown or any(isinstance(c, RESULT_TYPES) for c in fn.inputs):
        return None
    return asked, shown


def _notes_start(fn, asked: list[str]) -> None:
    """Make the event `fn` tell the page when it starts (`headlabStarted`: its inputs' edit counts then). An event's
    `js` runs in the page before the call and returns the inputs the call gets: the event's own `js` is wrapped, or
    one that passes the inputs on is added."""
    note = f"if (window.headlabStarted) window.headlabStarted({fn._id}, {json.dumps(asked)});"
    if isinstance(fn.js, str) and fn.js.strip():
        fn.js = f"(...args) => {{ {note} return ({fn.js})(...args); }}"
    elif not fn.js:
        fn.js = f"(...args) => {{ {note} return args.slice(0, {len(fn.inputs)}); }}"


def _watch(watched: dict[str, gr.components.Component]) -> None:
    """Tell the page whenever the visitor edits one of the `watched` inputs (`headlabChanged`)."""
    for elem_id, component in watched.items():
        changed = f"() => {{ if (window.headlabChanged) window.headlabChanged({json.dumps(elem_id)}); }}"
        for event in ("input", "upload", "clear"):
            if hasattr(component, event):
                getattr(component, event)(None, js=changed)


def wire_staleness(demo: gr.Blocks, jobs: str) -> None:
    """Mark stale results (see the module docstring) for every event of `demo` built so far; `jobs` is the concurrency
    group of the jobs whose failure leaves an earlier result on screen. Call inside `with demo:` after all tabs.

    (Deviation: gradio has no public way to chain onto an event from its `BlockFunction`, so the `Dependency` it
    returns is rebuilt from the function's id, as gradio itself builds it; and the note at an event's start is its
    `BlockFunction.js`, set before the app is served.)"""
    from gradio.events import Dependency

    watched: dict[str, gr.components.Component] = {}
    for fn in list(demo.fns.values()):
        tracked = _tracked(fn)
        if tracked is None:
            continue
        asked, shown = tracked
        watched.update({c.elem_id: c for c in fn.inputs if c.elem_id in asked})
        _notes_start(fn, asked)
        dependency = Dependency(None, {}, fn._id, fn.fn)
        dependency.success(None, js=f"() => {{ if (window.headlabFresh) window.headlabFresh({json.dumps(shown)}, {json.dumps(asked)}, {fn._id}); }}")
        if fn.concurrency_id == jobs:
            dependency.failure(None, js=f"() => {{ if (window.headlabFailed) window.headlabFailed({json.dumps(shown)}); }}")
    _watch(watched)


CSS = """
#model-bar { padding: 4px 0; }
.gradio-container .table-wrap, .gradio-container table { font-variant-numeric: tabular-nums; }
.gradio-container .plot-container { min-height: 0; }
.%(stale)s { opacity: 0.45; outline: 2px dashed #d97706; outline-offset: 2px; }
.%(stale)s::before { content: "stale: " attr(data-stale); display: block; padding: 2px 6px; font-weight: 600; color: #92400e; }
/* Gradio covers a failed event's outputs with an opaque "Error" badge; on a stale result the note says so instead
   and the earlier result stays visible, dimmed (the error itself is in the toast). */
.%(stale)s .wrap:has(.error) { background: transparent !important; pointer-events: none; }
.%(stale)s .wrap .error { display: none !important; }
""" % {"stale": STALE}
