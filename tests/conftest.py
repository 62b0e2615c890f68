import pytest
import torch

from prfaas.model.checkpoint import build_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    return build_model("tiny", seed=0)
