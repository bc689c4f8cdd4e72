import os

import pytest
import torch

# POT imports every backend it finds (TensorFlow is installed here and takes seconds to import).
os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_JAX", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_CUPY", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests use tiny matrices: on a busy machine every OpenMP region costs a time slice."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
