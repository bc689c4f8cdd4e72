"""Request and response bodies of the HTTP API (pydantic), and the limits they enforce.

Request models are built per app from its :class:`Limits`, so the limits appear in the OpenAPI
schema (and a client, or a fuzzer, can read them there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from rosim import limits as bounds
from rosim.limits import text_problem


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond these the server answers 4xx with a JSON error."""

    max_texts: int = 64            # texts in one request (each side of /similarity counts)
    max_text_chars: int = 512      # characters in one text (the model reads its first 62 tokens anyway)
    max_n: int = 128               # candidates generated per text by /similar
    max_gen_rows: int = 1024       # texts x n in one /similar request
    max_gen_length: int = 64       # tokens generated per candidate
    max_k: int = 100               # neighbours per query from /search
    max_body_bytes: int = 1 << 20  # request body size
    max_queue: int = 256           # requests waiting for the model (per endpoint) before 503
    request_timeout_s: float = 60.0  # time a request may wait for its result before 504
    max_queue_s: float = 5.0       # estimated wait for the model (per endpoint) beyond which a request gets 503
    body_timeout_s: float = 10.0   # time to receive a whole request body before 408

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"limit {name} must be positive, got {value!r}")
        for name, most in (("max_n", bounds.MAX_N), ("max_gen_rows", bounds.MAX_GEN_ROWS),
                           ("max_gen_length", bounds.MAX_GEN_LENGTH), ("max_k", bounds.MAX_SEARCH_K)):
            if getattr(self, name) > most:
                raise ValueError(f"limit {name} must be at most {most} (rosim.limits), got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return asdict(self)


def _not_blank(text: str) -> str:
    problem = text_problem(text)
    if problem is not None:
        raise ValueError(f"text {problem}")
    return text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def build_request_models(limits: Limits) -> SimpleNamespace:
    """The request models for ``limits`` (classes are created per app)."""
    Text = Annotated[
        str,
        StringConstraints(min_length=1, max_length=limits.max_text_chars),
        AfterValidator(_not_blank),
        Field(description=f"a non-blank sentence of at most {limits.max_text_chars} characters",
              examples=["今天天气不错"]),
    ]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=limits.max_texts)]

    class EncodeRequest(_Strict):
        """Sentences to turn into vectors."""

        texts: Texts = Field(examples=[["今天天气不错", "今天天气很好"]])
        normalize: bool = Field(True, description="L2-normalise the vectors (cosine = dot product)")

    class SimilarityRequest(_Strict):
        """Cosine similarity: pairwise for two equal-length lists, or one text against each of many."""

        a: Text | Texts = Field(examples=["今天天气不错"])
        b: Text | Texts = Field(examples=[["今天天气很好", "我喜欢北京"]])

        @model_validator(mode="after")
        def _shapes(self):
            if isinstance(self.a, list) and isinstance(self.b, list) and len(self.a) != len(self.b):
                raise ValueError(f"a and b are lists of different lengths ({len(self.a)} and {len(self.b)}); "
                                 "give equal lengths for pairwise scores, or make one of them a single string")
            return self

    class SimilarRequest(_Strict):
        """Generate ``n`` candidates per text, rank them by similarity to it, keep the best ``k``."""

        texts: Text | Texts = Field(examples=["今天天气不错"])
        n: int = Field(20, ge=1, le=limits.max_n, description="candidates generated per text")
        k: int = Field(10, ge=1, le=limits.max_n, description="results kept per text (at most n)")
        top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling threshold")
        max_length: int = Field(32, ge=1, le=limits.max_gen_length, description="tokens per candidate")
        seed: int | None = Field(None, ge=0, le=bounds.MAX_SEED,
                                 description="fixes the sampling; a seeded request is never merged with others")

        @model_validator(mode="after")
        def _sizes(self):
            if self.k > self.n:
                raise ValueError(f"k ({self.k}) cannot exceed n ({self.n}): only n candidates are generated")
            count = 1 if isinstance(self.texts, str) else len(self.texts)
            if count * self.n > limits.max_gen_rows:
                raise ValueError(f"{count} texts x n={self.n} = {count * self.n} candidates exceeds the "
                                 f"limit of {limits.max_gen_rows} per request; lower n or send fewer texts")
            return self

    class SearchRequest(_Strict):
        """Nearest neighbours of each text in the loaded index."""

        texts: Text | Texts = Field(examples=["今天天气不错"])
        k: int = Field(10, ge=1, le=limits.max_k, description="neighbours per text")

    return SimpleNamespace(EncodeRequest=EncodeRequest, SimilarityRequest=SimilarityRequest,
                           SimilarRequest=SimilarRequest, SearchRequest=SearchRequest)


# ---------------------------------------------------------------------- responses
class Scored(BaseModel):
    text: str
    score: float


class EncodeResponse(BaseModel):
    dim: int
    embeddings: list[list[float]]


class SimilarityResponse(BaseModel):
    scores: list[float] = Field(description="one cosine per pair, or per text of the list side")


class SimilarItem(BaseModel):
    text: str
    similar: list[Scored]


class SimilarResponse(BaseModel):
    results: list[SimilarItem]


class SearchItem(BaseModel):
    text: str
    neighbors: list[Scored]


class SearchResponse(BaseModel):
    results: list[SearchItem]


class ErrorBody(BaseModel):
    code: str = Field(description="a stable machine-readable name, e.g. validation_error, unauthorized")
    message: str = Field(description="what was wrong, for a person")
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
