"""Throughput of `similar(text, n=100)` generation against two baselines, same weights and lengths.

(a) full-recompute decoding, as bert4keras' AutoRegressiveDecoder does (the n samples batched, the
    whole sequence re-run for every new token, finished rows dropped);
(b) transformers' RoFormerForCausalLM.generate called once per sample, as the PyTorch port documents.

Random weights (6 layers, 384 hidden, 6 heads, 12000 vocab) almost never sample [SEP], so every
sample runs to ``max_new`` tokens in all three: the token counts are equal by construction.
Usage: python benchmarks/generate.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, generate_ids, small_model, timed  # noqa: E402

TEXT = "广州和深圳哪个好？"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every side (1: on a shared 2-core machine OpenMP waits dominate)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = 100
    max_new = 24 if args.quick else 32
    hf_samples = 3 if args.quick else 10
    repeats = 1 if args.quick else 3

    from rosim.inference.sim_model import SimModel

    model, tok = small_model()
    sim = SimModel(model, tok)

    def ours():  # the same call `similar` makes, returning token ids so that tokens are counted exactly
        return generate_ids(sim, TEXT, n, strategy="cache", max_new=max_new)

    def recompute():
        return generate_ids(sim, TEXT, n, strategy="recompute", max_new=max_new)

    ours()  # warm-up
    t_ours, out_ours = timed(ours, repeats)
    t_re, out_re = timed(recompute, repeats)
    tokens_ours = sum(len(r) for r in out_ours)
    same = out_ours == out_re

    import transformers

    from rosim.checkpoints.hf import rosim_to_hf_names

    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.RoFormerConfig(
        vocab_size=12000, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
        max_position_embeddings=512, is_decoder=True, eos_token_id=tok.sep_id, pad_token_id=tok.pad_id,
    )
    hf = transformers.RoFormerForCausalLM(hf_cfg).eval()
    state = hf.state_dict()
    for k, v in model.state_dict().items():
        name = rosim_to_hf_names(model.config, "roformer")[k]
        if name in state:
            state[name] = v
    state["cls.predictions.decoder.weight"] = model.embeddings.word_embeddings.weight
    state["cls.predictions.decoder.bias"] = model.lm_head.bias
    hf.load_state_dict(state)
    enc = tok(TEXT)
    bad = [[i] for i in (tok.pad_id, tok.cls_id, tok.mask_id, tok.unk_id)]

    def hf_generate():
        produced = 0
        for s in range(hf_samples):
            torch.manual_seed(s)
            with torch.no_grad():
                out = hf.generate(input_ids=enc.input_ids, token_type_ids=enc.token_type_ids,
                                  attention_mask=enc.attention_mask, do_sample=True, top_p=0.95, top_k=0,
                                  max_new_tokens=max_new, min_new_tokens=max_new, bad_words_ids=bad)
            produced += out.shape[1] - enc.input_ids.shape[1]
        return produced

    hf_generate()
    t_hf, tokens_hf = timed(hf_generate, repeats)
    ours_tps = tokens_ours / t_ours
    re_tps = tokens_ours / t_re
    hf_tps = tokens_hf / t_hf
    print(f"ours (KV cache, {n} in parallel): {ours_tps:9.1f} tokens/s  ({tokens_ours} tokens in {t_ours:.2f}s)")
    print(f"recompute (bert4keras style)    : {re_tps:9.1f} tokens/s  (identical samples: {same}; random weights"
          " give near-uniform distributions, where float rounding can flip a draw)")
    print(f"HF generate, one call per sample: {hf_tps:9.1f} tokens/s  ({tokens_hf} tokens in {t_hf:.2f}s)")
    emit({
        "bench": "generate", "n": n, "max_new_tokens": max_new, "threads": torch.get_num_threads(),
        "ours_tokens_per_s": round(ours_tps, 1),
        "recompute_tokens_per_s": round(re_tps, 1), "hf_generate_tokens_per_s": round(hf_tps, 1),
        "ratio_vs_recompute": round(ours_tps / re_tps, 2), "ratio_vs_hf_generate": round(ours_tps / hf_tps, 2),
        "identical_samples_vs_recompute": same,
    })


if __name__ == "__main__":
    main()
