"""Evaluation tools: accuracy, forgetting metrics, baselines, data sets, models, experiments.

Apart from the method's core: nothing in :mod:`mnemo_fast`'s core imports this package except
:func:`evaluate` / :class:`Evaluation` (public API, re-exported by ``mnemo_fast`` and
``mnemo_fast.reference``). The rest is imported by name, e.g.
``from mnemo_fast.evaluation import data, models``:

| module | what |
|---|---|
| :mod:`.accuracy` | :func:`evaluate`: accuracy per class, on the forget and retained classes |
| :mod:`.metrics` | forgetting metrics (A_R, E_F, membership inference, agreement with retraining) |
| :mod:`.baselines` | retrain, fine-tune, NegGrad+, Fisher forgetting, SSD/LFSSD, the method itself |
| :mod:`.data` | digits and Fashion-MNIST as TensorDatasets |
| :mod:`.models` | the paper's MLP, a small CNN, ResNet-18 (:mod:`.resnet`); safetensors checkpoints |
| :mod:`.memory` | peak CPU allocation of one call (memory tests and benchmarks) |
| :mod:`.experiment` | ``mnemo-fast experiment``: every method on the same models, one report |
"""

from .accuracy import Evaluation, evaluate, predictions

__all__ = ["Evaluation", "evaluate", "predictions"]
