"""Form pieces several tabs share (gradio components only; the defaults come from the library's configs)."""
from dataclasses import dataclass

import gradio as gr

from app.views import json_button, table

from headlab.ablation.curve import CurveConfig
from headlab.ablation.methods import parameterless_methods


@dataclass
class CheckForm:
    """A behavioural check (top-k vs random-k heads ablated): its inputs, its button and its result."""

    k: gr.Number
    n_random: gr.Number
    task_n: gr.Number
    method: gr.Dropdown
    button: gr.Button
    summary: gr.Markdown
    plot: gr.Plot
    table: gr.Dataframe
    download: gr.DownloadButton  # the check's curve as JSON

    @property
    def inputs(self) -> list:
        return [self.k, self.n_random, self.task_n, self.method]

    @property
    def outputs(self) -> list:
        return [self.summary, self.plot, self.table, self.download]


def check_form(check: CurveConfig, prefix: str, task_label: str, button_label: str, table_label: str) -> CheckForm:
    """The check's components, defaults from `check` (a tab's `CurveConfig`); element ids `{prefix}-k`,
    `{prefix}-check`, `{prefix}-check-plot`, ... for the tests."""
    with gr.Row():
        k = gr.Number(check.ks[0], precision=0, label="k (heads ablated)", elem_id=f"{prefix}-k")
        n_random = gr.Number(check.n_random, precision=0, label="random sets", elem_id=f"{prefix}-n-random")
        task_n = gr.Number(check.n, precision=0, label=task_label, elem_id=f"{prefix}-task-n")
        method = gr.Dropdown(parameterless_methods(), value=check.method, label="ablation", elem_id=f"{prefix}-method")
        button = gr.Button(button_label, variant="primary", elem_id=f"{prefix}-check")
    summary = gr.Markdown(elem_id=f"{prefix}-check-summary")
    with gr.Row():
        plot = gr.Plot(label="top-k vs random-k", elem_id=f"{prefix}-check-plot")
        with gr.Column():
            check_table = table(label=table_label, elem_id=f"{prefix}-check-table")
            download = json_button(f"{prefix}-check-json", "⬇ JSON of this check")
    return CheckForm(k, n_random, task_n, method, button, summary, plot, check_table, download)
