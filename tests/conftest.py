import pytest
import torch

import timm_evit  # noqa: F401  (registers the models even where the autoload hook is off)
from helpers import offline_hub  # noqa: F401  (a fixture for every test module)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
