"""Synthetic checkpoints in other projects' formats, built from tiny random models.

The bert4keras layout is spelled out here by hand from bert4keras 0.10.6 ``BERT.variable_mapping``
(not taken from rosim's importer), so the tests check the importer against it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from rosim.checkpoints.tf_bundle import crc32c, mask_crc
from rosim.modeling.model import RoFormerSim
from rosim.tokenization.tokenizer import CharTokenizer

HAVE_TF = importlib.util.find_spec("tensorflow") is not None


# ---------------------------------------------------------------- bert4keras names and config
def bert4keras_arrays(model: RoFormerSim) -> dict[str, np.ndarray]:
    """The variables bert4keras 0.10.6 saves for this model, TF layout (Dense kernels are (in, out))."""
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    out = {
        "bert/embeddings/word_embeddings": sd["embeddings.word_embeddings.weight"],
        "bert/embeddings/token_type_embeddings": sd["embeddings.token_type_embeddings.weight"],
        "bert/embeddings/LayerNorm/gamma": sd["embeddings.layer_norm.weight"],
        "bert/embeddings/LayerNorm/beta": sd["embeddings.layer_norm.bias"],
    }
    if model.config.position == "absolute":
        out["bert/embeddings/position_embeddings"] = sd["embeddings.position_embeddings.weight"]

    def dense(tf_scope: str, ours: str) -> None:
        out[f"{tf_scope}/kernel"] = np.ascontiguousarray(sd[f"{ours}.weight"].T)
        out[f"{tf_scope}/bias"] = sd[f"{ours}.bias"]

    def norm(tf_scope: str, ours: str) -> None:
        out[f"{tf_scope}/gamma"] = sd[f"{ours}.weight"]
        out[f"{tf_scope}/beta"] = sd[f"{ours}.bias"]

    for i in range(model.config.num_layers):
        p, q = f"bert/encoder/layer_{i}/", f"layers.{i}."
        dense(p + "attention/self/query", q + "attention.query")
        dense(p + "attention/self/key", q + "attention.key")
        dense(p + "attention/self/value", q + "attention.value")
        dense(p + "attention/output/dense", q + "attention.output")
        norm(p + "attention/output/LayerNorm", q + "attention_norm")
        dense(p + "intermediate/dense", q + "intermediate")
        dense(p + "output/dense", q + "ffn_output")
        norm(p + "output/LayerNorm", q + "ffn_norm")
    if model.pooler is not None:
        dense("bert/pooler/dense", "pooler")
    if model.lm_head is not None:
        dense("cls/predictions/transform/dense", "lm_head.dense")
        norm("cls/predictions/transform/LayerNorm", "lm_head.layer_norm")
        out["cls/predictions/output_bias"] = sd["lm_head.bias"]
    return out


def bert_config_json(model: RoFormerSim) -> dict:
    """A Google-style ``bert_config.json`` as shipped with the bert4keras releases."""
    c = model.config
    return {
        "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position, "num_attention_heads": c.num_heads,
        "num_hidden_layers": c.num_layers, "type_vocab_size": c.type_vocab_size, "vocab_size": c.vocab_size,
        # keys Google's configs carry that no model reads
        "directionality": "bidi", "pooler_fc_size": c.hidden_size, "pooler_type": "first_token_transform",
    }


# ---------------------------------------------------------------- a minimal tensor-bundle writer
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


_DTYPE_ENUM = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("int64"): 9,
               np.dtype("float16"): 19}


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")  # one restart point, at 0


def _with_trailer(block: bytes) -> bytes:
    return block + b"\x00" + mask_crc(crc32c(block + b"\x00")).to_bytes(4, "little")


def write_bundle(prefix: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``PREFIX.index`` and ``PREFIX.data-00000-of-00001`` as TensorFlow's BundleWriter does."""
    data, entries, offset = bytearray(), [], 0
    header = _field(1, 1) + _field(3, _field(1, 1))  # num_shards=1, version{producer=1}
    entries.append((b"", header))
    for name in sorted(arrays, key=lambda n: n.encode()):
        a = np.ascontiguousarray(arrays[name])
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        shape = b"".join(_field(2, _field(1, d)) for d in a.shape)
        entry = _field(1, _DTYPE_ENUM[a.dtype]) + _field(2, shape) + _field(4, offset) + _field(5, len(raw))
        entry += _varint(6 << 3 | 5) + mask_crc(crc32c(raw)).to_bytes(4, "little")
        entries.append((name.encode(), entry))
        data += raw
        offset += len(raw)
    data_block = _block(entries)
    meta_block = _block([])
    index_block = _block([(entries[-1][0], _varint(0) + _varint(len(data_block)))])
    out = bytearray(_with_trailer(data_block))
    meta_at = len(out)
    out += _with_trailer(meta_block)
    index_at = len(out)
    out += _with_trailer(index_block)
    handles = _varint(meta_at) + _varint(len(meta_block)) + _varint(index_at) + _varint(len(index_block))
    out += handles.ljust(40, b"\x00") + (0xDB4775248B80FB57).to_bytes(8, "little")
    Path(f"{prefix}.index").write_bytes(bytes(out))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


# ---------------------------------------------------------------- real TensorFlow, in a subprocess
_TF_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
job = json.load(open(sys.argv[1]))
if job.get("save"):
    arrays = np.load(job["save"]["npz"])
    with tf.Graph().as_default():  # as bert4keras' save_weights_as_checkpoint: graph variables + Saver
        for i, name in enumerate(job["save"]["names"]):
            tf.compat.v1.Variable(arrays[f"a{i}"], name=name)
        tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, job["save"]["prefix"])
if job.get("read"):
    reader = tf.train.load_checkpoint(job["read"]["prefix"])
    names = sorted(reader.get_variable_to_shape_map())
    np.savez(job["read"]["npz"], **{f"a{i}": reader.get_tensor(n) for i, n in enumerate(names)})
    json.dump(names, open(job["read"]["names"], "w"))
"""


def run_tensorflow(workdir: Path, *, save: tuple[Path, dict[str, np.ndarray]] | None = None,
                   read: Path | None = None) -> dict[str, np.ndarray] | None:
    """With real TensorFlow: save ``arrays`` at a prefix with a v1 Saver and/or read a checkpoint."""
    workdir.mkdir(parents=True, exist_ok=True)
    job: dict = {}
    if save is not None:
        prefix, arrays = save
        names = list(arrays)
        np.savez(workdir / "in.npz", **{f"a{i}": arrays[n] for i, n in enumerate(names)})
        job["save"] = {"npz": str(workdir / "in.npz"), "names": names, "prefix": str(prefix)}
    if read is not None:
        job["read"] = {"prefix": str(read), "npz": str(workdir / "out.npz"), "names": str(workdir / "out.json")}
    (workdir / "job.json").write_text(json.dumps(job))
    (workdir / "tf_job.py").write_text(_TF_SCRIPT)
    proc = subprocess.run([sys.executable, str(workdir / "tf_job.py"), str(workdir / "job.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if read is None:
        return None
    names = json.loads((workdir / "out.json").read_text())
    loaded = np.load(workdir / "out.npz")
    return {n: loaded[f"a{i}"] for i, n in enumerate(names)}


def write_bert4keras_dir(directory: Path, model: RoFormerSim, tokenizer: CharTokenizer, *,
                         arrays: dict[str, np.ndarray] | None = None, with_tensorflow: bool = False) -> Path:
    """A release-style directory: bert_config.json, vocab.txt, bert_model.ckpt.*"""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = bert4keras_arrays(model) if arrays is None else arrays
    (directory / "bert_config.json").write_text(json.dumps(bert_config_json(model), indent=2))
    tokenizer.save(directory / "vocab.txt")
    prefix = directory / "bert_model.ckpt"
    if with_tensorflow:
        run_tensorflow(directory.parent / (directory.name + "-tfjob"), save=(prefix, arrays))
    else:
        write_bundle(prefix, arrays)
    return directory


# ---------------------------------------------------------------- HF format
def write_hf_dir(directory: Path, state: dict, config: dict, tokenizer: CharTokenizer, *, fmt: str) -> Path:
    """config.json + vocab.txt + pytorch_model.bin or model.safetensors."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(directory / "vocab.txt")
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:  # as save_pretrained writes it: tied copies dropped
        state = {k: v for k, v in state.items() if not k.startswith("cls.predictions.decoder.")}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
