"""Faults and bad input in conversion and the CLIs (issue 13): dtype names, the output folder policy,
one-line mismatch errors, load_hf dtypes, file modes, generate's and plot's argument checks, and no
folder left behind by a failed command. In-process calls on the tiny preset, no torch, no training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM, convert
from olmo_hybrid_jax.convert import CheckpointMismatchError, canonical_dtype, dtype_arg, load_hf, save_hf, save_orbax
from olmo_hybrid_jax.generate import generate
from olmo_hybrid_jax.generate import main as generate_main
from olmo_hybrid_jax.train.export import main as export_main
from olmo_hybrid_jax.train.plot import main as plot_main

DTYPE_ERROR = ("argument --dtype: unknown dtype 'float13'; use one of float32, fp32, bfloat16, bf16, float16, "
               "fp16\n")


@pytest.fixture(scope="module")
def tiny_model():
    return OlmoHybridForCausalLM(OlmoHybridConfig.preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny_hf(tiny_model, tmp_path_factory) -> Path:
    """A tiny fp32 HF checkpoint (read-only for the tests: copy it before changing anything)."""
    return save_hf(tiny_model, tmp_path_factory.mktemp("tiny") / "hf", progress=False)


def _usage_error(capsys, fn, argv) -> str:
    """Run a CLI that must stop with an argparse usage error; return its stderr's last line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    return out.err.splitlines(keepends=True)[-1].split(": error: ", 1)[1]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- dtype names
@pytest.mark.parametrize("cli", ["hf-to-orbax", "orbax-to-hf", "generate", "export"])
def test_bad_dtype_name_is_a_usage_error_before_any_work(cli, tmp_path, capsys):
    dst = tmp_path / "out" / "deeper"
    argv = {"hf-to-orbax": ["hf-to-orbax", "nowhere", str(dst), "--dtype", "float13"],
            "orbax-to-hf": ["orbax-to-hf", "nowhere", str(dst), "--dtype", "float13"],
            "generate": ["--checkpoint", "nowhere", "--prompt", "hi", "--dtype", "float13"],
            "export": ["nowhere", str(dst), "--dtype", "float13"]}[cli]
    fn = {"generate": generate_main, "export": export_main}.get(cli, convert.main)
    assert _usage_error(capsys, fn, argv) == DTYPE_ERROR
    assert list(tmp_path.iterdir()) == []


def test_dtype_names_and_aliases():
    for names, want in ((("float32", "fp32", "FP32"), jnp.float32), (("bfloat16", "bf16"), jnp.bfloat16),
                        (("float16", "fp16"), jnp.float16)):
        for n in names:
            assert dtype_arg(n) == jnp.dtype(want) and canonical_dtype(n) == jnp.dtype(want)
    assert canonical_dtype(None) is None and canonical_dtype(jnp.bfloat16) == jnp.dtype(jnp.bfloat16)
    for bad, msg in (("half", "unknown dtype 'half'"), (jnp.int32, "parameters need a floating dtype, got int32")):
        with pytest.raises(ValueError, match=msg):
            canonical_dtype(bad)


# ----------------------------------------------------------------------------------------- output folders
def test_refusal_names_the_flag_and_costs_no_work(tiny_model, tiny_hf, tmp_path, capsys):
    out = save_hf(tiny_model, tmp_path / "hf", progress=False)
    before = _tree(out)
    with pytest.raises(FileExistsError) as e:
        save_hf(tiny_model, out, progress=False)
    assert str(e.value) == f"{out} already holds a checkpoint; pass --overwrite (overwrite=True) to replace it"
    # the CLI refuses before it loads: its source does not even exist
    assert convert.main(["orbax-to-hf", str(tmp_path / "nowhere"), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {e.value}\n"
    assert export_main([str(tmp_path / "nowhere"), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {e.value}\n"
    assert _tree(out) == before


def test_overwrite_replaces_only_the_checkpoint_files(tiny_model, tmp_path, capsys):
    out = save_hf(tiny_model, tmp_path / "hf", max_shard_size="100KB", progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    (out / "README.md").write_text("my notes")
    (out / "tokenizer.json").write_text("{}")
    other = OlmoHybridForCausalLM(tiny_model.config, rngs=nnx.Rngs(1))
    save_hf(other, out, overwrite=True, progress=False)  # sharded -> single file: the old shards go
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "README.md").read_text() == "my notes"
    np.testing.assert_array_equal(load_hf(out, progress=False).model.norm.weight[...], other.model.norm.weight[...])
    # an orbax checkpoint over the HF one replaces it whole (no stale safetensors next to params/)
    assert convert.main(["hf-to-orbax", str(out), str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out == f"wrote {out.absolute()}\n"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "params", "tokenizer.json"]


def test_foreign_files_are_never_replaced(tiny_model, tiny_hf, tmp_path, capsys):
    foreign = tmp_path / "llama"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    shutil.copy(tiny_hf / "model.safetensors", foreign / "model.safetensors")
    (foreign / "notes.txt").write_text("keep me")
    before = _tree(foreign)
    msg = (f"{foreign} holds files that are not an OLMo Hybrid checkpoint (config.json, model.safetensors); not "
           "replacing them, even with --overwrite: move them or choose another directory")
    with pytest.raises(FileExistsError) as e:
        save_hf(tiny_model, foreign, overwrite=True, progress=False)
    assert str(e.value) == msg
    assert convert.main(["hf-to-orbax", str(tiny_hf), str(foreign), "--overwrite"]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"
    assert _tree(foreign) == before
    # files of no checkpoint format neither block a save nor get touched
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("mine")
    save_hf(tiny_model, notes, progress=False)
    assert sorted(p.name for p in notes.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (notes / "README.md").read_text() == "mine"


def test_failed_save_keeps_the_old_checkpoint_and_leaves_no_folder(tiny_model, tmp_path, monkeypatch):
    import safetensors.numpy

    out = save_hf(tiny_model, tmp_path / "hf", max_shard_size="100KB", progress=False)
    before = _tree(out)
    real, calls = safetensors.numpy.save_file, []

    def fail_on_second_shard(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.numpy, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_hf(tiny_model, out, max_shard_size="100KB", overwrite=True, progress=False)
    assert _tree(out) == before and not (out / ".tmp_save_hf").exists()
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_hf(tiny_model, tmp_path / "new" / "deeper", max_shard_size="100KB", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_failed_commands_leave_no_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    assert export_main([str(run), str(tmp_path / "a" / "hf")]) == 2
    assert capsys.readouterr().err == f"error: {run / 'checkpoints'} does not exist: the run saved no checkpoint\n"
    assert convert.main(["hf-to-orbax", str(tmp_path / "nowhere"), str(tmp_path / "b" / "orbax")]) == 2
    assert capsys.readouterr().err == f"error: no HF config at {tmp_path / 'nowhere'}\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "run"]


def test_file_modes_follow_the_umask(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        hf = save_hf(tiny_model, tmp_path / "hf", max_shard_size="100KB", progress=False)
        orbax = save_orbax(tiny_model, tmp_path / "orbax")
        os.umask(0o027)
        single = save_hf(tiny_model, tmp_path / "single", progress=False)
    finally:
        os.umask(old)
    modes = {p.stat().st_mode & 0o777 for d in (hf, orbax) for p in d.rglob("*") if p.is_file()}
    assert modes == {0o644}
    assert {p.name: p.stat().st_mode & 0o777 for p in single.iterdir()} == {"config.json": 0o640,
                                                                           "model.safetensors": 0o640}


# ----------------------------------------------------------------------------------------- mismatches
def _edit_config(path: Path, **changes) -> None:
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, **changes}))


def test_orbax_to_hf_with_an_edited_config_is_one_line(tiny_model, tmp_path, capsys):
    src = save_orbax(tiny_model, tmp_path / "orbax")
    _edit_config(src, hidden_size=96)
    assert convert.main(["orbax-to-hf", str(src), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"error: orbax checkpoint {src} does not match its config.json: 50 tensors differ (50 misshapen, e.g. "
        "model/embed_tokens/embedding is [256, 64], config gives [256, 96] (hidden_size=96))\n")
    assert not (tmp_path / "hf").exists()


def test_load_hf_of_another_shape_is_one_line(tiny_hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, ckpt)
    _edit_config(ckpt, linear_value_head_dim=32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf(ckpt, progress=False)
    assert isinstance(e.value, ValueError)
    assert str(e.value) == (
        f"hf checkpoint {ckpt} does not match its config.json: 15 tensors differ (15 misshapen, e.g. "
        "model.layers.0.linear_attn.v_proj.weight is [96, 64], config gives [128, 64] (linear_num_value_heads=4, "
        "linear_value_head_dim=32))")
    _edit_config(ckpt, linear_value_head_dim=24, num_hidden_layers=5,
                 layer_types=["linear_attention"] * 3 + ["full_attention", "linear_attention"])
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf(ckpt, progress=False)
    assert str(e.value) == (
        f"hf checkpoint {ckpt} does not match its config.json: 18 tensors differ (18 missing: "
        "model.layers.4.mlp.gate_proj.weight, model.layers.4.mlp.up_proj.weight, model.layers.4.mlp.down_proj.weight, "
        "...; the checkpoint has 4 layers, config num_hidden_layers=5)")


# ----------------------------------------------------------------------------------------- load_hf dtypes
def test_load_hf_keeps_mixed_dtypes_unless_asked(tiny_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "mixed"
    shutil.copytree(tiny_hf, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float16)
    save_file(tensors, str(ckpt / "model.safetensors"))
    _edit_config(ckpt, dtype="float32")

    def dtypes(m):
        return (m.model.embed_tokens.embedding[...].dtype, m.model.norm.weight[...].dtype,
                m.lm_head.kernel[...].dtype, m.options.param_dtype)

    f32, bf16, f16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
    kept = load_hf(ckpt, progress=False)
    assert dtypes(kept) == (bf16, f16, f32, f32)  # stored dtypes; param_dtype from config.json
    np.testing.assert_array_equal(np.asarray(kept.model.norm.weight[...]), tensors["model.norm.weight"])
    assert dtypes(load_hf(ckpt, "auto", progress=False)) == (f32,) * 4  # config.json's dtype
    assert dtypes(load_hf(ckpt, "bf16", progress=False)) == (bf16,) * 4
    _edit_config(ckpt, dtype=None, torch_dtype="float16")  # the older spelling
    assert dtypes(load_hf(ckpt, "auto", progress=False)) == (f16,) * 4
    _edit_config(ckpt, torch_dtype=None)
    assert dtypes(load_hf(ckpt, "auto", progress=False)) == (bf16,) * 4  # no config dtype: the embedding's
    assert dtypes(load_hf(ckpt, progress=False)) == (bf16, f16, f32, bf16)


# ----------------------------------------------------------------------------------------- generate, plot
@pytest.mark.parametrize("flag, value, msg", [
    ("--temperature", "-1", "--temperature must be >= 0 (0 = greedy), got -1.0"),
    ("--temperature", "nan", "--temperature must be >= 0 (0 = greedy), got nan"),
    ("--top-k", "0", "--top-k must be an int >= 1, got 0"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--max-new-tokens", "-1", "--max-new-tokens must be an int >= 0, got -1"),
    ("--stream-interval", "0", "--stream-interval must be an int >= 1, got 0"),
])
def test_generate_checks_arguments_before_loading_or_echoing(tiny_hf, capsys, flag, value, msg):
    assert _usage_error(capsys, generate_main, ["--checkpoint", str(tiny_hf), "--prompt", "Hello", flag, value]) \
        == msg + "\n"


def test_generate_api_refuses_negative_temperature(tiny_model):
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0 = greedy\), got -1"):
        generate(tiny_model, [[5, 6]], 2, temperature=-1)


def test_generate_refuses_a_checkpoint_it_cannot_tokenize_for_before_echoing(tiny_hf, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, ckpt)
    _edit_config(ckpt, hidden_size=96)
    assert generate_main(["--checkpoint", str(ckpt), "--prompt", "Hello"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"error: hf checkpoint {ckpt} does not match its config.json: ")


def test_plot_refuses_an_unknown_key(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "lr": 1e-3, "note": "x"}) + "\n"
                                               for s in (1, 2)))
    assert plot_main([str(run), "--key", "lose"]) == 2
    err = f"error: no 'lose' values in {run / 'metrics.jsonl'}; its metrics have: loss, lr\n"
    assert capsys.readouterr().err == err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert plot_main([str(run), "--out", str(tmp_path / "plots" / "loss.png")]) == 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
