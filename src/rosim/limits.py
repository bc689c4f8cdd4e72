"""Every size rosim accepts from a caller, in one place, with the checks that apply them.

The command line, the Python API, the HTTP schemas, configuration files and index options all take
their bounds from here, so that "how large may this be?" has one answer. Each bound is far above
any sensible use and far below what would exhaust a machine: beyond it rosim refuses with an
:class:`~rosim.errors.InputError` that names the option and the limit, instead of starting an
allocation that dies in a traceback (or takes the machine down with it).
"""

from __future__ import annotations

import math
import numbers

from rosim.errors import InputError

# generation (SimModel.generate / similar, `rosim similar`, /similar)
MAX_N = 1000                # candidates generated per input text
MAX_GEN_ROWS = 8192         # input texts x candidates decoded together
MAX_GEN_LENGTH = 512        # tokens generated per candidate
MAX_SEED = 2**53 - 1        # seeds: exact in JSON and float64, and seed + offset stays inside torch's 64 bits
MAX_BATCH = 4096            # inputs per model call (--batch, --batch-size)

# vector index (`rosim index build`)
MAX_HNSW_M = 256            # HNSW links per node (faiss stores 2*M per vector on layer 0)
MAX_EF = 65536              # HNSW efSearch / efConstruction
MAX_NLIST = 1 << 20         # IVF cells
MAX_SEARCH_K = 10000        # neighbours per query

# model configuration (config.json, RoFormerSimConfig)
MAX_VOCAB = 1_000_000
MAX_HIDDEN = 16384
MAX_LAYERS = 256
MAX_HEADS = 256
MAX_INTERMEDIATE = 65536
MAX_POSITION = 65536
MIN_POSITION = 16           # below this a sentence is cut to a few characters without notice
MAX_TYPE_VOCAB = 16
MAX_PARAMETERS = 4_000_000_000  # ~16 GB of float32 weights


def check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``, or an InputError naming ``name`` and the range.

    NumPy integers (``np.int64(5)``, e.g. a count computed with NumPy) are integers and come back as
    a plain ``int``: callers keep the returned value, so what they store or write out is an int.
    bool, float (even ``2.0``) and str are refused.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise InputError(f"{name} must be in {low}..{high}, got {value}")
    return value


def check_float(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name} must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise InputError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}")
    return float(value)


def check_seed(seed, name: str = "seed") -> int | None:
    """None, or an integer seed in ``0..MAX_SEED``."""
    return None if seed is None else check_int(name, seed, 0, MAX_SEED)


def check_similar_options(*, n, k, top_p, max_new_tokens, seed) -> tuple[int, int | None, float | None, int, int | None]:
    """Bounds of one ``similar`` / ``generate`` request, checked before any model work (by the CLI
    before it loads the model, and by :class:`~rosim.inference.sim_model.SimModel` itself).

    ``n`` candidates generated per text, ``k`` kept (None: the default; at most ``n``), nucleus
    ``top_p`` in (0, 1] (None: off), ``max_new_tokens`` per candidate, ``seed`` (None: random).
    Returns them as plain ints / float, in that order.
    """
    n = check_int("n", n, 1, MAX_N)
    if k is not None:
        k = check_int("k", k, 1, MAX_N)
        if k > n:
            raise InputError(f"k ({k}) cannot exceed n ({n}): only n candidates are generated")
    if top_p is not None:
        top_p = check_float("top_p", top_p, 0.0, 1.0, low_open=True)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1, MAX_GEN_LENGTH)
    return n, k, top_p, max_new_tokens, check_seed(seed)


def estimated_parameters(vocab: int, hidden: int, layers: int, intermediate: int, positions: int = 0) -> int:
    """Weights of a BERT-shaped encoder: embeddings, attention and feed-forward per layer."""
    per_layer = 4 * hidden * hidden + 2 * hidden * intermediate
    return (vocab + positions) * hidden + layers * per_layer


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be a sentence, or None: a lone surrogate (bytes that were not UTF-8, e.g. a
    command-line argument), or no visible character at all (empty, whitespace, control or format
    characters such as NUL or zero-width spaces)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 text (byte {ord(text[exc.start]) & 0xFF:#04x} at character {exc.start})"
    if not any(_visible(ch) for ch in text):
        return "is empty: it has no visible character (only whitespace, control or zero-width characters)"
    return None


def _visible(ch: str) -> bool:
    import unicodedata

    return not ch.isspace() and unicodedata.category(ch)[0] not in "CZ"
