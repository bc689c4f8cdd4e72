"""HTTP API and demo page: ``create_app(model, index)``, served by ``rosim serve``."""

from rosim.server.app import SearchIndex, create_app
from rosim.server.batching import MicroBatcher, QueueFull
from rosim.server.generation import GenerationProcess
from rosim.server.schemas import Limits

__all__ = ["GenerationProcess", "Limits", "MicroBatcher", "QueueFull", "SearchIndex", "create_app"]
