"""Export to safetensors with the PyTorch reference names and layouts, and load back."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlin import export
from jaxlin.ops.conv import causal_conv
from tests.eval.eval_helpers import reference_log_probs, tiny_config, tiny_model


@pytest.mark.parametrize("attn", ["gla", "deltanet", "gated_deltanet", "softmax"])
def test_round_trip_gives_identical_logits(tmp_path, attn):
    model = tiny_model(attn)
    export.save(model, tmp_path)
    loaded, config = export.load(tmp_path)
    assert config == model.config
    tokens = list(range(1000, 1040))
    np.testing.assert_array_equal(reference_log_probs(loaded, tokens), reference_log_probs(model, tokens))


def test_torch_names_and_layouts(tmp_path):
    model = tiny_model("gla")
    export.save(model, tmp_path)
    tensors = load_file(tmp_path / export.WEIGHTS)
    attn = "transformer.h.1.attn.attn."
    assert tensors["transformer.wte.weight"].shape == (50304, 64)  # the padded vocabulary, as nanoGPT
    np.testing.assert_array_equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    assert tensors[attn + "q_proj.weight"].shape == (32, 64)  # torch.nn.Linear: [out, in]
    assert tensors[attn + "gk_proj.0.weight"].shape == (16, 64)
    assert tensors[attn + "gk_proj.1.bias"].shape == (32,)
    assert tensors[attn + "v_conv1d.weight"].shape == (64, 1, 4)  # depthwise Conv1d: [channels, 1, width]
    assert tensors[attn + "g_norm_swish_gate.weight"].shape == (32,)
    assert tensors["transformer.h.0.ln_1.weight"].shape == tensors["transformer.h.0.ln_1.bias"].shape == (64,)
    assert all(t.dtype == np.float32 for t in tensors.values())

    # The layouts compute what the JAX layers compute, in torch's conventions.
    x = np.random.default_rng(0).standard_normal((1, 9, 64)).astype(np.float32)
    layer = model.h[1].attn
    np.testing.assert_allclose(x @ tensors[attn + "v_proj.weight"].T, layer.v_proj(x), rtol=1e-5, atol=1e-5)
    weight = tensors[attn + "v_conv1d.weight"]  # torch: y[t] = sum_j w[:, 0, j] * x_padded[t + j]
    padded = np.concatenate([np.zeros((1, 3, 64), np.float32), x], axis=1)
    torch_conv = sum(weight[:, 0, j] * padded[:, j : j + 9] for j in range(4))
    np.testing.assert_allclose(jax.nn.silu(torch_conv), causal_conv(x, layer.conv.v.kernel[...])[0], rtol=1e-5, atol=1e-5)


def test_softmax_and_gated_deltanet_names(tmp_path):
    export.save(tiny_model("softmax"), tmp_path / "softmax")
    names = set(load_file(tmp_path / "softmax" / export.WEIGHTS))
    assert {"transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
            "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.bias"} <= names
    export.save(tiny_model("gated_deltanet"), tmp_path / "gdn")
    names = {n.removeprefix("transformer.h.0.attn.attn.") for n in load_file(tmp_path / "gdn" / export.WEIGHTS)}
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "A_log",
            "dt_bias", "g_proj.weight", "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight",
            "o_norm.weight", "o_proj.weight"} <= names


@pytest.fixture
def exported(tmp_path):
    export.save(tiny_model("gla"), tmp_path)
    return tmp_path


def _rewrite(path, edit):
    tensors = load_file(path / export.WEIGHTS)
    edit(tensors)
    save_file(tensors, path / export.WEIGHTS)


def test_missing_files_say_what_an_export_holds(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match="config.json not found.*jaxlin.export.save"):
        export.load(tmp_path / "nowhere")
    (exported / export.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        export.load(exported)


def test_corrupt_files_are_named(exported):
    (exported / export.CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        export.load(exported)
    (exported / export.CONFIG).write_text(json.dumps({**tiny_config().to_dict(), "n_layers": 2}))
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['n_layers'\]"):
        export.load(exported)
    (exported / export.CONFIG).write_text(json.dumps(tiny_config().to_dict()))
    (exported / export.WEIGHTS).write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="model.safetensors cannot be read as safetensors"):
        export.load(exported)


def test_tensor_mismatches_name_each_tensor(exported):
    name = "transformer.h.0.attn.attn.q_conv1d.weight"

    def edit(tensors):
        del tensors[name]
        tensors["transformer.h.0.attn.attn.extra"] = np.zeros(3, np.float32)
        tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"].T.copy()
        tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1

    _rewrite(exported, edit)
    with pytest.raises(ValueError) as error:
        export.load(exported)
    message = str(error.value)
    assert f"missing tensor {name} [32, 1, 4]" in message
    assert "unexpected tensor transformer.h.0.attn.attn.extra" in message
    assert "tensor transformer.h.1.mlp.c_fc.weight has shape [64, 256], the config needs [256, 64]" in message
    assert "lm_head.weight differs from transformer.wte.weight" in message
    assert "jaxlin.export.save" in message


def test_unmapped_parameters_point_at_the_table():
    with pytest.raises(KeyError, match="no name for parameter 'h.0.attn.new_proj.kernel'.*NAME_TABLE"):
        export.torch_name(("h", 0, "attn", "new_proj", "kernel"))
