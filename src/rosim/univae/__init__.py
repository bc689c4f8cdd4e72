"""UniVAE: one Transformer as encoder and decoder, with a multi-scale von Mises–Fisher latent.

* :mod:`rosim.univae.vmf` — the exact vMF sampler (Wood's rejection algorithm) and A_d(κ);
* :mod:`rosim.univae.config` — :class:`UniVAEConfig`, the latent path's settings;
* :mod:`rosim.univae.inputs` — the ``[x ; x]`` layout; :mod:`rosim.univae.masks` — its two masks;
* :mod:`rosim.univae.model` — the latent path and the modes (encode / decode / sample /
  reconstruct / resample); :mod:`rosim.univae.latents` — checks of latents and layer indices;
* :mod:`rosim.univae.io` — saving and loading;
* :mod:`rosim.univae.train` — the training loop with checkpoints and exact resume;
* :mod:`rosim.univae.data`, :mod:`rosim.univae.evaluate` — sentences and reconstruction metrics.
"""

from rosim.univae.config import UniVAEConfig
from rosim.univae.evaluate import normalized_text
from rosim.univae.inputs import UniVAEInputs
from rosim.univae.masks import make_uniae_mask
from rosim.univae.model import UniVAE, UniVAEOutput
from rosim.univae.vmf import (
    VMFSampler,
    mean_resultant_length,
    sample_uniform_sphere,
    sample_vmf,
    sample_vmf_w,
)

__all__ = [
    "UniVAE", "UniVAEConfig", "UniVAEInputs", "UniVAEOutput", "make_uniae_mask", "normalized_text",
    "VMFSampler", "mean_resultant_length", "sample_uniform_sphere", "sample_vmf", "sample_vmf_w",
]
