"""UniVAE: one RoFormer as both encoder and decoder of a sentence VAE with a multi-scale vMF latent.

The input is ``[x ; x]``: the *encoder copy* ``[CLS] x [SEP]`` in segment 0 and the *decoder copy*
``[CLS] x [SEP]`` in segment 1, both padded to the same length. Attention masks alone turn the one
Transformer into two networks (with c = cumsum(segment ids)):

* **independent mask** (the first ``L - num_latent_layers`` layers): query i sees key j iff
  ``s_i == s_j and c_j <= c_i`` — the encoder is bidirectional, the decoder causal, and neither
  sees the other;
* **UniAE mask** (the last ``num_latent_layers`` layers): the same, plus every query sees position 0
  (the encoder's [CLS]).

At the input of every latent layer ℓ the encoder's [CLS] state ``h`` becomes a latent::

    μ_ℓ = l2normalise(in_proj_ℓ(h))      z_ℓ ~ vMF(μ_ℓ, κ)      x[:, 0] = out_proj_ℓ(z_ℓ)

so the decoder's only view of the encoder is through ``z = (z_1, ..., z_n)``, ``n × z_dim`` numbers.
The prior is uniform on each sphere and κ is fixed, so the KL term is a constant and training is the
decoder's token cross-entropy alone (padding excluded).

The decoder copy always starts at position ``maxlen`` (rotary positions), whatever the batch's padded
length, so the decoder cannot read the sentence length from its start position (the reference pads
both copies to ``maxlen`` for the same reason; padding to the batch's longest row gives identical
outputs and costs less).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rosim.errors import CheckpointError, InputError
from rosim.inference.sampling import check_sampling_args, filter_logits
from rosim.inference.sampling import sample as sample_token
from rosim.modeling.model import RoFormerSim, apply_rotary, rotary_cos_sin
from rosim.tokenization.tokenizer import CharTokenizer
from rosim.univae.vmf import check_kappa, sample_uniform_sphere, sample_vmf

UNIVAE_CONFIG_NAME, UNIVAE_WEIGHTS_NAME = "univae.json", "univae.safetensors"


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class UniVAEConfig:
    """The latent path. Defaults are the reference's: 4 latent layers × 16 dimensions, κ = 32, maxlen 32."""

    num_latent_layers: int = 4
    z_dim: int = 16
    kappa: float = 32.0
    maxlen: int = 32  # tokens per copy, [CLS] and [SEP] included; the decoder copy starts at this position
    extra: dict[str, Any] = field(default_factory=dict)  # provenance, never read by the model

    def __post_init__(self) -> None:
        for name, low in (("num_latent_layers", 1), ("z_dim", 2), ("maxlen", 3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"univae {name} must be an integer >= {low}, got {value!r}")
        self.kappa = check_kappa(self.kappa)

    def check_backbone(self, backbone: RoFormerSim) -> None:
        c = backbone.config
        if self.num_latent_layers > c.num_layers:
            raise InputError(
                f"num_latent_layers={self.num_latent_layers} exceeds the backbone's {c.num_layers} layers"
            )
        if c.type_vocab_size < 2:
            raise InputError("UniVAE needs two segment ids (type_vocab_size >= 2) for the encoder and decoder copies")
        if c.position == "absolute" and 2 * self.maxlen > c.max_position:
            raise InputError(f"2 * maxlen = {2 * self.maxlen} exceeds the backbone's max_position {c.max_position}")
        if backbone.lm_head is None:
            raise InputError("UniVAE needs a backbone with an LM head (with_lm_head=True) to decode")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniVAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise InputError(f"univae config has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def make_uniae_mask(segment_ids: torch.Tensor, *, expose_cls: bool) -> torch.Tensor:
    """Visibility ``(B, 1, T, T)`` (True = may attend) for segment ids ``(B, T)``.

    ``expose_cls=False`` is the independent mask (M[i,j] = s_i == s_j and c_j <= c_i with
    c = cumsum(s)); ``expose_cls=True`` is the UniAE mask: the same with column 0 visible to all.
    """
    s = segment_ids
    c = torch.cumsum(s, dim=-1)
    allowed = (s[:, :, None] == s[:, None, :]) & (c[:, None, :] <= c[:, :, None])
    if expose_cls:
        allowed[:, :, 0] = True
    return allowed.unsqueeze(1)


def _to_bias(allowed: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------
# inputs and outputs
# --------------------------------------------------------------------------------------------
@dataclass
class UniVAEInputs:
    """``[x ; x]`` for a batch: ``(B, 2L)`` ids, segments and padding mask, ``(1, 2L)`` positions."""

    input_ids: torch.Tensor
    segment_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def length(self) -> int:
        """L, the padded length of each copy; the decoder copy is ``[:, L:]``."""
        return self.input_ids.shape[1] // 2

    def to(self, device) -> UniVAEInputs:
        return UniVAEInputs(*(t.to(device) for t in dataclasses.astuple(self)))

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class UniVAEOutput:
    hidden: torch.Tensor  # (B, T, H) last layer
    mu: torch.Tensor  # (B, n, d) the mean directions computed on this pass
    z: torch.Tensor  # (B, n, d) the latents injected (samples, means, or the caller's)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings output, then every layer's output


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class UniVAE(nn.Module):
    """A UniVAE over a :class:`~rosim.modeling.model.RoFormerSim` backbone and its tokenizer.

    >>> vae = UniVAE.from_backbone("path/to/rosim-model")          # doctest: +SKIP
    >>> z = vae.encode(["广州和深圳哪个好？"])                        # (1, 4, 16) unit vectors
    >>> vae.decode(z)                                               # ['广州和深圳哪个好？'] once trained
    >>> vae.resample(["广州和深圳哪个好？"], layers=[0, 1], n=3, seed=0)
    """

    def __init__(self, backbone: RoFormerSim, tokenizer: CharTokenizer, config: UniVAEConfig | None = None):
        super().__init__()
        config = config or UniVAEConfig()
        config.check_backbone(backbone)
        if len(tokenizer) != backbone.config.vocab_size:
            raise InputError(f"tokenizer has {len(tokenizer)} tokens, backbone vocab_size is {backbone.config.vocab_size}")
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        hidden, n, d = backbone.config.hidden_size, config.num_latent_layers, config.z_dim
        self.in_proj = nn.ModuleList(nn.Linear(hidden, d) for _ in range(n))
        self.out_proj = nn.ModuleList(nn.Linear(d, hidden) for _ in range(n))
        for lin in self.in_proj:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        for lin in self.out_proj:  # unit z -> a state with the per-component scale of a LayerNorm output
            nn.init.normal_(lin.weight, std=1.0)
            nn.init.zeros_(lin.bias)

    # ---------------------------------------------------------------- properties
    @property
    def num_latent_layers(self) -> int:
        return self.config.num_latent_layers

    @property
    def first_latent_layer(self) -> int:
        """Index of the first transformer layer that receives a latent (and uses the UniAE mask)."""
        return self.backbone.config.num_layers - self.config.num_latent_layers

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.config.num_latent_layers, self.config.z_dim

    # ---------------------------------------------------------------- inputs
    def _token_rows(self, texts: str | Sequence[str]) -> list[list[int]]:
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise InputError("no texts given")
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise InputError(f"text {i} is a {type(t).__name__}, expected str")
            if not t.strip():
                raise InputError(f"text {i} is empty or whitespace only")
        tok = self.tokenizer
        return [tok.build_inputs(ids, None, self.config.maxlen)[0] for ids in tok.encode_batch_ids(items)]

    def build_inputs(self, texts: str | Sequence[str], *, pad_to: int | None = None) -> UniVAEInputs:
        """``[CLS] x [SEP]`` twice, each copy padded to the batch's longest row (or ``pad_to``).

        Texts longer than ``maxlen - 2`` tokens are truncated.
        """
        rows = self._token_rows(texts)
        length = max(len(r) for r in rows) if pad_to is None else pad_to
        if length < max(len(r) for r in rows) or length > self.config.maxlen:
            raise InputError(f"pad_to must lie in [{max(len(r) for r in rows)}, {self.config.maxlen}], got {pad_to}")
        one = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            one[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        segments = torch.cat([torch.zeros_like(one), torch.ones_like(one)], dim=1)
        positions = torch.cat([torch.arange(length), self.config.maxlen + torch.arange(length)])[None]
        return UniVAEInputs(torch.cat([one, one], 1), segments, torch.cat([mask, mask], 1), positions)

    def check_z(self, z, *, what: str = "z") -> torch.Tensor:
        """``z`` as a ``(n, num_latent_layers, z_dim)`` float tensor on the model's device, each part unit-normalised.

        Accepts ``(n, layers, dim)``, the flat ``(n, layers * dim)`` of the reference, or one latent
        without the batch dimension.
        """
        n_lat, d = self.latent_shape
        if isinstance(z, np.ndarray):
            z = torch.from_numpy(np.ascontiguousarray(z))
        if not isinstance(z, torch.Tensor):
            raise InputError(f"{what} must be a torch tensor or NumPy array, got {type(z).__name__}")
        if not (z.is_floating_point()):
            raise InputError(f"{what} must hold floating-point numbers, got dtype {z.dtype}")
        shape = tuple(z.shape)
        if shape in ((n_lat, d), (n_lat * d,)):
            z = z.unsqueeze(0)
        if z.dim() == 2 and z.shape[1] == n_lat * d:
            z = z.reshape(-1, n_lat, d)
        if z.dim() != 3 or tuple(z.shape[1:]) != (n_lat, d) or z.shape[0] == 0:
            raise InputError(
                f"{what} must have shape (n, {n_lat}, {d}) or (n, {n_lat * d}) for this model "
                f"({n_lat} latent layers x {d} dimensions), got {shape}"
            )
        if not bool(torch.isfinite(z).all()):
            raise InputError(f"{what} contains NaN or infinite values")
        z = z.to(device=self.device, dtype=self.backbone.embeddings.word_embeddings.weight.dtype)
        norms = z.norm(dim=-1)
        if bool((norms < 1e-12).any()):
            row, part = (norms < 1e-12).nonzero()[0].tolist()
            raise InputError(f"{what}[{row}, {part}] is the zero vector: every latent part must have a direction")
        return z / norms.unsqueeze(-1)

    def _check_layers(self, layers) -> list[int]:
        n = self.config.num_latent_layers
        if isinstance(layers, int):
            layers = [layers]
        try:
            items = list(layers)
        except TypeError:
            raise InputError(f"layers must be a list of latent-layer indices, got {layers!r}") from None
        if not items:
            raise InputError("layers is empty: name at least one latent layer to redraw")
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                raise InputError(f"layers must hold integers, got {item!r}")
            if not -n <= item < n:
                raise InputError(
                    f"latent layer {item} is out of range: this model has {n} latent layer(s), use 0..{n - 1} "
                    f"(or -{n}..-1); 0 is the first latent layer (transformer layer {self.first_latent_layer} "
                    f"of 0..{self.backbone.config.num_layers - 1})"
                )
            out.append(int(item) % n)
        return sorted(set(out))

    # ---------------------------------------------------------------- the forward pass
    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        z: torch.Tensor | None = None,
        noise: bool = True,
        generator: torch.Generator | None = None,
        output_hidden_states: bool = False,
    ) -> UniVAEOutput:
        """Run the backbone with the two masks and the latent path.

        The latent injected at each latent layer is the caller's ``z`` (``(B, n, d)``, the decoder
        mode), else a vMF sample around μ (``noise=True``, training), else μ itself (the encoder mode).
        A sequence with only segment 0 runs the encoder alone (it never sees the decoder copy).
        """
        bb = self.backbone
        batch, length = input_ids.shape
        if segment_ids.shape != input_ids.shape:
            raise InputError(f"segment_ids has shape {tuple(segment_ids.shape)}, input_ids {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None]
        if z is not None and tuple(z.shape) != (batch, *self.latent_shape):
            raise InputError(f"z must have shape {(batch, *self.latent_shape)}, got {tuple(z.shape)}")
        dtype = bb.embeddings.word_embeddings.weight.dtype
        independent = _to_bias(make_uniae_mask(segment_ids, expose_cls=False), attention_mask, dtype)
        uniae = _to_bias(make_uniae_mask(segment_ids, expose_cls=True), attention_mask, dtype)
        x = bb.embeddings(input_ids, segment_ids, position_ids.expand(batch, -1))
        rope = None
        if bb.config.position == "rotary":
            rope = rotary_cos_sin(position_ids, bb.config.head_size, bb.config.rotary_base)
        hidden_states = [x] if output_hidden_states else None
        mus, zs = [], []
        first = self.first_latent_layer
        for i, layer in enumerate(bb.layers):
            j = i - first
            if j >= 0:
                mu = F.normalize(self.in_proj[j](x[:, 0]), dim=-1)
                if z is not None:
                    z_j = z[:, j]
                elif noise:
                    z_j = sample_vmf(mu, self.config.kappa, generator=generator)
                else:
                    z_j = mu
                mus.append(mu)
                zs.append(z_j)
                x = torch.cat([self.out_proj[j](z_j).unsqueeze(1), x[:, 1:]], dim=1)
            x, _ = layer(x, uniae if j >= 0 else independent, rope)
            if output_hidden_states:
                hidden_states.append(x)
        return UniVAEOutput(x, torch.stack(mus, 1), torch.stack(zs, 1),
                            None if hidden_states is None else tuple(hidden_states))

    def loss(self, inputs: UniVAEInputs, *, noise: bool = True, z: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, int, int]:
        """Mean cross-entropy over the decoder copy's real tokens (x and [SEP]; padding excluded).

        Returns ``(loss, number of target tokens, number predicted correctly by argmax)``.
        """
        out = self(**inputs.as_kwargs(), z=z, noise=noise, generator=generator)
        half = inputs.length
        hidden = out.hidden[:, half:-1]  # decoder positions that predict a next token
        targets = inputs.input_ids[:, half + 1:]
        valid = inputs.attention_mask[:, half + 1:].bool()
        logits = self.backbone.lm_logits(hidden[valid]).float()
        gold = targets[valid]
        loss = F.cross_entropy(logits, gold)
        correct = int((logits.argmax(-1) == gold).sum())
        return loss, int(valid.sum()), correct

    # ---------------------------------------------------------------- encoder mode
    @torch.no_grad()
    def encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """The noiseless latent means ``(B, n, d)`` of one batch (the encoder copy alone)."""
        enc = self.tokenizer.pad([(r, [0] * len(r)) for r in self._token_rows(texts)]).to(self.device)
        return self(enc.input_ids, torch.zeros_like(enc.input_ids), enc.attention_mask, noise=False).mu

    def encode(self, texts: str | Sequence[str], *, batch_size: int = 64,
               convert_to: Literal["numpy", "torch"] = "numpy"):
        """Latent means ``(n, num_latent_layers, z_dim)`` (unit vectors; ``(layers, dim)`` for one string)."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self._token_rows(items)  # validate everything before work starts
        was_training = self.training
        self.eval()
        try:
            out = torch.cat([self.encode_batch(items[s:s + batch_size]).float().cpu()
                             for s in range(0, len(items), batch_size)])
        finally:
            self.train(was_training)
        out = out[0] if single else out
        return out.numpy() if convert_to == "numpy" else out

    # ---------------------------------------------------------------- decoder mode
    def _latent_cache(self, z: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer: None (independent layers), or the key/value of position 0 holding out_proj(z_ℓ)."""
        bb = self.backbone
        past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * bb.config.num_layers
        rope = None
        if bb.config.position == "rotary":
            rope = rotary_cos_sin(torch.zeros(1, 1, dtype=torch.long, device=z.device), bb.config.head_size,
                                  bb.config.rotary_base)
        for j in range(self.config.num_latent_layers):
            attention = bb.layers[self.first_latent_layer + j].attention
            u = self.out_proj[j](z[:, j]).unsqueeze(1)  # (N, 1, H)
            k, v = attention._split(attention.key(u)), attention._split(attention.value(u))
            if rope is not None:
                k = apply_rotary(k, *rope)
            past[self.first_latent_layer + j] = (k, v)
        return past

    def _step(self, tokens: torch.Tensor, position: int, past):
        """One decoder token per row at ``position``; every cached key is visible, so no mask is needed."""
        bb = self.backbone
        ids = tokens.unsqueeze(1)
        pos = torch.full((1, 1), position, dtype=torch.long, device=ids.device)
        x = bb.embeddings(ids, torch.ones_like(ids), pos.expand(ids.shape[0], -1))
        rope = rotary_cos_sin(pos, bb.config.head_size, bb.config.rotary_base) if bb.config.position == "rotary" else None
        new_past = []
        for layer, cache in zip(bb.layers, past, strict=True):
            x, kv = layer(x, None, rope, cache)
            new_past.append(kv)
        return bb.lm_logits(x[:, -1]).float(), new_past

    def _banned(self) -> torch.Tensor:
        tok = self.tokenizer
        return torch.tensor([tok.pad_id, tok.cls_id, tok.mask_id, tok.unk_id], device=self.device)

    @torch.no_grad()
    def _beam_search(self, z: torch.Tensor, beam_size: int, max_new: int) -> list[list[int]]:
        """Beam search on summed log-probabilities; a row stops when its best beam has ended
        (exact: live scores only decrease). ``beam_size=1`` is greedy decoding."""
        tok, k = self.tokenizer, beam_size
        rows = z.shape[0]
        z = z.repeat_interleave(k, dim=0)
        past = self._latent_cache(z)
        banned = self._banned()
        scores = torch.zeros(rows, k, device=z.device)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep one
        tokens = torch.full((rows * k,), tok.cls_id, dtype=torch.long, device=z.device)
        seqs = torch.empty(rows * k, 0, dtype=torch.long, device=z.device)
        finished = torch.zeros(rows * k, dtype=torch.bool, device=z.device)
        for t in range(max_new + 1):  # max_new text tokens, then [SEP]
            logits, past = self._step(tokens, self.config.maxlen + t, past)
            logp = torch.log_softmax(logits, dim=-1)
            logp[:, banned] = float("-inf")
            if t == max_new:  # out of room: only [SEP] may follow
                keep = logp[:, tok.sep_id].clone()
                logp.fill_(float("-inf"))
                logp[:, tok.sep_id] = keep
            logp[finished] = float("-inf")
            logp[finished, tok.pad_id] = 0.0  # an ended beam carries its score unchanged
            vocab = logp.shape[-1]
            cand = (scores.reshape(-1, 1) + logp).reshape(rows, k * vocab)
            scores, idx = cand.topk(k, dim=-1)
            src = (torch.arange(rows, device=z.device)[:, None] * k + idx // vocab).reshape(-1)
            tokens = (idx % vocab).reshape(-1)
            seqs = torch.cat([seqs[src], tokens[:, None]], dim=1)
            finished = finished[src] | (tokens == tok.sep_id)
            past = [(kk[src], vv[src]) for kk, vv in past]
            if bool(finished.reshape(rows, k)[:, 0].all()):
                break
        best = seqs.reshape(rows, k, -1)[:, 0].tolist()
        return [[i for i in row[:row.index(tok.sep_id)] if i != tok.pad_id] if tok.sep_id in row else row
                for row in best]

    @torch.no_grad()
    def _sample_decode(self, z: torch.Tensor, max_new: int, *, top_p, top_k, temperature,
                       generator: torch.Generator) -> list[list[int]]:
        tok = self.tokenizer
        rows = z.shape[0]
        past = self._latent_cache(z)
        banned = self._banned()
        tokens = torch.full((rows,), tok.cls_id, dtype=torch.long, device=z.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=z.device)
        out: list[list[int]] = [[] for _ in range(rows)]
        for t in range(max_new + 1):
            logits, past = self._step(tokens, self.config.maxlen + t, past)
            logits[:, banned] = float("-inf")
            if t == max_new:
                tokens = torch.full_like(tokens, tok.sep_id)
            else:
                tokens = sample_token(filter_logits(logits, top_p=top_p, top_k=top_k, temperature=temperature),
                                      generator)
            tokens = tokens.masked_fill(finished, tok.pad_id)
            for r, (token, done) in enumerate(zip(tokens.tolist(), finished.tolist(), strict=True)):
                if not done and token != tok.sep_id:
                    out[r].append(token)
            finished |= tokens == tok.sep_id
            if bool(finished.all()):
                break
        return out

    def decode(
        self,
        z,
        *,
        method: Literal["beam", "sample"] = "beam",
        beam_size: int = 1,
        top_p: float | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        max_length: int | None = None,
        seed: int | None = None,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Sentences from latents ``z`` ``(n, layers, dim)`` or ``(n, layers * dim)``; each part is renormalised.

        ``method="beam"`` (``beam_size=1``: greedy, as the reference) or ``"sample"`` (temperature,
        top-k, top-p). At most ``max_length`` tokens (default ``maxlen - 2``) before [SEP].
        """
        z = self.check_z(z)
        if method not in ("beam", "sample"):
            raise InputError(f"method must be 'beam' or 'sample', got {method!r}")
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size <= 0:
            raise InputError(f"beam_size must be a positive integer, got {beam_size!r}")
        check_sampling_args(top_p, top_k, temperature)
        max_new = self.config.maxlen - 2 if max_length is None else max_length
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
            raise InputError(f"max_length must be a positive integer, got {max_length!r}")
        if self.backbone.config.position == "absolute" and self.config.maxlen + max_new + 1 > self.backbone.config.max_position:
            raise InputError(f"max_length={max_new} runs past the backbone's max_position {self.backbone.config.max_position}")
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        if generator is None:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        was_training = self.training
        self.eval()
        try:
            ids: list[list[int]] = []
            for s in range(0, z.shape[0], batch_size):
                chunk = z[s:s + batch_size]
                if method == "beam":
                    ids += self._beam_search(chunk, beam_size, max_new)
                else:
                    ids += self._sample_decode(chunk, max_new, top_p=top_p, top_k=top_k, temperature=temperature,
                                               generator=generator)
        finally:
            self.train(was_training)
        return [self.tokenizer.decode(row) for row in ids]

    # ---------------------------------------------------------------- the modes built on encode/decode
    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` latents from the prior: uniform on each of the ``num_latent_layers`` spheres."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        return sample_uniform_sphere((n, self.config.num_latent_layers), self.config.z_dim,
                                     generator=generator, device=self.device)

    def sample(self, n: int, *, seed: int | None = None, **decode_kwargs) -> list[str]:
        """``n`` sentences decoded from prior draws (see :meth:`decode` for the decoding options)."""
        generator = self._generator(seed)
        return self.decode(self.sample_prior(n, generator=generator), generator=generator, **decode_kwargs)

    def reconstruct(self, texts: str | Sequence[str], **decode_kwargs) -> list[str]:
        """Encode to the latent means and decode them back."""
        return self.decode(self.encode(texts, convert_to="torch"), **decode_kwargs)

    def redraw(self, z, layers: int | Sequence[int], *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A copy of ``z`` with the parts of ``layers`` (latent-layer indices, 0 = first) drawn afresh from the prior."""
        z = self.check_z(z).clone()
        for j in self._check_layers(layers):
            z[:, j] = sample_uniform_sphere((z.shape[0],), self.config.z_dim, generator=generator,
                                            device=z.device, dtype=z.dtype)
        return z

    def resample(self, texts: str | Sequence[str], layers: int | Sequence[int], *, n: int = 1,
                 seed: int | None = None, **decode_kwargs) -> list[list[str]]:
        """For each text, ``n`` sentences that keep its latents except those of ``layers``, which are redrawn.

        ``layers`` are latent-layer indices: 0 is the first latent layer (nearest the input), -1 the last.
        """
        layers = self._check_layers(layers)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        items = [texts] if isinstance(texts, str) else list(texts)
        generator = self._generator(seed)
        z = self.encode(items, convert_to="torch").to(self.device).repeat_interleave(n, dim=0)
        out = self.decode(self.redraw(z, layers, generator=generator), generator=generator, **decode_kwargs)
        return [out[i * n:(i + 1) * n] for i in range(len(items))]

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        return g

    # ---------------------------------------------------------------- construction, saving, loading
    @classmethod
    def from_backbone(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None,
                      **config) -> UniVAE:
        """A new UniVAE on a rosim checkpoint (fresh latent projections); ``config`` sets :class:`UniVAEConfig`."""
        from rosim.checkpoints.io import load_checkpoint

        backbone, tokenizer, _ = load_checkpoint(directory)
        vae = cls(backbone, tokenizer, UniVAEConfig(**config))
        return vae.to(device) if device is not None else vae

    def save_pretrained(self, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write the backbone as a rosim checkpoint plus ``univae.json`` and ``univae.safetensors``, atomically."""
        from safetensors.torch import save_file

        from rosim.checkpoints.io import atomic_directory, save_checkpoint

        latent = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        with atomic_directory(directory) as tmp:
            save_checkpoint(tmp, self.backbone, self.tokenizer, metadata={"univae": True, **(metadata or {})})
            save_file(latent, str(tmp / UNIVAE_WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / UNIVAE_CONFIG_NAME).write_text(
                json.dumps({"model_type": "univae", **self.config.to_dict()}, indent=2, ensure_ascii=False),
                encoding="utf-8")
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None) -> UniVAE:
        """Load a UniVAE saved by :meth:`save_pretrained`; every tensor must match (strict)."""
        from rosim.checkpoints.io import load_checkpoint, load_state_strict, read_safetensors

        directory = Path(directory)
        backbone, tokenizer, _ = load_checkpoint(directory)
        path = directory / UNIVAE_CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(
                f"{directory} is a rosim checkpoint but not a UniVAE ({UNIVAE_CONFIG_NAME} not found); "
                f"train one with `rosim vae train --init {directory} ...`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("model_type") != "univae":
                raise CheckpointError(f"{path} does not describe a UniVAE (model_type must be 'univae')")
            config = UniVAEConfig.from_dict(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
        except (InputError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: {exc}") from None
        vae = cls(backbone, tokenizer, config)
        latent = read_safetensors(directory / UNIVAE_WEIGHTS_NAME)
        state = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}, **latent}
        load_state_strict(vae, state, source=str(directory / UNIVAE_WEIGHTS_NAME))
        vae.eval()
        return vae.to(device) if device is not None else vae

    def extra_repr(self) -> str:
        c = self.config
        return (f"latent layers {self.first_latent_layer}..{self.backbone.config.num_layers - 1} "
                f"({c.num_latent_layers} x {c.z_dim} dims), kappa={c.kappa}, maxlen={c.maxlen}")


def normalized_text(tokenizer: CharTokenizer, text: str, maxlen: int | None = None) -> str:
    """What a perfect reconstruction of ``text`` looks like: tokenised (and truncated), then decoded."""
    ids = tokenizer.encode_ids(text)
    if maxlen is not None:
        ids = ids[: maxlen - 2]
    return tokenizer.decode(ids)
