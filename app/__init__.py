"""The headlab Gradio app. Start it with `headlab app` or `from app.main import launch; launch()`.

The app is a view: each tab reads its form defaults from the library's definitions (scorer fields,
`CurveConfig`, ablation-method fields, `MaskConfig`), calls one library function per button, and shows
the result's own `summary()`, `to_frame()` and `figure()`. Nothing here ranks, samples or tabulates.

Modules: `main` (Blocks and launch), one module per tab (`*_tab`, each a layout function and a wiring
function), `workbench` (the current model and its stored runs, no gradio), `inputs` (parsing what users
type), `feedback` (exceptions to `gr.Error`, progress to `gr.Progress`, the clicked table row).
"""
