"""rosim: RoFormer-Sim (SimBERTv2) in PyTorch — retrieve and generate similar Chinese sentences."""

from rosim.errors import CheckpointError, DataError, InputError, RosimError
from rosim.inference.sim_model import SimModel
from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
from rosim.tokenization.tokenizer import CharTokenizer, build_vocab

__version__ = "0.1.0"
__all__ = [
    "SimModel", "RoFormerSim", "RoFormerSimConfig", "CharTokenizer", "build_vocab",
    "RosimError", "InputError", "CheckpointError", "DataError",
]
