"""A persistent sentence-vector index (faiss): build from a text file, add, search, save, load."""

from rosim.index.vector_index import KINDS, Hit, VectorIndex, default_nlist, identity_mismatch

__all__ = ["KINDS", "Hit", "VectorIndex", "default_nlist", "identity_mismatch"]
