"""headlab: what does each attention head do, and which ones can we cut?

    import headlab as hl
    lab = hl.load("embedded")
    s = hl.score(lab, "induction"); s.top(5); s.heatmap()
    hl.ablation_curve(lab, s, task="repeated_tokens", ks=[1, 2, 4, 8])
"""
from headlab.ablation import AblationCurve, AblationResult, ablate, ablation_curve
from headlab.circuits import ChannelExperiment, ChannelReport, CompositionMap, channel_experiment, channels, composition_map
from headlab.lab import Lab, ModelInfo, PromptTooLongError
from headlab.loading import ModelLoadError, load
from headlab.masks import HeadMask
from headlab.heads import Head
from headlab.scorers import kinds, score, stored
from headlab.scores import HeadScores
from headlab.tasks import Task, make_task, task_names

__all__ = [
    "AblationCurve", "AblationMethod", "AblationResult", "Head", "ChannelExperiment", "ChannelReport", "CompositionMap", "HeadMask",
    "HeadScores", "Lab", "ModelInfo", "ModelLoadError", "PromptTooLongError", "Task", "ablate",
    "ablation_curve", "channel_experiment", "channels", "composition_map", "kinds", "load", "make_method", "make_task",
    "score", "stored", "task_names",
]
