"""Export a GPT as safetensors with the PyTorch reference model's parameter names, and load it back.

`save(model, out_dir)` writes `model.safetensors` (float32, PyTorch layouts) and `config.json` (the
ModelConfig); `load(export_dir)` rebuilds the GPT from them. An FP8 model exports its weights only, no
scaling state, with `matmul_precision="bf16"` in its config. `NAME_TABLE` is the whole mapping;
docs/export.md documents it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxlin.errors import ExportError, MissingFileError
from jaxlin.layers.fp8 import Fp8Meta
from jaxlin.model import GPT, ModelConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"
_FLA = r"transformer.h.\1.attn.attn."  # the reference block wraps FLA's layer as `attn.attn`

# (JAX parameter path as a regex over the dotted nnx path, PyTorch name, layout). Layouts:
#   same:   copied as is
#   linear: a [in, out] kernel becomes torch.nn.Linear's [out, in] weight
#   conv:   a [width, channels] depthwise kernel becomes torch Conv1d's [channels, 1, width]
#           (tap j of both reads token t - (width - 1 - j))
NAME_TABLE = (
    (r"wte", "transformer.wte.weight", "same"),  # all padded_vocab_size rows, as nanoGPT
    (r"wpe", "transformer.wpe.weight", "same"),
    (r"h\.(\d+)\.(ln_[12])\.scale", r"transformer.h.\1.\2.weight", "same"),
    (r"h\.(\d+)\.(ln_[12])\.bias", r"transformer.h.\1.\2.bias", "same"),
    (r"h\.(\d+)\.mlp\.(c_fc|c_proj)\.kernel", r"transformer.h.\1.mlp.\2.weight", "linear"),
    (r"h\.(\d+)\.attn\.(c_attn|c_proj)\.kernel", r"transformer.h.\1.attn.\2.weight", "linear"),
    (r"h\.(\d+)\.attn\.([qkvgabo]_proj)\.kernel", _FLA + r"\2.weight", "linear"),
    (r"h\.(\d+)\.attn\.gk_down\.kernel", _FLA + "gk_proj.0.weight", "linear"),
    (r"h\.(\d+)\.attn\.gk_up\.kernel", _FLA + "gk_proj.1.weight", "linear"),
    (r"h\.(\d+)\.attn\.gk_up\.bias", _FLA + "gk_proj.1.bias", "same"),
    (r"h\.(\d+)\.attn\.conv\.([qkv])\.kernel", _FLA + r"\2_conv1d.weight", "conv"),
    (r"h\.(\d+)\.attn\.g_norm\.weight", _FLA + "g_norm_swish_gate.weight", "same"),  # GLA's fused norm+gate
    (r"h\.(\d+)\.attn\.o_norm\.weight", _FLA + "o_norm.weight", "same"),
    (r"h\.(\d+)\.attn\.(A_log|dt_bias)", _FLA + r"\2", "same"),
    (r"ln_f\.scale", "transformer.ln_f.weight", "same"),
    (r"ln_f\.bias", "transformer.ln_f.bias", "same"),
)
TIED_HEAD = "lm_head.weight"  # the output head is the token embedding

_TO_TORCH = {
    "same": lambda x: x,
    "linear": lambda x: x.T,
    "conv": lambda x: x.T[:, None, :],
}
_FROM_TORCH = {
    "same": lambda x: x,
    "linear": lambda x: x.T,
    "conv": lambda x: x[:, 0, :].T,
}


def torch_name(jax_path: tuple) -> tuple[str, str]:
    """(PyTorch name, layout) of the parameter at `jax_path`."""
    dotted = ".".join(str(p) for p in jax_path)
    for pattern, name, layout in NAME_TABLE:
        if re.fullmatch(pattern, dotted):
            return re.sub(pattern, name, dotted), layout
    raise KeyError(f"jaxlin.export has no name for parameter '{dotted}': add a row to NAME_TABLE in {__file__}")


def _torch_shape(shape: tuple, layout: str) -> tuple:
    return tuple(_TO_TORCH[layout](np.empty(shape, np.uint8)).shape)


def save(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Writes out_dir/model.safetensors and out_dir/config.json; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(Fp8Meta))):
        name, layout = torch_name(path)
        value = np.asarray(jax.device_get(variable.get_value()), np.float32)
        tensors[name] = np.ascontiguousarray(_TO_TORCH[layout](value))
    tensors[TIED_HEAD] = tensors["transformer.wte.weight"]
    save_file(tensors, out_dir / WEIGHTS, metadata={"format": "pt"})
    config = dataclasses.replace(model.config, matmul_precision="bf16")
    (out_dir / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out_dir


def load_config(export_dir: str | os.PathLike) -> ModelConfig:
    path = _existing(Path(export_dir) / CONFIG)
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}); re-export the model with jaxlin.export.save") from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(fields, dict) or set(fields) - known:
        unknown = sorted(set(fields) - known) if isinstance(fields, dict) else fields
        raise ExportError(f"{path}: unknown ModelConfig fields {unknown}; it was written by another jaxlin "
                          f"version or by hand (known fields: {sorted(known)})")
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: {e}; re-export the model with jaxlin.export.save") from None


def load(export_dir: str | os.PathLike, *, dtype: str | None = None) -> tuple[GPT, ModelConfig]:
    """Rebuilds the exported GPT; `dtype` overrides the config's compute dtype (weights stay float32)."""
    config = load_config(export_dir)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    path = _existing(Path(export_dir) / WEIGHTS)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path} cannot be read as safetensors ({e}); re-export the model") from None

    abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    problems, loaded, expected = [], [], {TIED_HEAD}
    for jax_path, variable in nnx.to_flat_state(state):
        name, layout = torch_name(jax_path)
        expected.add(name)
        want = _torch_shape(variable.get_value().shape, layout)
        if name not in tensors:
            problems.append(f"missing tensor {name} {list(want)}")
        elif tensors[name].shape != want:
            problems.append(f"tensor {name} has shape {list(tensors[name].shape)}, the config needs {list(want)}")
        else:
            value = jnp.asarray(_FROM_TORCH[layout](tensors[name]), variable.get_value().dtype)
            loaded.append((jax_path, variable.replace(value)))
    problems += [f"unexpected tensor {name}" for name in sorted(set(tensors) - expected)]
    head, wte = tensors.get(TIED_HEAD), tensors.get("transformer.wte.weight")
    if head is not None and wte is not None and not np.array_equal(head, wte):
        problems.append(f"{TIED_HEAD} differs from transformer.wte.weight, but the model ties them")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ExportError(f"{path} does not match {Path(export_dir) / CONFIG}: {shown}. Export config.json and "
                          "model.safetensors together with jaxlin.export.save")
    return nnx.merge(graphdef, nnx.from_flat_state(loaded)), config


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise MissingFileError(f"{path} not found: an export directory holds {CONFIG} and {WEIGHTS}, "
                                f"written by jaxlin.export.save(model, out_dir)")
    return path
