"""The RoFormer-Sim model, readable top to bottom.

One Transformer encoder (Post-LN, BERT layout) that serves three uses:

* sentence vectors: the final hidden state at [CLS] through a linear pooler (no tanh);
* UniLM generation: with the UniLM mask, segment 0 (``[CLS] source [SEP]``) is bidirectional and
  segment 1 (``target [SEP]``) sees the source and earlier targets; logits come from an LM head
  tied to the token embeddings;
* the SimBERT v1 / BERT variant: the same code with learned absolute positions instead of RoPE.

Rotary position embeddings follow bert4keras 0.10.6 exactly: angles ``m * 10000^(-2i/d)`` applied
to adjacent pairs ``(2i, 2i+1)`` of q and k (never v), positions counted over the whole sequence.

Shapes: ``B`` batch, ``L`` query length, ``S`` key length (past + current), ``H`` hidden,
``h`` heads, ``d`` head size.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rosim.errors import CheckpointError, InputError


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class RoFormerSimConfig:
    """Hyper-parameters of the model. Defaults are those of RoFormer-Sim-small (char)."""

    vocab_size: int = 12000
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 6
    intermediate_size: int = 1536
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0  # bert4keras 0.10.6 has none
    max_position: int = 512
    position: Literal["rotary", "absolute"] = "rotary"
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pooler_activation: Literal["linear", "tanh"] = "linear"
    # the sentence vector (``pooled``): the pooler on [CLS] (RoFormer-Sim), or the mean over the
    # segment-0 tokens of the last layer (E5; under the UniLM mask that is the source sentence alone)
    sentence_pooling: Literal["pooler", "mean"] = "pooler"
    hidden_act: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    initializer_range: float = 0.02
    rotary_base: float = 10000.0
    with_pooler: bool = True
    with_lm_head: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, never read by the model

    def __post_init__(self) -> None:
        from rosim import limits as lim

        ints = {"vocab_size": lim.MAX_VOCAB, "hidden_size": lim.MAX_HIDDEN, "num_layers": lim.MAX_LAYERS,
                "num_heads": lim.MAX_HEADS, "intermediate_size": lim.MAX_INTERMEDIATE,
                "max_position": lim.MAX_POSITION, "type_vocab_size": lim.MAX_TYPE_VOCAB}
        for name, most in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"config.{name} must be a positive integer, got {value!r}")
            if value > most:
                raise InputError(f"config.{name} = {value} exceeds rosim's limit of {most}; is the config damaged?")
        if self.max_position < lim.MIN_POSITION:
            raise InputError(f"config.max_position = {self.max_position} would cut every text to "
                             f"{max(self.max_position - 2, 0)} characters; it must be at least {lim.MIN_POSITION}")
        params = lim.estimated_parameters(self.vocab_size, self.hidden_size, self.num_layers, self.intermediate_size,
                                          self.max_position if self.position == "absolute" else 0)
        if params > lim.MAX_PARAMETERS:
            raise InputError(f"config describes about {params / 1e9:.1f} billion weights, beyond rosim's limit of "
                             f"{lim.MAX_PARAMETERS / 1e9:g} billion; is the config damaged?")
        for name, low, high, low_open in (("layer_norm_eps", 0.0, 1.0, True), ("initializer_range", 0.0, 10.0, False),
                                          ("rotary_base", 1.0, 1e12, False)):
            value = getattr(self, name)
            try:
                lim.check_float(f"config.{name}", value, low, high, low_open=low_open)
            except InputError as exc:
                raise InputError(f"{exc} (in the model config)") from None
        for name in ("with_pooler", "with_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"config.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise InputError(f"config.extra must be an object, got {self.extra!r}")
        if self.hidden_size % self.num_heads:
            raise InputError(
                f"config.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.position not in ("rotary", "absolute"):
            raise InputError(f"config.position must be 'rotary' or 'absolute', got {self.position!r}")
        if self.position == "rotary" and self.head_size % 2:
            raise InputError(f"rotary positions need an even head size, got {self.head_size}")
        if self.pooler_activation not in ("linear", "tanh"):
            raise InputError(f"config.pooler_activation must be 'linear' or 'tanh', got {self.pooler_activation!r}")
        if self.sentence_pooling not in ("pooler", "mean"):
            raise InputError(f"config.sentence_pooling must be 'pooler' or 'mean', got {self.sentence_pooling!r}")
        if self.hidden_act not in ("gelu", "gelu_tanh", "relu"):
            raise InputError(f"config.hidden_act must be gelu, gelu_tanh or relu, got {self.hidden_act!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise InputError(f"config.{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoFormerSimConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type", "rosim_version"})
        if unknown:
            raise CheckpointError(f"config has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps({"model_type": "roformer-sim", **self.to_dict()}, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def unilm_allowed(token_type_ids: torch.Tensor) -> torch.Tensor:
    """UniLM visibility: with c = cumsum(segment ids), query i sees key j iff c[j] <= c[i].

    Returns a bool tensor ``(B, 1, L, L)``, True where attention is allowed.
    """
    c = torch.cumsum(token_type_ids, dim=-1)
    return (c[:, None, :] <= c[:, :, None]).unsqueeze(1)


def causal_allowed(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Lower-triangular visibility ``(1, 1, L, L)``."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


def build_attention_bias(
    attention_mask: torch.Tensor | None,
    *,
    query_length: int,
    mask: Literal["bidirectional", "unilm", "causal"] = "bidirectional",
    token_type_ids: torch.Tensor | None = None,
    extra_bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    past_length: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Combine key padding, the structural mask and a caller's additive bias into one additive bias.

    ``attention_mask`` is ``(B, S)`` with 1 for real tokens and 0 for padding (S may exceed L when a
    cache holds earlier keys; the structural mask then applies to the last L keys only, which is
    what incremental decoding needs; without ``attention_mask``, S = ``past_length`` + L and the
    causal mask is made on ``device``).
    Returns ``(B, 1|h, L, S)`` or None when nothing is masked.
    """
    allowed = None
    if attention_mask is not None:
        allowed = attention_mask.bool()[:, None, None, :]
    if mask != "bidirectional":
        if mask == "unilm":
            if token_type_ids is None:
                raise InputError("the UniLM mask needs token_type_ids (segment ids)")
            structural = unilm_allowed(token_type_ids)
        elif mask == "causal":
            structural = causal_allowed(query_length, device if attention_mask is None else attention_mask.device)
        else:
            raise InputError(f"mask must be 'bidirectional', 'unilm' or 'causal', got {mask!r}")
        key_length = attention_mask.shape[-1] if attention_mask is not None else past_length + structural.shape[-1]
        past = key_length - structural.shape[-1]
        if past > 0:  # earlier (cached) keys are visible to every new query
            pad = torch.ones(*structural.shape[:-1], past, dtype=torch.bool, device=structural.device)
            structural = torch.cat([pad, structural], dim=-1)
        allowed = structural if allowed is None else allowed & structural
    if allowed is None and extra_bias is None:
        return None
    neg = torch.finfo(dtype).min
    if allowed is None:
        bias = torch.zeros((), dtype=dtype, device=extra_bias.device)
    else:
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, neg)
    if extra_bias is not None:
        bias = (bias + extra_bias.to(dtype)).clamp(min=neg)
    return bias


# --------------------------------------------------------------------------------------------
# rotary position embeddings
# --------------------------------------------------------------------------------------------
def rotary_cos_sin(position_ids: torch.Tensor, head_size: int, base: float = 10000.0):
    """cos and sin tables ``(B|1, 1, L, d)`` for the interleaved form (each angle repeated twice)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device=position_ids.device) / head_size)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, L, d/2)
    # each angle twice, (a0, a0, a1, a1, ...); stack + flatten rather than repeat_interleave, which the
    # ONNX exporter turns into a fixed-size graph that breaks at other sequence lengths
    angles = torch.stack([angles, angles], dim=-1).flatten(-2)[:, None]  # (B, 1, L, d)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: x' = x*cos + [-x1, x0, -x3, x2, ...]*sin."""
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
def _activation(name: str):
    return {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}[name]


class Embeddings(nn.Module):
    """Token + segment (+ absolute position for the BERT variant), then LayerNorm and dropout."""

    def __init__(self, config: RoFormerSimConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position, config.hidden_size) if config.position == "absolute" else None
        )
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids, token_type_ids, position_ids):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        return self.dropout(self.layer_norm(x))


class KVCache:
    """Preallocated keys and values for incremental decoding: one buffer per layer
    ``(B, h, capacity, d)``, filled up to ``length``; each step writes in place instead of
    concatenating (which copies the whole cache every token).

    Pass it as ``past_key_values``; ``forward`` appends the new keys of every layer and advances
    ``length``. ``select(rows)`` keeps only some rows (finished rows leave the batch).
    ``repeat`` copies each row of ``past`` that many times (one source, ``n`` samples), without the
    intermediate ``repeat_interleave``.
    """

    def __init__(self, past: tuple[tuple[torch.Tensor, torch.Tensor], ...], capacity: int, repeat: int = 1):
        batch, heads, length, size = past[0][0].shape
        if capacity < length:
            raise InputError(f"cache capacity {capacity} is below the {length} positions already cached")
        self.keys = [k.new_empty(batch * repeat, heads, capacity, size) for k, _ in past]
        self.values = [v.new_empty(batch * repeat, heads, capacity, size) for _, v in past]
        for buffers, tensors in ((self.keys, [k for k, _ in past]), (self.values, [v for _, v in past])):
            for buf, t in zip(buffers, tensors, strict=True):  # row b of ``past`` fills rows b*repeat ...
                buf.view(batch, repeat, heads, capacity, size)[:, :, :, :length] = t[:, None]
        self.length, self.capacity = length, capacity

    def __len__(self) -> int:
        return len(self.keys)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise InputError(f"the cache holds {self.capacity} positions; step {end} does not fit")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` (in that order) at the front of the buffers, copying only the ``length``
        positions filled so far rather than the whole capacity; the buffers keep their storage."""
        n, end = len(rows), self.length
        for buffers in (self.keys, self.values):
            for i, buf in enumerate(buffers):
                buf[:n, :, :end] = buf[rows, :, :end]  # the right side is a copy: safe in place
                buffers[i] = buf[:n]


class _KVCacheLayer:
    """One layer's view of a :class:`KVCache` (what ``Attention`` sees as ``past``)."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def extend(self, k, v):
        return self.cache.extend(self.layer, k, v)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA, with RoPE on q and k and an optional KV cache."""

    def __init__(self, config: RoFormerSimConfig):
        super().__init__()
        self.num_heads, self.head_size = config.num_heads, config.head_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout

    def _split(self, x):  # (B, L, H) -> (B, h, L, d)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x, bias, rope=None, past=None):
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if isinstance(past, _KVCacheLayer):
            k, v = past.extend(k, v)
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.output(out), (k, v)


class Layer(nn.Module):
    """Post-LN Transformer layer: attention → add → LN → FFN → add → LN."""

    def __init__(self, config: RoFormerSimConfig):
        super().__init__()
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.act = _activation(config.hidden_act)

    def forward(self, x, bias, rope=None, past=None):
        attn, kv = self.attention(x, bias, rope, past)
        x = self.attention_norm(x + self.dropout(attn))
        x = self.ffn_norm(x + self.dropout(self.ffn_output(self.act(self.intermediate(x)))))
        return x, kv


class LMHead(nn.Module):
    """Dense + activation + LayerNorm, then logits against the tied token embeddings plus a bias."""

    def __init__(self, config: RoFormerSimConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = _activation(config.hidden_act)

    def forward(self, hidden, embedding_weight):
        return F.linear(self.layer_norm(self.act(self.dense(hidden))), embedding_weight, self.bias)


LayerInput = Callable[[int, torch.Tensor], torch.Tensor]
"""A hook ``layer_input(i, x)``: what layer ``i`` takes instead of ``x`` ``(B, L, H)``."""


@dataclass
class ModelOutput:
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings output, then every layer
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | KVCache | None = None


class DecodeStep(NamedTuple):
    """What :meth:`RoFormerSim.decode_step` returns."""

    logits: torch.Tensor  # (B, vocab) next-token logits after the last new position
    cache: KVCache | tuple[tuple[torch.Tensor, torch.Tensor], ...]  # the cache, new positions included


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class RoFormerSim(nn.Module):
    """RoFormer (or BERT) encoder + linear pooler + tied LM head.

    ``forward`` returns hidden states and the sentence vector ``pooled`` (the pooler on [CLS], or
    the mean over segment 0 when ``config.sentence_pooling == "mean"``);
    ``lm_logits`` turns hidden states into next-token logits.
    """

    def __init__(self, config: RoFormerSimConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if config.with_pooler else None
        self.lm_head = LMHead(config) if config.with_lm_head else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    @property
    def has_sentence_vector(self) -> bool:
        """Whether ``forward`` returns ``pooled`` (a pooler, or mean pooling by configuration)."""
        return self.pooler is not None or self.config.sentence_pooling == "mean"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        mask: Literal["bidirectional", "unilm", "causal"] = "bidirectional",
        attention_bias: torch.Tensor | list[torch.Tensor | None] | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        validate: bool = True,
        layer_input: LayerInput | None = None,
    ) -> ModelOutput:
        """Run the encoder.

        Parameters
        ----------
        input_ids, token_type_ids : ``(B, L)`` long tensors (segment ids default to 0).
        attention_mask : ``(B, S)`` 1 for real tokens, 0 for padding; S = past length + L.
        mask : the structural mask: bidirectional (retrieval), unilm (seq2seq training), causal.
        attention_bias : an additive bias ``(B|1, h|1, L, S)`` added to the scores of every layer,
            or a list with one bias (or None) per layer (UniVAE uses per-layer masks). When given
            per layer, it replaces the structural mask of ``mask`` for that layer (padding still applies).
        position_ids : ``(B|1, L)``; default ``past_length + arange(L)``.
        past_key_values, use_cache : incremental decoding; keys are cached already rotated. A
            :class:`KVCache` is extended in place and returned as ``past_key_values``
            (:meth:`decode_step` is the decoder's entry point).
        validate : check id ranges (a host sync per call); decoders that made the ids pass False.
        layer_input : ``layer_input(i, x)`` returns what layer ``i`` takes instead of ``x`` (the
            output of layer ``i - 1``); UniVAE writes its latents into position 0 this way.
        """
        past_length = self._past_length(past_key_values)
        token_type_ids, position_ids = self._checked_ids(input_ids, token_type_ids, attention_mask, position_ids,
                                                         past_length, validate)
        biases = self._attention_biases(attention_mask, attention_bias, mask, token_type_ids, past_length)
        hidden_states = [] if output_hidden_states else None
        x, presents = self._run_layers(input_ids, token_type_ids, position_ids, biases, past_key_values,
                                       layer_input=layer_input, hidden_states=hidden_states, keep_kv=use_cache)
        pooled = self._sentence_vector(x, token_type_ids, attention_mask) if past_length == 0 else None
        if isinstance(past_key_values, KVCache):
            cache = past_key_values
        else:
            cache = presents if use_cache else None
        return ModelOutput(last_hidden_state=x, pooled=pooled, past_key_values=cache,
                           hidden_states=None if hidden_states is None else tuple(hidden_states))

    def decode_step(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        cache: KVCache | Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        layer_input: LayerInput | None = None,
    ) -> DecodeStep:
        """Run new positions against the key/value cache: one step of incremental decoding.

        ``input_ids`` ``(B, L)`` are the new tokens (usually L = 1) at ``position_ids`` ``(B|1, L)``;
        their segment ids default to 1 (the target segment of UniLM). Every new position sees every
        cached key and the new positions up to itself. ``cache`` is None (nothing before), a
        :class:`KVCache` (extended in place and returned), or one ``(k, v)`` pair per layer, where
        None means that layer has no earlier keys (a new tuple of pairs is returned; layers may
        hold different lengths, as UniVAE's do, when no ``attention_mask`` is given).
        ``attention_mask`` ``(B, S)`` marks the real keys among the S = cached + L (padded sources).
        ``layer_input`` is :meth:`forward`'s per-layer hook. Ids are not range-checked: the decoder
        made them. Returns the next-token logits after the last new position and the cache.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must be (batch, new positions), got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.ones_like(input_ids)
        if cache is not None and len(cache) != len(self.layers):
            raise InputError(f"the cache has {len(cache)} layers, the model {len(self.layers)}")
        if isinstance(cache, KVCache):
            past = [cache.length] * len(self.layers)
        else:
            past = [0 if kv is None else kv[0].shape[2] for kv in (cache or [None] * len(self.layers))]
        biases = self._decoding_biases(attention_mask, batch, length, past, input_ids.device)
        x, presents = self._run_layers(input_ids, token_type_ids, position_ids, biases, cache,
                                       layer_input=layer_input, keep_kv=True)
        return DecodeStep(self.lm_logits(x[:, -1]), cache if isinstance(cache, KVCache) else presents)

    # ---------------------------------------------------------------- the pieces of a pass
    def _past_length(self, past_key_values) -> int:
        if past_key_values is None:
            return 0
        if len(past_key_values) != len(self.layers):
            raise InputError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.layers)}")
        return past_key_values.length if isinstance(past_key_values, KVCache) else past_key_values[0][0].shape[2]

    def _checked_ids(self, input_ids, token_type_ids, attention_mask, position_ids, past_length: int, validate: bool):
        """``(token_type_ids, position_ids)`` with their defaults, after checking every shape (and,
        with ``validate``, every id range) of :meth:`forward`'s inputs."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if length == 0:
            raise InputError("input_ids has length 0: nothing to encode")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise InputError(
                f"token_type_ids has shape {tuple(token_type_ids.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_length + length):
            raise InputError(
                f"attention_mask must be (batch, past + length) = {(batch, past_length + length)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if validate and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise InputError(
                f"token ids must lie in [0, {self.config.vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}; "
                "was the text encoded with this model's vocabulary?"
            )
        if validate and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= self.config.type_vocab_size):
            raise InputError(f"segment ids must lie in [0, {self.config.type_vocab_size})")
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=input_ids.device)[None]
        if self.config.position == "absolute" and validate and int(position_ids.max()) >= self.config.max_position:
            raise InputError(
                f"position {int(position_ids.max())} exceeds max_position {self.config.max_position}; truncate the input"
            )
        return token_type_ids, position_ids

    def _attention_biases(self, attention_mask, attention_bias, mask, token_type_ids, past_length: int) -> list:
        """One additive bias (or None) per layer for :meth:`forward`: padding and the structural
        mask with the caller's bias, or padding with each layer's own bias. A bias object given to
        several layers is combined with the padding once."""
        dtype, length = self.embeddings.word_embeddings.weight.dtype, token_type_ids.shape[1]
        if not isinstance(attention_bias, (list, tuple)):
            shared = build_attention_bias(attention_mask, query_length=length, mask=mask, token_type_ids=token_type_ids,
                                          extra_bias=attention_bias, dtype=dtype, past_length=past_length,
                                          device=token_type_ids.device)
            return [shared] * len(self.layers)
        if len(attention_bias) != len(self.layers):
            raise InputError(f"attention_bias has {len(attention_bias)} entries for {len(self.layers)} layers")
        combined: dict[int, torch.Tensor | None] = {}
        for extra in attention_bias:
            if id(extra) not in combined:
                combined[id(extra)] = build_attention_bias(attention_mask, query_length=length, extra_bias=extra,
                                                           dtype=dtype)
        return [combined[id(extra)] for extra in attention_bias]

    def _decoding_biases(self, attention_mask, batch: int, length: int, past: list[int], device) -> list:
        """One bias per layer for :meth:`decode_step`: padding of ``attention_mask``, and a causal
        mask among the new positions (cached keys are all visible); None when nothing is masked."""
        dtype = self.embeddings.word_embeddings.weight.dtype
        mask = "causal" if length > 1 else "bidirectional"
        if attention_mask is None:
            by_past = {p: build_attention_bias(None, query_length=length, mask=mask, dtype=dtype, past_length=p,
                                               device=device) for p in set(past)}
            return [by_past[p] for p in past]
        if len(set(past)) > 1:
            raise InputError("an attention_mask needs every layer's cache to hold the same number of positions")
        if tuple(attention_mask.shape) != (batch, past[0] + length):
            raise InputError(f"attention_mask must be (batch, cached + new) = {(batch, past[0] + length)}, "
                             f"got {tuple(attention_mask.shape)}")
        bias = build_attention_bias(attention_mask, query_length=length, mask=mask, dtype=dtype, past_length=past[0])
        return [bias] * len(self.layers)

    def _run_layers(self, input_ids, token_type_ids, position_ids, biases: list, cache, *,
                    layer_input: LayerInput | None = None, hidden_states: list | None = None, keep_kv: bool = False):
        """Embed, then every layer (with ``layer_input`` before each, and ``biases[i]``) against
        ``cache`` (None, a :class:`KVCache`, or per-layer pairs or None). Returns the last layer's
        states and, with ``keep_kv``, each layer's ``(k, v)`` (cached and new keys; a
        :class:`KVCache` is extended in place instead). ``hidden_states`` collects the embeddings
        output and every layer's output."""
        x = self.embeddings(input_ids, token_type_ids, position_ids.expand(input_ids.shape[0], -1))
        rope = None
        if self.config.position == "rotary":
            rope = rotary_cos_sin(position_ids, self.config.head_size, self.config.rotary_base)
        if hidden_states is not None:
            hidden_states.append(x)
        kv_cache = cache if isinstance(cache, KVCache) else None
        presents = []
        for i, layer in enumerate(self.layers):
            if layer_input is not None:
                x = layer_input(i, x)
            if kv_cache is not None:
                past = _KVCacheLayer(kv_cache, i)
            else:
                past = None if cache is None else cache[i]
            x, kv = layer(x, biases[i], rope, past)
            if keep_kv and kv_cache is None:
                presents.append(kv)
            if hidden_states is not None:
                hidden_states.append(x)
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        return x, tuple(presents)

    def _sentence_vector(self, x, token_type_ids, attention_mask) -> torch.Tensor | None:
        """``pooled``: the mean over segment 0 (``sentence_pooling == "mean"``) or the pooler on [CLS]."""
        if self.config.sentence_pooling == "mean":
            keep = token_type_ids == 0
            if attention_mask is not None:
                keep = keep & attention_mask.bool()
            keep = keep.unsqueeze(-1).to(x.dtype)
            return (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        if self.pooler is None:
            return None
        pooled = self.pooler(x[:, 0])
        return torch.tanh(pooled) if self.config.pooler_activation == "tanh" else pooled

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(..., vocab)`` from hidden states ``(..., H)``."""
        if self.lm_head is None:
            raise InputError("this model has no LM head (config.with_lm_head=False): it cannot generate")
        return self.lm_head(hidden, self.embeddings.word_embeddings.weight)

