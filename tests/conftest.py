import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import mnemo_fast as mf  # noqa: E402
from mnemo_fast.evaluation import data, models  # noqa: E402


@pytest.fixture(scope="session")
def digits_split():
    return data.digits()


@pytest.fixture(scope="session")
def trained_digits_mlp(digits_split):
    """The demo's setting: MLP on digits, codes with t_mix 0.1, 40 epochs, seed 0."""
    train, _ = digits_split
    torch.manual_seed(0)
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8), seed=0)
    model = models.build("mlp", (1, 8, 8), 10)
    mf.train_with_codes(model, train, codes, 0.1, 40, seed=0, progress=False)
    return model, codes
