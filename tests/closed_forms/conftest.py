import os

from tests.helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)

# POT imports every backend it finds (TensorFlow is installed here and takes seconds to import).
os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_JAX", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_CUPY", "1")
