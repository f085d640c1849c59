"""Ablate any set of heads and measure a task; top-k vs random-k curves prove a score is causal.

    hl.ablate(lab, heads=s.top(5), task="passkey", method="zero")
    hl.ablate(lab, heads, method=StreamingWindow(sink=4, recent=64))     # or method="streaming_window", method_params=...
    hl.ablation_curve(lab, s, task="repeated_tokens", ks=[1, 2, 4, 8])

Modules: `methods` (what "remove a head" means: zero, mean, streaming_window, scaled_query, one
class each), `engine` (`ablation_hooks`, the one public path from heads + method to hooks; `ablate`),
`curve` (top-k vs random-k).
"""
from headlab.ablation.curve import AblationCurve, CurveConfig, ablation_curve
from headlab.ablation.engine import AblationResult, ablate, ablation_hooks, method_state
from headlab.ablation.methods import (
    DEFAULT_METHOD, METHODS, AblationMethod, Mean, ScaledQuery, StreamingWindow, Zero, make_method, method_fields,
    streaming_window_allowed,
)

__all__ = [
    "AblationCurve", "AblationMethod", "AblationResult", "CurveConfig", "DEFAULT_METHOD", "METHODS", "Mean",
    "ScaledQuery", "StreamingWindow", "Zero", "ablate", "ablation_curve", "ablation_hooks", "make_method",
    "method_fields", "method_state", "streaming_window_allowed",
]
