"""rosim: RoFormer-Sim (SimBERTv2) in PyTorch — retrieve and generate similar Chinese sentences.

The names below are imported on first use, so that ``import rosim`` (and the command line on its
ONNX backend) does not pay for ``import torch`` (~2 s) unless a torch model is actually used.
"""

from rosim.errors import CheckpointError, DataError, InputError, RosimError

__version__ = "0.1.0"
__all__ = [
    "SimModel", "RoFormerSim", "RoFormerSimConfig", "CharTokenizer", "build_vocab",
    "RosimError", "InputError", "CheckpointError", "DataError",
]

_LAZY = {
    "SimModel": "rosim.inference.sim_model",
    "RoFormerSim": "rosim.modeling.model",
    "RoFormerSimConfig": "rosim.modeling.model",
    "CharTokenizer": "rosim.tokenization.tokenizer",
    "build_vocab": "rosim.tokenization.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rosim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
