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
def digits_mlp_with_codes(digits_split):
    """A function (t_mix, epochs) -> (model, codes): the paper's MLP on digits, trained with
    its codes (seed 0) for ``epochs`` at ``t_mix``; a fresh model per call."""
    def make(t_mix: float, epochs: int):
        train, _ = digits_split
        torch.manual_seed(0)
        codes = mf.MnemonicCodes.generate(10, (1, 8, 8), seed=0)
        model = models.build("mlp", (1, 8, 8), 10)
        mf.train_with_codes(model, train, codes, t_mix, epochs, seed=0, progress=False)
        return model, codes
    return make


@pytest.fixture(scope="session")
def trained_digits_mlp(digits_mlp_with_codes):
    """The demo's setting: MLP on digits, codes with t_mix 0.1, 40 epochs, seed 0."""
    return digits_mlp_with_codes(0.1, 40)
