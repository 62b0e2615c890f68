import os

import pytest
import torch

# Without a GPU, the Triton kernels are tested on the CPU with Triton's interpreter; it must be
# chosen before triton is imported. The model never calls them on CPU tensors, so this changes
# nothing else. (With a GPU, the kernels compile for it, and fla's kernels must too.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from prfaas.model.checkpoint import build_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    return build_model("tiny", seed=0)
