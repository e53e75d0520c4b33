"""Step 1 of the model conversion (current Python): a Hugging Face BERT's weights as arrays under Google BERT's TF names.

Step 2 (tf_checkpoint.py, under Python 3.7 and TensorFlow 1.15) saves those arrays as
``bert_model.ckpt``; with ``bert_config.json`` and ``vocab.txt`` beside it the directory
is what ``bert-serving-start -model_dir`` reads.
"""

import json
import sys
from pathlib import Path

import numpy as np

# config.json fields that Google's BertConfig reads, under the same names.
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                 "type_vocab_size", "vocab_size", "initializer_range")


def tf_name(hf_name):
    """Google BERT's TF variable name for a Hugging Face parameter, and whether its array is transposed; None for buffers."""
    name = hf_name[len("bert."):] if hf_name.startswith("bert.") else hf_name
    if name.endswith("position_ids"):   # a buffer, not a weight
        return None
    *path, leaf = name.split(".")
    scopes = []
    for part in path:
        if part.isdigit():              # encoder.layer.N -> encoder/layer_N
            scopes[-1] = f"{scopes[-1]}_{part}"
        else:
            scopes.append(part)
    if scopes[:1] not in (["embeddings"], ["encoder"], ["pooler"]):
        raise ValueError(f"not a BERT encoder parameter: {hf_name}")
    if scopes[-1].endswith("_embeddings"):      # embedding tables are variables of their own, not scopes
        return "bert/" + "/".join(scopes), False
    if scopes[-1] == "LayerNorm":
        return "bert/" + "/".join(scopes + [{"weight": "gamma", "bias": "beta"}[leaf]]), False
    # Dense layers: TF keeps the kernel as (in, out), torch's Linear the weight as (out, in).
    return "bert/" + "/".join(scopes + [{"weight": "kernel", "bias": "bias"}[leaf]]), leaf == "weight"


def tf_arrays(tensors):
    """{TF name: float32 array} from {HF name: array}, dense kernels transposed."""
    out = {}
    for hf_name, array in tensors.items():
        mapped = tf_name(hf_name)
        if mapped is not None:
            name, transpose = mapped
            out[name] = np.ascontiguousarray(array.T if transpose else array, dtype=np.float32)
    return out


def bert_config(hf_config):
    """Google's bert_config.json from a Hugging Face config.json."""
    return {field: hf_config[field] for field in CONFIG_FIELDS}


def convert(model_dir, npz_path, config_path):
    """Write the TF-named arrays of MODEL_DIR/model.safetensors to NPZ_PATH and its bert_config.json to CONFIG_PATH."""
    from safetensors.numpy import load_file
    model_dir = Path(model_dir)
    np.savez(npz_path, **tf_arrays(load_file(str(model_dir / "model.safetensors"))))
    hf_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    Path(config_path).write_text(json.dumps(bert_config(hf_config), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    convert(*sys.argv[1:4])
