"""UniVAE: one Transformer as encoder and decoder, with a multi-scale von Mises–Fisher latent.

* :mod:`rosim.univae.vmf` — the exact vMF sampler (Wood's rejection algorithm) and A_d(κ);
* :mod:`rosim.univae.model` — the masks, the latent path and the modes (encode / decode / sample /
  reconstruct / resample), saving and loading;
* :mod:`rosim.univae.train` — the training loop with checkpoints and exact resume;
* :mod:`rosim.univae.data`, :mod:`rosim.univae.evaluate` — sentences and reconstruction metrics.
"""

from rosim.univae.model import (
    UniVAE,
    UniVAEConfig,
    UniVAEInputs,
    UniVAEOutput,
    make_uniae_mask,
    normalized_text,
)
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
