"""Training with mnemonic codes, before forgetting and after it.

- :mod:`.train`: the one training loop (``fit``) and ``train_with_codes`` (the paper's mix);
- :mod:`.adapt`: ``adapt_with_codes``, resumable fine-tuning of a pre-trained model with codes;
- :mod:`.repair`: an extension, a few steps on the retained codes after a forget.
"""

from .adapt import adapt_with_codes
from .repair import repair
from .train import TrainHistory, fit, train, train_with_codes

__all__ = ["TrainHistory", "adapt_with_codes", "fit", "repair", "train", "train_with_codes"]
