"""Opening a vector index for ``/search`` and adapting it to :class:`~rosim.server.app.SearchIndex`."""

from __future__ import annotations

import os


class ModelIndex:
    """A :class:`~rosim.index.VectorIndex` with the model that encodes its queries.

    ``search(queries, k)`` encodes the queries (all of a merged batch at once) and returns
    ``[(text, cosine), ...]`` per query, best first.
    """

    def __init__(self, index, model):
        self.index, self.model = index, model

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return str(self.index.kind)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        hits = self.index.search_texts(self.model, list(queries), k, batch_size=16)  # sorted by length
        return [[(h.text, float(h.score)) for h in row] for row in hits]


def open_index(directory: str | os.PathLike, model) -> ModelIndex:
    """Load the index saved in ``directory`` (by ``rosim index build``) and check ``model`` built it."""
    from rosim.index import VectorIndex

    return ModelIndex(VectorIndex.load(directory, model), model)
