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
from rosim.inference.sim_model import DEFAULT_K, DEFAULT_MAX_NEW_TOKENS, DEFAULT_N, DEFAULT_TOP_P
from rosim.limits import text_problem


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond these the server answers 4xx with a JSON error."""

    max_texts: int = 64            # texts in one request (each side of /similarity counts)
    max_text_chars: int = 512      # characters in one text (the model reads its first 62 tokens anyway)
    max_n: int = 128               # candidates generated per text by /similar (default n is 100)
    max_gen_rows: int = 1024       # texts x n in one /similar request
    max_gen_length: int = 64       # tokens generated per candidate (max_new_tokens)
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
        """Cosine similarity of every text of ``a`` with every text of ``b`` (as ``SimModel.similarity``):
        two strings give a number, a string and a list a list, two lists a matrix (one row per text of ``a``)."""

        a: Text | Texts = Field(examples=["今天天气不错"])
        b: Text | Texts = Field(examples=[["今天天气很好", "我喜欢北京"]])

    class PairwiseRequest(_Strict):
        """One cosine per pair ``(a[i], b[i])`` of two equal-length lists (as ``SimModel.similarity_pairwise``)."""

        a: Texts = Field(examples=[["今天天气不错", "我喜欢北京"]])
        b: Texts = Field(examples=[["今天天气很好", "北京是我喜欢的城市"]])

        @model_validator(mode="after")
        def _shapes(self):
            if len(self.a) != len(self.b):
                raise ValueError(f"a and b are lists of different lengths ({len(self.a)} and {len(self.b)}); "
                                 "pairwise scores need equal lengths (POST /similarity compares every a with every b)")
            return self

    class SimilarRequest(_Strict):
        """Generate ``n`` candidates per text, rank them by similarity to it, keep the best ``k``
        (as ``SimModel.similar``, with the same defaults). Give ``text`` or ``texts``."""

        text: Text | None = Field(None, examples=["今天天气不错"], description="one text (or use texts)")
        texts: Text | Texts | None = Field(None, examples=[["今天天气不错"]], description="one text or a list")
        n: int = Field(min(DEFAULT_N, limits.max_n), ge=1, le=limits.max_n, description="candidates generated per text")
        k: int | None = Field(None, ge=1, le=limits.max_n,
                              description=f"results kept per text (default {DEFAULT_K}, at most n)")
        top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0, description="nucleus sampling threshold")
        max_new_tokens: int = Field(min(DEFAULT_MAX_NEW_TOKENS, limits.max_gen_length), ge=1,
                                    le=limits.max_gen_length, description="tokens generated per candidate")
        seed: int | None = Field(None, ge=0, le=bounds.MAX_SEED,
                                 description="fixes the sampling; a seeded request is never merged with others")

        @model_validator(mode="after")
        def _sizes(self):
            if (self.text is None) == (self.texts is None):
                raise ValueError("give exactly one of text (a string) or texts (a string or a list)")
            if self.k is None:
                self.k = min(DEFAULT_K, self.n)
            if self.k > self.n:
                raise ValueError(f"k ({self.k}) cannot exceed n ({self.n}): only n candidates are generated")
            if self.count * self.n > limits.max_gen_rows:
                raise ValueError(f"{self.count} texts x n={self.n} = {self.count * self.n} candidates exceeds the "
                                 f"limit of {limits.max_gen_rows} per request; lower n or send fewer texts")
            return self

        @property
        def items(self) -> list[str]:
            value = self.text if self.text is not None else self.texts
            return [value] if isinstance(value, str) else list(value)

        @property
        def count(self) -> int:
            return len(self.items)

    class SearchRequest(_Strict):
        """Nearest neighbours of each text in the loaded index."""

        texts: Text | Texts = Field(examples=["今天天气不错"])
        k: int = Field(10, ge=1, le=limits.max_k, description="neighbours per text")

    return SimpleNamespace(EncodeRequest=EncodeRequest, SimilarityRequest=SimilarityRequest,
                           PairwiseRequest=PairwiseRequest, SimilarRequest=SimilarRequest, SearchRequest=SearchRequest)


# ---------------------------------------------------------------------- responses
class Scored(BaseModel):
    text: str
    score: float


class EncodeResponse(BaseModel):
    dim: int
    embeddings: list[list[float]]


class SimilarityResponse(BaseModel):
    scores: float | list[float] | list[list[float]] = Field(
        description="a number for two strings, a list for a string and a list, a matrix (rows: a) for two lists")


class PairwiseResponse(BaseModel):
    scores: list[float] = Field(description="one cosine per pair (a[i], b[i])")


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
