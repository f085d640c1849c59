"""headlab: what does each attention head do, and which ones can we cut?

    import headlab as hl
    lab = hl.load("embedded")
    s = hl.score(lab, "induction"); s.top(5); s.heatmap()
    hl.ablation_curve(lab, s, task="repeated_tokens", ks=[1, 2, 4, 8])
"""
from headlab.ablation import AblationCurve, AblationMethod, AblationResult, ablate, ablation_curve, make_method
from headlab.circuits import ChannelExperiment, ChannelReport, CompositionMap, channel_experiment, channels, composition_map
from headlab.lab import Lab, ModelInfo, PromptTooLongError
from headlab.loading import ModelLoadError, from_model, load
from headlab.heads import Head
from headlab.diff import DiffConfig, ModelDiff, diff
from headlab.compare import CompareConfig, compare_masks
from headlab.comparison import MaskComparison
from headlab.masks import HeadMask
from headlab.scorers import kinds, score, stored
from headlab.scorers.safety import SaharaResult, sahara
from headlab.scores import HeadScores
from headlab.tasks import Task, make_task, task_names

__all__ = [
    "AblationCurve", "AblationMethod", "AblationResult", "Head", "ChannelExperiment", "ChannelReport", "CompositionMap", "HeadMask",
    "HeadScores", "Lab", "ModelInfo", "ModelLoadError", "PromptTooLongError", "SaharaResult", "Task", "ablate",
    "CompareConfig", "MaskComparison", "compare_masks",
    "ablation_curve", "channel_experiment", "channels", "composition_map", "diff", "DiffConfig", "ModelDiff", "from_model", "kinds", "load", "make_method", "make_task",
    "sahara", "score", "stored", "task_names",
]
