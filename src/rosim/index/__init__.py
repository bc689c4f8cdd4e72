"""A persistent sentence-vector index (faiss): build from a text file, add, search, save, load;
and, for corpora past one machine, sharded encoding and an index built from the shards."""

from rosim.index.shards import build_from_shards, encode_shards, list_shards
from rosim.index.vector_index import KINDS, Hit, VectorIndex, default_nlist, identity_mismatch

__all__ = ["KINDS", "Hit", "VectorIndex", "build_from_shards", "default_nlist", "encode_shards",
           "identity_mismatch", "list_shards"]
