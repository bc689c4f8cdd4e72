"""rosim: RoFormer-Sim in PyTorch."""
__version__ = "0.1.0"
