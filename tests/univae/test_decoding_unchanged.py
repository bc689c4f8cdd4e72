"""The UniVAE gives what it gave before the backbone ran its passes (#18): the forward pass equals the
layers run by hand with the two masks, and decoding a tiny seeded model returns the sentences recorded
with the earlier implementation (its own layer loop and decoding loops), for every decoding mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rosim.modeling.model import rotary_cos_sin
from rosim.univae import make_uniae_mask
from rosim.univae.vmf import sample_vmf
from tests.univae.helpers import tiny_vae

# recorded at 5780a64 (before the refactor), torch 2.13 on the CPU with one thread
RECORDED = {
    "greedy": ["。ul圳ul圳u", "。ul圳ul圳u", "。ul圳ul圳u", "。ul圳ul圳u"],
    "beam3": ["。ullll圳u", "ulllll圳u", "ullllll圳", "ulllll圳u"],
    "sample": ["个。13车气车e", "6 6果今我e4l", "力9y北21u8", "哪一w x。州错f"],
    "sample_top_p": ["？影03苹喜款h", "65苹好气d 6k", "力8y是2 1 u8", "个红xx力州错g"],
    "sample_top_k": ["。u2 u", "s苹苹苹2 u u生", "u生圳ull x第", "u"],
    "prior_top_p": ["术qv 3影1 2气v9", "深l款今ri给t 1。", "l和很车气是8yk q"],
    "prior_beam": ["。ulllllll圳", "。ulllllll圳", "。ulllllll圳"],
    "resample": [["。ul圳ul圳ul圳", "。ul圳ul圳ul圳"], ["。ul圳ul圳ul圳", "。ul圳ul圳ul圳"]],
    "reconstruct": ["。ul圳ul圳ul圳", "。ul圳ul圳ul圳"],
}


def _vae():
    vae = tiny_vae(seed=21, num_latent_layers=3)
    with torch.no_grad():
        for p in vae.out_proj:  # latents that the decoder cannot ignore
            p.weight.mul_(4.0)
    return vae


def test_decoding_gives_the_recorded_sentences():
    vae = _vae()
    z = F.normalize(torch.randn(4, *vae.latent_shape, generator=torch.Generator().manual_seed(3)), dim=-1)
    got = {
        "greedy": vae.decode(z, max_length=8),
        "beam3": vae.decode(z, beam_size=3, max_length=8, batch_size=3),
        "sample": vae.decode(z, method="sample", seed=5, max_length=8),
        "sample_top_p": vae.decode(z, method="sample", seed=5, top_p=0.8, max_length=8),
        "sample_top_k": vae.decode(z, method="sample", seed=9, top_k=5, temperature=0.7, max_length=8, batch_size=3),
        "prior_top_p": vae.sample(3, seed=2, method="sample", top_p=0.9, max_length=10),
        "prior_beam": vae.sample(3, seed=4, beam_size=2, max_length=10),
        "resample": vae.resample(["今天天气不错", "我喜欢北京"], layers=[1], n=2, seed=6, max_length=10),
        "reconstruct": vae.reconstruct(["今天天气不错", "我喜欢北京"], max_length=10),
    }
    assert got == RECORDED


def _forward_by_hand(vae, inputs, generator):
    """The pass as the UniVAE ran it before: its own loop over the backbone's layers."""
    bb, ids, seg = vae.backbone, inputs.input_ids, inputs.segment_ids
    dtype = bb.embeddings.word_embeddings.weight.dtype
    padding = inputs.attention_mask.bool()[:, None, None, :]
    biases = [torch.zeros(m.shape, dtype=dtype).masked_fill(~(m & padding), torch.finfo(dtype).min)
              for m in (make_uniae_mask(seg, expose_cls=False), make_uniae_mask(seg, expose_cls=True))]
    x = bb.embeddings(ids, seg, inputs.position_ids.expand(ids.shape[0], -1))
    rope = rotary_cos_sin(inputs.position_ids, bb.config.head_size, bb.config.rotary_base)
    mus, zs = [], []
    for i, layer in enumerate(bb.layers):
        j = i - vae.first_latent_layer
        if j >= 0:
            mu = F.normalize(vae.in_proj[j](x[:, 0]), dim=-1)
            z_j = sample_vmf(mu, vae.config.kappa, generator=generator)
            mus.append(mu)
            zs.append(z_j)
            x = torch.cat([vae.out_proj[j](z_j).unsqueeze(1), x[:, 1:]], dim=1)
        x, _ = layer(x, biases[int(j >= 0)], rope)
    return x, torch.stack(mus, 1), torch.stack(zs, 1)


def test_forward_equals_the_layers_run_by_hand():
    vae = tiny_vae(seed=22)
    inputs = vae.build_inputs(["今天天气不错", "我喜欢北京", "广州和深圳哪个好？"])
    with torch.no_grad():
        out = vae(**inputs.as_kwargs(), generator=torch.Generator().manual_seed(1))
        hidden, mu, z = _forward_by_hand(vae, inputs, torch.Generator().manual_seed(1))
    assert torch.equal(out.hidden, hidden) and torch.equal(out.mu, mu) and torch.equal(out.z, z)
