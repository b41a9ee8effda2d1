"""Unlearning baselines, each ``method(model, ..., forget_classes, **options) -> new model``.

| function | data it needs | source |
|---|---|---|
| :func:`retrain` | retained training data (full retraining) | gold standard |
| :func:`finetune` | retained training data | SSD paper's baseline |
| :func:`neggrad_plus` | forget + retained training data | Kurmanji et al., 2023 |
| :func:`fisher_forgetting` | retained training data | Golatkar et al., CVPR 2020 |
| :func:`ssd` | forget + full training data | Foster et al., AAAI 2024 |
| :func:`lfssd` | forget + full training inputs | Foster et al., 2024 |
| :func:`mnemonic` | the codes only | Yamashita et al., ACML 2024 |
| :func:`mnemonic_with_data` | k samples per class | the paper's ablation |

The input model is never modified.
"""

from .finetune import finetune
from .fisher_forgetting import fisher_forgetting, retain_fisher
from .mnemonic import mnemonic, mnemonic_result, mnemonic_with_data, mnemonic_with_data_result, sample_codes
from .neggrad import neggrad_plus
from .retrain import retrain
from .ssd import lfssd, lfssd_importance, ssd, ssd_importance

__all__ = [
    "retrain", "finetune", "neggrad_plus", "fisher_forgetting", "retain_fisher", "ssd", "lfssd",
    "ssd_importance", "lfssd_importance", "mnemonic", "mnemonic_result", "mnemonic_with_data",
    "mnemonic_with_data_result", "sample_codes",
]
