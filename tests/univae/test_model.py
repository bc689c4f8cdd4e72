"""UniVAE masks (by perturbation), the latent path, decoding, the loss, saving/loading and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rosim.errors import CheckpointError, InputError
from rosim.univae import UniVAE, UniVAEConfig, make_uniae_mask
from tests.univae.helpers import SENTENCES, tiny_vae

TEXTS = ["今天天气不错", "我喜欢北京", "广州和深圳哪个好？"]


def _fixed_z(vae, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(batch, *vae.latent_shape, generator=g), dim=-1)


def _run(vae, inputs, **kw):
    with torch.no_grad():
        return vae(**inputs.as_kwargs(), output_hidden_states=True, **kw)


def test_mask_definitions():
    s = torch.tensor([[0, 0, 0, 1, 1, 1]])
    ind = make_uniae_mask(s, expose_cls=False)[0, 0]
    uni = make_uniae_mask(s, expose_cls=True)[0, 0]
    enc, dec = slice(0, 3), slice(3, 6)
    assert ind[enc, enc].all() and not ind[enc, dec].any() and not ind[dec, enc].any()  # no cross-visibility
    assert torch.equal(ind[dec, dec], torch.ones(3, 3, dtype=torch.bool).tril())  # causal decoder
    assert torch.equal(uni[:, 0], torch.ones(6, dtype=torch.bool))  # everyone sees the encoder [CLS]
    assert torch.equal(uni[:, 1:], ind[:, 1:])


def test_inputs_layout():
    vae = tiny_vae()
    inputs = vae.build_inputs(TEXTS)
    half = inputs.length
    assert torch.equal(inputs.input_ids[:, :half], inputs.input_ids[:, half:])  # [x ; x]
    assert (inputs.segment_ids[:, :half] == 0).all() and (inputs.segment_ids[:, half:] == 1).all()
    assert inputs.position_ids[0, half].item() == vae.config.maxlen  # decoder always starts at maxlen
    long = vae.build_inputs(["很" * 40])
    assert long.length == vae.config.maxlen  # truncated to maxlen tokens per copy


def test_encoder_tokens_reach_the_decoder_only_through_the_latents():
    vae = tiny_vae(seed=1)
    a = vae.build_inputs(["今天天气不错", "我喜欢北京"])
    b = vae.build_inputs(["今天天气不错", "我喜欢北京"])
    b.input_ids[0, 1:7] = torch.tensor([11, 12, 13, 14, 15, 16])  # perturb encoder tokens (not [CLS])
    b.input_ids[1, 0] = vae.tokenizer.mask_id  # and the encoder [CLS] token itself
    half = a.length
    z = _fixed_z(vae, 2)
    out_a, out_b = _run(vae, a, z=z), _run(vae, b, z=z)
    # with the latent path fixed, every decoder state in every layer (independent and UniAE) is unchanged
    for ha, hb in zip(out_a.hidden_states, out_b.hidden_states, strict=True):
        assert torch.equal(ha[:, half:], hb[:, half:])
    # ... while the encoder, and hence the latent means, did change: the test is not vacuous
    assert not torch.allclose(out_a.mu, out_b.mu)
    free_a, free_b = _run(vae, a, noise=False), _run(vae, b, noise=False)
    assert not torch.allclose(free_a.hidden[:, half:], free_b.hidden[:, half:])
    # the noiseless pass is exactly the decoder mode fed with its own means
    assert torch.equal(free_a.hidden, _run(vae, a, z=free_a.mu).hidden)


def test_decoder_is_causal_and_encoder_never_sees_the_decoder():
    vae = tiny_vae(seed=2)
    a = vae.build_inputs(["广州和深圳哪个好？"])
    half = a.length
    for p in range(half + 1, 2 * half):
        b = vae.build_inputs(["广州和深圳哪个好？"])
        b.input_ids[0, p] = 9  # perturb one decoder token
        out_a, out_b = _run(vae, a, noise=False), _run(vae, b, noise=False)
        for ha, hb in zip(out_a.hidden_states, out_b.hidden_states, strict=True):
            assert torch.equal(ha[:, :p], hb[:, :p])  # encoder and earlier decoder positions unchanged
        assert torch.equal(out_a.mu, out_b.mu)
        assert not torch.equal(out_a.hidden[:, p], out_b.hidden[:, p])


def test_padding_to_maxlen_changes_nothing():
    vae = tiny_vae(seed=3)
    z = _fixed_z(vae, 3)
    short, full = vae.build_inputs(TEXTS), vae.build_inputs(TEXTS, pad_to=vae.config.maxlen)
    out_s, out_f = _run(vae, short, z=z), _run(vae, full, z=z)
    hs, hf = short.length, full.length
    for i in range(3):
        n = int(short.attention_mask[i, :hs].sum())
        torch.testing.assert_close(out_s.hidden[i, :n], out_f.hidden[i, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_s.hidden[i, hs:hs + n], out_f.hidden[i, hf:hf + n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_run(vae, short, noise=False).mu, _run(vae, full, noise=False).mu, atol=1e-6, rtol=1e-5)


def test_loss_counts_decoder_tokens_without_padding():
    vae = tiny_vae(seed=4)
    batch = vae.build_inputs(TEXTS)
    loss, tokens, _ = vae.loss(batch, noise=False)
    assert tokens == sum(len(t) + 1 for t in TEXTS)  # the characters and [SEP]; no [CLS], no padding
    total = 0.0
    for t in TEXTS:
        single, n, _ = vae.loss(vae.build_inputs([t]), noise=False)
        total += float(single.detach()) * n
    assert float(loss.detach()) * tokens == pytest.approx(total, rel=1e-5)


def test_incremental_decoding_matches_the_full_forward():
    vae = tiny_vae(seed=5)
    texts = ["今天天气不错", "我喜欢北京"]
    inputs = vae.build_inputs(texts)
    z = _fixed_z(vae, 2)
    full = vae.backbone.lm_logits(_run(vae, inputs, z=z).hidden[:, inputs.length:])
    past = vae._latent_cache(z)
    dec = inputs.input_ids[:, inputs.length:]
    real = inputs.attention_mask[:, inputs.length:].bool()
    with torch.no_grad():
        for t in range(dec.shape[1]):
            logits, past = vae._step(dec[:, t], vae.config.maxlen + t, past)
            rows = real[:, t]  # a padding query of the full pass does not see itself: compare real tokens
            torch.testing.assert_close(logits[rows], full[rows, t], atol=1e-5, rtol=1e-5)


def test_beam_search_scores_at_least_greedy():
    vae = tiny_vae(seed=6)
    z = _fixed_z(vae, 4, seed=1)

    def score(text, zi):
        inp = vae.build_inputs([text]) if text else None
        if inp is None:
            return None
        loss, n, _ = vae.loss(inp, z=zi[None])
        return -float(loss) * n

    greedy, beam = vae.decode(z, beam_size=1, max_length=6), vae.decode(z, beam_size=4, max_length=6)
    assert len(greedy) == len(beam) == 4
    for g, b, zi in zip(greedy, beam, z, strict=True):
        if g and b and "[UNK]" not in g + b and g.replace(" ", "") == g and b.replace(" ", "") == b:
            assert score(b, zi) >= score(g, zi) - 1e-4


def test_modes_shapes_and_seeds():
    vae = tiny_vae(seed=7)
    z = vae.encode(TEXTS)
    assert z.shape == (3, 2, 4) and np.allclose(np.linalg.norm(z, axis=-1), 1, atol=1e-5)
    assert vae.encode("今天天气不错").shape == (2, 4)
    assert vae.decode(z.reshape(3, 8)) == vae.decode(z) == vae.reconstruct(TEXTS)  # flat (n, layers*dim) too
    assert vae.sample(3, seed=0) == vae.sample(3, seed=0)
    assert len(vae.decode(z, method="sample", top_p=0.9, seed=1)) == 3
    assert vae.decode(z, method="sample", seed=1) == vae.decode(z, method="sample", seed=1)
    out = vae.resample(TEXTS[:2], layers=[0], n=3, seed=0)
    assert len(out) == 2 and all(len(r) == 3 for r in out)
    kept = vae.redraw(torch.from_numpy(z), [-1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(kept[:, 0], torch.from_numpy(z)[:, 0]) and not torch.allclose(kept[:, 1], torch.from_numpy(z)[:, 1])


def test_bad_input_messages():
    vae = tiny_vae()
    with pytest.raises(InputError, match=r"z must have shape \(n, 2, 4\) or \(n, 8\).*got \(3, 5\)"):
        vae.decode(torch.ones(3, 5))
    with pytest.raises(InputError, match=r"got \(2, 3, 4\)"):
        vae.decode(np.ones((2, 3, 4), dtype=np.float32))
    with pytest.raises(InputError, match="zero vector"):
        vae.decode(torch.zeros(1, 2, 4))
    with pytest.raises(InputError, match="NaN"):
        vae.decode(torch.full((1, 8), float("nan")))
    with pytest.raises(InputError, match="floating-point"):
        vae.decode(torch.ones(1, 8, dtype=torch.long))
    for kappa in (0, -3.0, float("nan")):
        with pytest.raises(InputError, match="kappa must be a finite number > 0"):
            UniVAEConfig(kappa=kappa)
    with pytest.raises(InputError, match=r"latent layer 2 is out of range: this model has 2 latent layer\(s\), use 0..1"):
        vae.resample(["今天天气不错"], layers=[0, 2])
    with pytest.raises(InputError, match="latent layer -3 is out of range"):
        vae.redraw(torch.ones(1, 8), [-3])
    with pytest.raises(InputError, match="layers is empty"):
        vae.resample(["今天天气不错"], layers=[])
    with pytest.raises(InputError, match="num_latent_layers=4 exceeds the backbone's 3 layers"):
        tiny_vae(num_latent_layers=4)
    with pytest.raises(InputError, match="empty or whitespace"):
        vae.encode(["今天", "  "])
    with pytest.raises(InputError, match="beam_size"):
        vae.decode(torch.ones(1, 8), beam_size=0)
    with pytest.raises(InputError, match="top_p"):
        vae.decode(torch.ones(1, 8), method="sample", top_p=1.5)
    with pytest.raises(InputError, match="n must be a positive integer"):
        vae.sample(0)


def test_save_load_round_trip(tmp_path):
    vae = tiny_vae(seed=8)
    vae.save_pretrained(tmp_path / "vae")
    files = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert files == ["config.json", "model.safetensors", "univae.json", "univae.safetensors", "vocab.txt"]
    loaded = UniVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config.to_dict() == vae.config.to_dict()
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.reconstruct(SENTENCES[:3]) == vae.reconstruct(SENTENCES[:3])
    (tmp_path / "vae" / "univae.json").write_text(json.dumps({"model_type": "univae", "kappa": -1}))
    with pytest.raises(CheckpointError, match="kappa must be a finite number > 0"):
        UniVAE.from_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "univae.json").unlink()
    with pytest.raises(CheckpointError, match="not a UniVAE"):
        UniVAE.from_pretrained(tmp_path / "vae")
