"""The Ablate tab: knock out chosen heads and measure a task; compare top-k heads of a score with random k-head sets.

The form's defaults are the library's (`CurveConfig()`, `DEFAULT_METHOD`), and its method parameter
fields are generated from the registered ablation methods' dataclass fields: one number per
(method, parameter), so a new method class appears here without editing the app. Results come from
`hl.ablate` / `hl.ablation_curve` and are shown through their own `summary()`, `to_frame()`, `figure()`; each
downloads as JSON (the single ablation as its record, `ablation_record`).
"""
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.atlas_tab import MAX_N, AtlasTab, run_params
from app.feedback import READ_EVENT, progress_to, reads_store, shows_errors
from app.inputs import check_count, format_heads, parse_heads, parse_ks
from app.workbench import Workbench
from app.views import json_button, record_json, result_json, table
from headlab.ablation import METHODS, AblationResult, method_fields
from headlab.ablation.curve import DEFAULTS, AblationCurve
from headlab.ablation.methods import DEFAULT_METHOD
from headlab.heads import head_label

DEFAULT_HEADS = [(18, 6), (17, 3)]  # two induction heads of the embedded model
RESULT_COLUMNS = ["task", "method", "heads", "intact", "ablated", "damage"]  # AblationResult.to_frame's
CURVE_COLUMNS = ["k", "top_k", "random_mean", "random_std", "random_min", "random_max", "baseline"]  # AblationCurve.to_frame's
SET_COLUMNS = ["k", "set", "heads", "value"]  # AblationCurve.sets_frame's
DEFAULT_K = 4
MAX_N_RANDOM = 50
MethodField = tuple[str, str]  # (method name, parameter name)


def method_field_keys() -> list[MethodField]:
    """Every (method, parameter) pair of the registered ablation methods, methods in name order."""
    return [(name, field) for name in sorted(METHODS) for field in method_fields(name)]


def field_argument(key: MethodField) -> str:
    """The handler argument (and API parameter) name of a method field: 'streaming_window_sink'."""
    return f"{key[0]}_{key[1]}"


def chosen_method_params(method: str, values: dict[MethodField, float | None]) -> dict:
    """The form's values of `method`'s own fields (whole numbers where the default is one); the method checks them."""
    params = {}
    for (name, field), value in values.items():
        if name != method:
            continue
        if value is None or value != value:
            raise ValueError(f"Fill in {field} ({name}).")
        whole = isinstance(method_fields(name)[field], int) and float(value) == int(value)
        params[field] = int(value) if whole else value
    return params


def takes_method_fields(handler: Callable, fixed: list[str]) -> Callable:
    """`handler(*fixed, method_values, progress=...)` as a gradio handler whose inputs are the `fixed` ones,
    then one per method field (named by `field_argument`, defaulting to the field's default), then progress."""
    keys = method_field_keys()

    def handle(*args):
        values = dict(zip(keys, args[len(fixed):len(fixed) + len(keys)]))
        return handler(*args[:len(fixed)], values, progress=args[-1])

    arg = inspect.Parameter
    handle.__signature__ = inspect.Signature(
        [arg(name, arg.POSITIONAL_OR_KEYWORD) for name in fixed]
        + [arg(field_argument(key), arg.POSITIONAL_OR_KEYWORD, default=method_fields(key[0])[key[1]]) for key in keys]
        + [arg("progress", arg.POSITIONAL_OR_KEYWORD, default=gr.Progress())]
    )
    handle.__name__ = handler.__name__
    return shows_errors(handle)


@dataclass
class AblateTab:
    heads: gr.Textbox
    kind: gr.Dropdown
    k: gr.Number
    fill_button: gr.Button
    task: gr.Dropdown
    method: gr.Radio
    task_n: gr.Number
    method_fields: list[gr.Number]  # one per `method_field_keys()`, in that order
    ablate_button: gr.Button
    summary: gr.Markdown
    result: gr.Dataframe
    result_download: gr.DownloadButton  # the single ablation, as JSON
    ks: gr.Textbox
    n_random: gr.Number
    curve_button: gr.Button
    curve_status: gr.Markdown
    curve_plot: gr.Plot
    curve_table: gr.Dataframe
    curve_sets: gr.Dataframe
    curve_download: gr.DownloadButton
    first_view: Callable | None = None  # set by the wiring: the stored curve of the chosen kind and the form's heads

    @property
    def first_inputs(self) -> list:
        return [self.kind]

    @property
    def first_outputs(self) -> list:
        return [self.curve_plot, self.curve_table, self.curve_status, self.curve_sets, self.curve_download, self.summary]


def layout_method_fields() -> list[gr.Number]:
    """One number per (method, parameter), labelled with the method, holding the parameter's default."""
    numbers = []
    for name, field in method_field_keys():
        default = method_fields(name)[field]
        numbers.append(gr.Number(
            default, precision=0 if isinstance(default, int) else None, label=f"{field} ({name})",
            elem_id=f"ablate-{name}-{field}".replace("_", "-"),
        ))
    return numbers


def layout_ablate_form(atlas: AtlasTab) -> dict:
    """The heads, task and method inputs and the single-ablation outputs, by `AblateTab` field name."""
    kinds, tasks, methods = hl.kinds(), hl.task_names(), sorted(METHODS)
    gr.Markdown(
        "Type heads as `L18H6` or `18.6`, separated by commas, or fill in the top-k heads of a score kind. "
        "Scores use the **n** and **seed** of the Head atlas tab (stored runs are reused)."
    )
    with gr.Row():
        heads = gr.Textbox(format_heads(DEFAULT_HEADS), label="Heads to ablate", scale=3, elem_id="ablate-heads")
        kind = gr.Dropdown(kinds, value=atlas.kind.value, label="Score kind", scale=1, elem_id="ablate-kind")
        k = gr.Number(DEFAULT_K, precision=0, label="k", scale=1, elem_id="ablate-k")
        fill_button = gr.Button("Fill top-k heads", scale=1, elem_id="ablate-fill")
    with gr.Row():
        task = gr.Dropdown(tasks, value=DEFAULTS.task if DEFAULTS.task in tasks else tasks[0], label="Task", elem_id="ablate-task")
        method = gr.Radio(methods, value=DEFAULT_METHOD, label="Method", elem_id="ablate-method")
        task_n = gr.Number(DEFAULTS.n, precision=0, label="task samples (n)", elem_id="ablate-n")
        ablate_button = gr.Button("Ablate", variant="primary", elem_id="ablate-run")
    with gr.Row():
        numbers = layout_method_fields()
    summary = gr.Markdown(label="ablation summary", elem_id="ablate-summary")
    result = table(pd.DataFrame(columns=RESULT_COLUMNS), label="Metric intact vs ablated", elem_id="ablate-result")
    result_download = json_button("ablate-json", "⬇ JSON of this ablation")
    return dict(heads=heads, kind=kind, k=k, fill_button=fill_button, task=task, method=method, task_n=task_n,
                method_fields=numbers, ablate_button=ablate_button, summary=summary, result=result,
                result_download=result_download)


def layout_curve_section() -> dict:
    """The top-k vs random-k inputs and outputs, by `AblateTab` field name."""
    gr.Markdown("### Top-k vs random-k\nFor each k: ablate the top-k heads of the score kind above, then `n random` random k-head sets from the other heads.")
    with gr.Row():
        ks = gr.Textbox(", ".join(str(k) for k in DEFAULTS.ks), label="k values", elem_id="curve-ks")
        n_random = gr.Number(DEFAULTS.n_random, precision=0, label="n random sets per k", elem_id="curve-n-random")
        curve_button = gr.Button("Run top-k vs random-k", variant="primary", elem_id="curve-run")
    curve_status = gr.Markdown(label="curve summary", elem_id="curve-status")
    with gr.Row():
        with gr.Column(scale=1):
            curve_plot = gr.Plot(label="Ablation curve", elem_id="curve-plot")
        with gr.Column(scale=1):
            curve_table = table(pd.DataFrame(columns=CURVE_COLUMNS), label="Curve values", elem_id="curve-table")
    curve_sets = table(pd.DataFrame(columns=SET_COLUMNS), label="Every head set ablated (top-k and each random set)", elem_id="curve-sets")
    curve_download = gr.DownloadButton("⬇ JSON of this curve", size="sm", elem_id="curve-json")
    return dict(ks=ks, n_random=n_random, curve_button=curve_button, curve_status=curve_status,
                curve_plot=curve_plot, curve_table=curve_table, curve_sets=curve_sets, curve_download=curve_download)


def layout(atlas: AtlasTab) -> AblateTab:
    return AblateTab(**layout_ablate_form(atlas), **layout_curve_section())


def ablation_record(result: AblationResult, model: str, n: int) -> dict:
    """A single ablation as a JSON record: the model, the task (and its n samples), the method and its parameters,
    the heads (`L18H6`) and the metric intact (`baseline`), ablated and the damage."""
    fields = dataclasses.asdict(result)
    return {"record": "ablation_result", "model": model, **fields, "heads": [head_label(*head) for head in result.heads],
            "n": n, "damage": result.damage}


def ablate_view(bench: Workbench, heads_text: str, task: str, method: str, n: float, values: dict, progress) -> tuple:
    """(summary, table, JSON) of ablating the typed heads."""
    heads = parse_heads(heads_text, bench.info)
    n = check_count(n, "task samples (n)", 1, MAX_N)
    params = chosen_method_params(method, values)
    progress(0.0, f"{method}-ablating {len(heads)} heads on {task}")
    result = hl.ablate(bench.lab, heads, task=task, method=method, n=n, method_params=params)
    return result.summary(bench.info.name), result.to_frame(), record_json(ablation_record(result, bench.info.name, n), "ablation")


def curve_view(bench: Workbench, kind: str, score_n: float, score_seed: float, task: str, ks_text: str, method: str,
               n_random: float, n: float, values: dict, progress) -> tuple:
    """(figure, table, summary) of the top-k vs random-k curve the form describes."""
    ks = parse_ks(ks_text, bench.info)
    n_random = check_count(n_random, "n random sets per k", 1, MAX_N_RANDOM)
    n = check_count(n, "task samples (n)", 1, MAX_N)
    params = chosen_method_params(method, values)
    scores = hl.score(bench.lab, kind, **run_params(kind, score_n, score_seed))
    curve = hl.ablation_curve(bench.lab, scores, task=task, ks=ks, method=method, n_random=n_random, n=n,
                              method_params=params, progress=progress)
    return curve.figure(), curve.to_frame(), curve.summary(), curve.sets_frame(), result_json(curve, "ablation-curve")


def stored_curve_view(bench: Workbench, kind: str) -> tuple:
    """(figure, table, summary, sets, ablation hint) of the newest stored top-k vs random-k curve of `kind`, computing nothing."""
    hint = "Press **Ablate** to ablate the heads above on the task (seconds)."
    path = bench.newest_run("ablation_curve", kind)
    if path is None:
        empty = pd.DataFrame(columns=CURVE_COLUMNS), f"No stored **{kind}** curve for {bench.info.name}: press **Run top-k vs random-k**."
        return None, *empty, pd.DataFrame(columns=SET_COLUMNS), None, hint
    curve = AblationCurve.load(path)
    return curve.figure(), curve.to_frame(), f"{curve.summary()} (stored run)", curve.sets_frame(), result_json(curve, "ablation-curve"), hint


def wire(tab: AblateTab, bench: Workbench, atlas: AtlasTab, concurrency_id: str) -> AblateTab:
    @shows_errors
    def fill_top_heads(kind: str, k: float, n: float, seed: float) -> str:
        k = check_count(k, "k", 1, bench.info.n_layers * bench.info.n_heads)
        return format_heads(hl.score(bench.lab, kind, **run_params(kind, n, seed)).top_heads(k))

    def ablate(heads_text, task, method, n, values, progress):
        return ablate_view(bench, heads_text, task, method, n, values, progress_to(progress))

    def ablation_curve(kind, score_n, score_seed, task, ks_text, method, n_random, n, values, progress):
        return curve_view(bench, kind, score_n, score_seed, task, ks_text, method, n_random, n, values, progress_to(progress))

    lab_job = {"concurrency_id": concurrency_id}
    tab.fill_button.click(
        fill_top_heads, inputs=[tab.kind, tab.k, atlas.n, atlas.seed], outputs=[tab.heads], api_name="top_heads", **lab_job
    )
    tab.ablate_button.click(
        takes_method_fields(ablate, ["heads_text", "task", "method", "n"]),
        inputs=[tab.heads, tab.task, tab.method, tab.task_n, *tab.method_fields], outputs=[tab.summary, tab.result, tab.result_download],
        api_name="ablate", **lab_job,
    )
    curve_fixed = ["kind", "score_n", "score_seed", "task", "ks_text", "method", "n_random", "n"]
    tab.curve_button.click(
        takes_method_fields(ablation_curve, curve_fixed),
        inputs=[tab.kind, atlas.n, atlas.seed, tab.task, tab.ks, tab.method, tab.n_random, tab.task_n, *tab.method_fields],
        outputs=[tab.curve_plot, tab.curve_table, tab.curve_status, tab.curve_sets, tab.curve_download], api_name="ablation_curve", **lab_job,
    )
    tab.kind.input(reads_store(lambda kind: stored_curve_view(bench, kind)[:-1]), inputs=[tab.kind], api_visibility="private",
                   outputs=[tab.curve_plot, tab.curve_table, tab.curve_status, tab.curve_sets, tab.curve_download], **READ_EVENT)
    tab.first_view = lambda kind: stored_curve_view(bench, kind)  # bound to the visitor by main's reads_store
    return tab


def build_ablate_tab(bench: Workbench, atlas: AtlasTab, concurrency_id: str) -> AblateTab:
    return wire(layout(atlas), bench, atlas, concurrency_id)
