"""UniVAE: one RoFormer as both encoder and decoder of a sentence VAE with a multi-scale vMF latent.

The input is ``[x ; x]`` (:mod:`rosim.univae.inputs`): the encoder copy in segment 0, the decoder copy
in segment 1. Attention masks alone (:mod:`rosim.univae.masks`) turn the one Transformer into two
networks: the first ``L - num_latent_layers`` layers keep the copies apart (encoder bidirectional,
decoder causal); the last ``num_latent_layers`` layers also show every query position 0, the
encoder's [CLS].

At the input of every latent layer ℓ the encoder's [CLS] state ``h`` becomes a latent::

    μ_ℓ = l2normalise(in_proj_ℓ(h))      z_ℓ ~ vMF(μ_ℓ, κ)      x[:, 0] = out_proj_ℓ(z_ℓ)

so the decoder's only view of the encoder is through ``z = (z_1, ..., z_n)``, ``n × z_dim`` numbers.
The prior is uniform on each sphere and κ is fixed, so the KL term is a constant and training is the
decoder's token cross-entropy alone (padding excluded).

The backbone runs every pass itself: :meth:`UniVAE.forward` hands it the per-layer masks and a
``layer_input`` hook (:class:`LatentPath`) that writes the latents into position 0; decoding runs
:meth:`~rosim.modeling.model.RoFormerSim.decode_step` with the loops of :mod:`rosim.inference.decoding`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rosim.errors import InputError
from rosim.inference.decoding import (
    TokenSampler,
    banned_token_ids,
    beam_search,
    sample_sequences,
    seeded_generator,
)
from rosim.inference.sampling import check_sampling_args
from rosim.modeling.model import RoFormerSim
from rosim.tokenization.tokenizer import CharTokenizer
from rosim.univae.config import UniVAEConfig
from rosim.univae.evaluate import normalized_text
from rosim.univae.inputs import UniVAEInputs, build_univae_inputs, token_rows
from rosim.univae.io import (
    UNIVAE_CONFIG_NAME,
    UNIVAE_WEIGHTS_NAME,
    load_univae,
    save_univae,
    univae_on_backbone,
)
from rosim.univae.latents import check_latent_layers, check_latents
from rosim.univae.masks import make_uniae_mask, uniae_attention_bias
from rosim.univae.vmf import sample_uniform_sphere, sample_vmf

__all__ = [  # the names this module held before it was split, kept importable from here
    "UNIVAE_CONFIG_NAME", "UNIVAE_WEIGHTS_NAME", "LatentPath", "UniVAE", "UniVAEConfig", "UniVAEInputs",
    "UniVAEOutput", "make_uniae_mask", "normalized_text",
]


@dataclass
class UniVAEOutput:
    hidden: torch.Tensor  # (B, T, H) last layer
    mu: torch.Tensor  # (B, n, d) the mean directions computed on this pass
    z: torch.Tensor  # (B, n, d) the latents injected (samples, means, or the caller's)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings output, then every layer's output


class LatentPath:
    """The backbone's ``layer_input`` hook for one pass: at the input of latent layer ``j``
    (transformer layer ``first + j``) position 0 becomes ``out_proj_j(z_j)``, where ``z_j`` is the
    caller's latent (``z`` ``(B, n, d)``), else a vMF sample around μ_j (``noise``), else μ_j.
    ``mus`` and ``zs`` collect μ_j and z_j of the pass, layer by layer."""

    def __init__(self, vae: UniVAE, z: torch.Tensor | None, *, noise: bool, generator: torch.Generator | None):
        self.vae, self.z, self.noise, self.generator = vae, z, noise, generator
        self.mus: list[torch.Tensor] = []
        self.zs: list[torch.Tensor] = []

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        j = layer - self.vae.first_latent_layer
        if j < 0:
            return x
        mu = F.normalize(self.vae.in_proj[j](x[:, 0]), dim=-1)
        if self.z is not None:
            z_j = self.z[:, j]
        elif self.noise:
            z_j = sample_vmf(mu, self.vae.config.kappa, generator=self.generator)
        else:
            z_j = mu
        self.mus.append(mu)
        self.zs.append(z_j)
        return torch.cat([self.vae.out_proj[j](z_j).unsqueeze(1), x[:, 1:]], dim=1)


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
        return token_rows(self.tokenizer, texts, self.config.maxlen)

    def build_inputs(self, texts: str | Sequence[str], *, pad_to: int | None = None) -> UniVAEInputs:
        """``[CLS] x [SEP]`` twice, each copy padded to the batch's longest row (or ``pad_to``).

        Texts longer than ``maxlen - 2`` tokens are truncated.
        """
        return build_univae_inputs(self.tokenizer, texts, self.config.maxlen, pad_to=pad_to)

    def check_z(self, z, *, what: str = "z") -> torch.Tensor:
        """``z`` as a ``(n, num_latent_layers, z_dim)`` float tensor on the model's device, each part
        unit-normalised (:func:`~rosim.univae.latents.check_latents`)."""
        return check_latents(z, *self.latent_shape, device=self.device,
                             dtype=self.backbone.embeddings.word_embeddings.weight.dtype, what=what)

    def _check_layers(self, layers) -> list[int]:
        return check_latent_layers(layers, self.config.num_latent_layers, first_layer=self.first_latent_layer,
                                   num_layers=self.backbone.config.num_layers)

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
        batch = input_ids.shape[0]
        if segment_ids.shape != input_ids.shape:
            raise InputError(f"segment_ids has shape {tuple(segment_ids.shape)}, input_ids {tuple(input_ids.shape)}")
        if z is not None and tuple(z.shape) != (batch, *self.latent_shape):
            raise InputError(f"z must have shape {(batch, *self.latent_shape)}, got {tuple(z.shape)}")
        dtype = self.backbone.embeddings.word_embeddings.weight.dtype
        independent = uniae_attention_bias(segment_ids, expose_cls=False, dtype=dtype)
        uniae = uniae_attention_bias(segment_ids, expose_cls=True, dtype=dtype)
        path = LatentPath(self, z, noise=noise, generator=generator)
        out = self.backbone(input_ids, segment_ids, attention_mask, position_ids=position_ids,
                            attention_bias=[independent] * self.first_latent_layer + [uniae] * self.num_latent_layers,
                            output_hidden_states=output_hidden_states, validate=False, layer_input=path)
        return UniVAEOutput(out.last_hidden_state, torch.stack(path.mus, 1), torch.stack(path.zs, 1),
                            out.hidden_states)

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
        """The decoder's cache before its first token: per layer None (the independent layers, where
        the decoder copy never sees position 0), or the key/value of position 0 holding ``out_proj(z)``."""
        start = torch.full((z.shape[0], 1), self.tokenizer.cls_id, dtype=torch.long, device=z.device)
        position = torch.zeros(1, 1, dtype=torch.long, device=z.device)
        _, cache = self.backbone.decode_step(start, position_ids=position, token_type_ids=torch.zeros_like(start),
                                             layer_input=LatentPath(self, z, noise=False, generator=None))
        return [kv if i >= self.first_latent_layer else None for i, kv in enumerate(cache)]

    def _step(self, tokens: torch.Tensor, position: int, cache):
        """One decoder token per row at ``position``: ``(next-token logits (N, vocab) in float32, cache)``."""
        ids = tokens.unsqueeze(1)
        positions = torch.full((1, 1), position, dtype=torch.long, device=ids.device)
        logits, cache = self.backbone.decode_step(ids, position_ids=positions, cache=cache)
        return logits.float(), cache

    def _decoder_step(self, tokens: torch.Tensor, t: int, cache):
        """:func:`~rosim.inference.decoding.beam_search`'s ``step``: the ``t``-th decoder token."""
        return self._step(tokens, self.config.maxlen + t, cache)

    def _beam_search(self, z: torch.Tensor, beam_size: int, max_new: int) -> list[list[int]]:
        tok = self.tokenizer
        cache = self._latent_cache(z.repeat_interleave(beam_size, dim=0))
        return beam_search(self._decoder_step, cache, rows=z.shape[0], beam_size=beam_size, max_new=max_new,
                           start_id=tok.cls_id, end_id=tok.sep_id, pad_id=tok.pad_id,
                           banned=banned_token_ids(tok, z.device))

    def _sample(self, z: torch.Tensor, max_new: int, sampler: TokenSampler) -> list[list[int]]:
        tok = self.tokenizer
        return sample_sequences(self._decoder_step, self._latent_cache(z), rows=z.shape[0], max_new=max_new,
                                sampler=sampler, start_id=tok.cls_id, end_id=tok.sep_id, pad_id=tok.pad_id,
                                device=z.device)

    def _check_decoding(self, method, beam_size, top_p, top_k, temperature, max_length, batch_size) -> int:
        """Refuse bad decoding options; returns the number of tokens allowed before [SEP]."""
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
        return max_new

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
        top-k, top-p, drawn with ``generator`` or one seeded with ``seed``). At most ``max_length``
        tokens (default ``maxlen - 2``) before [SEP]. [PAD], [CLS], [MASK] and [UNK] are never produced.
        """
        z = self.check_z(z)
        max_new = self._check_decoding(method, beam_size, top_p, top_k, temperature, max_length, batch_size)
        sampler = None
        if method == "sample":  # the sort-based nucleus: the draws this decoder has always made
            sampler = TokenSampler(top_p=top_p, top_k=top_k, temperature=temperature, partial_sort=False,
                                   generator=generator if generator is not None else seeded_generator(seed, self.device),
                                   banned=banned_token_ids(self.tokenizer, self.device))
        was_training = self.training
        self.eval()
        try:
            ids: list[list[int]] = []
            with torch.no_grad():
                for s in range(0, z.shape[0], batch_size):
                    chunk = z[s:s + batch_size]
                    ids += self._beam_search(chunk, beam_size, max_new) if sampler is None else \
                        self._sample(chunk, max_new, sampler)
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
        generator = seeded_generator(seed, self.device)
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
        generator = seeded_generator(seed, self.device)
        z = self.encode(items, convert_to="torch").to(self.device).repeat_interleave(n, dim=0)
        out = self.decode(self.redraw(z, layers, generator=generator), generator=generator, **decode_kwargs)
        return [out[i * n:(i + 1) * n] for i in range(len(items))]

    # ---------------------------------------------------------------- construction, saving, loading
    @classmethod
    def from_backbone(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None,
                      **config) -> UniVAE:
        """A new UniVAE on a rosim checkpoint (fresh latent projections); ``config`` sets :class:`UniVAEConfig`."""
        vae = univae_on_backbone(cls, directory, **config)
        return vae.to(device) if device is not None else vae

    def save_pretrained(self, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write the backbone as a rosim checkpoint plus ``univae.json`` and ``univae.safetensors``, atomically."""
        return save_univae(self, directory, metadata=metadata)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None) -> UniVAE:
        """Load a UniVAE saved by :meth:`save_pretrained`; every tensor must match (strict)."""
        vae = load_univae(cls, directory)
        return vae.to(device) if device is not None else vae

    def extra_repr(self) -> str:
        c = self.config
        return (f"latent layers {self.first_latent_layer}..{self.backbone.config.num_layers - 1} "
                f"({c.num_latent_layers} x {c.z_dim} dims), kappa={c.kappa}, maxlen={c.maxlen}")
