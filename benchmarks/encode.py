"""Sentences per second of `SimModel.encode` against transformers' RoFormerModel + the same linear pooler.

Identical random weights (6 layers, 384 hidden, 6 heads, 12000 vocab) and inputs: the sentences of
../shared/data/sts-zh/STS-B/test.tsv. The baseline runs batches in file order, padded to the longest
sentence of each batch (what a user of the port writes); ours sorts by length and uses SDPA.
Usage: python benchmarks/encode.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, small_model, sts_sentences, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (1: on a shared 2-core machine OpenMP waits dominate)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = sts_sentences()
    if args.quick:
        texts = texts[:600]
    repeats = 1 if args.quick else 3

    import transformers

    from rosim.checkpoints.hf import rosim_to_hf_names
    from rosim.inference.sim_model import SimModel

    transformers.logging.set_verbosity_error()
    model, tok = small_model()
    sim = SimModel(model, tok)
    hf = transformers.RoFormerModel(transformers.RoFormerConfig(
        vocab_size=12000, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
        max_position_embeddings=512)).eval()
    names = rosim_to_hf_names(model.config, "roformer")
    state = hf.state_dict()
    for k, v in model.state_dict().items():
        short = names[k].removeprefix("roformer.")
        if short in state:
            state[short] = v
    hf.load_state_dict(state)
    pooler = model.pooler

    def ours():
        return sim.encode(texts, batch_size=args.batch_size, normalize=False)

    @torch.no_grad()
    def baseline():
        out = []
        for s in range(0, len(texts), args.batch_size):
            enc = tok(texts[s:s + args.batch_size], max_length=64)
            h = hf(input_ids=enc.input_ids, token_type_ids=enc.token_type_ids,
                   attention_mask=enc.attention_mask).last_hidden_state
            out.append(pooler(h[:, 0]))
        return torch.cat(out).numpy()

    ours(), baseline()  # warm-up
    t_ours, v_ours = timed(ours, repeats)
    t_hf, v_hf = timed(baseline, repeats)
    diff = float(np.abs(v_ours - v_hf).max())
    print(f"ours : {len(texts) / t_ours:8.1f} sentences/s")
    print(f"HF   : {len(texts) / t_hf:8.1f} sentences/s   max |diff| {diff:.2e}")
    emit({"bench": "encode", "sentences": len(texts), "threads": torch.get_num_threads(),
          "ours_sentences_per_s": round(len(texts) / t_ours, 1), "baseline": "transformers.RoFormerModel+pooler",
          "baseline_sentences_per_s": round(len(texts) / t_hf, 1), "ratio_vs_hf": round(t_hf / t_ours, 2),
          "max_abs_diff": diff})


if __name__ == "__main__":
    main()
