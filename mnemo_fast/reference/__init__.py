"""The pure-PyTorch ground truth: the same API as :mod:`mnemo_fast`, on the reference engine.

``import mnemo_fast.reference as mf`` and ``import mnemo_fast as mf`` are interchangeable;
this one never touches the compiled extension.
"""

from ..api import bind as _bind
from ..codes import MnemonicCodes, MnemonicMix
from .engine import REFERENCE as _REFERENCE
from ..evaluation import Evaluation, evaluate
from ..method import CodeAccuracy, ForgetResult, code_accuracy, perturb_
from ..adapt import adapt_with_codes
from ..train import TrainHistory, train_with_codes
from ..validation import UnlearningError

globals().update(_bind(_REFERENCE))


def backend(device: str = "cpu") -> str:
    """Which path runs here: always "reference"."""
    return "reference"


__all__ = [
    "MnemonicCodes", "MnemonicMix", "fisher_diagonal", "class_fishers", "perturbation",
    "perturb_", "forget", "ForgetResult", "CodeAccuracy", "code_accuracy", "evaluate",
    "Evaluation", "train_with_codes", "TrainHistory", "adapt_with_codes", "UnlearningError", "backend",
]
