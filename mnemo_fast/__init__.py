"""mnemo_fast: one-shot class unlearning with mnemonic codes, on fused kernels where it can.

Same API as :mod:`mnemo_fast.reference` (the pure-PyTorch ground truth); each call takes the
fast engine when the compiled extension can run it and falls back to the reference otherwise.
:func:`backend` says which path runs.
"""

from .codes import MnemonicCodes, MnemonicMix
from .engines import backend
from .evaluation import Evaluation, evaluate
from .method import (
    CodeAccuracy,
    ForgetResult,
    class_fishers,
    code_accuracy,
    fisher_diagonal,
    forget,
    perturb_,
    perturbation,
)
from .diagnose import ClassDiagnosis, Diagnosis, diagnose
from .training.adapt import adapt_with_codes
from .explain import Explanation, explain
from .training.train import TrainHistory, train_with_codes
from .validation import ForgetWarning, UnlearningError
from .verdict import Verdict
from .public import NAMES as _NAMES

from .fast._ext import note_missing_cuda as _note_missing_cuda

_note_missing_cuda()  # once: a GPU machine whose build has no CUDA kernels runs the GPU path in PyTorch

__version__ = "0.1.0"

__all__ = list(_NAMES)  # mnemo_fast/public.py: the one list of both namespaces
