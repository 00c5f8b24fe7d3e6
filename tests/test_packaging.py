"""The wheel installs anywhere and shadows nothing.

Builds the wheel from a copy of the sources (nothing is written into the checkout), installs it into a
fresh venv next to Hugging Face's ``kernels`` distribution from PyPI, and from a directory outside the
repo checks that ``import kernels`` is Hugging Face's, that ``olmo_hybrid_jax.kernels`` computes the
recurrence, that the presets, the YAML configs and the embedded corpus ship as package data, and that
``python -m olmo_hybrid_jax.train`` and the ``olmo-hybrid-train`` script run.

Both packages are installed with ``--no-deps``; the new venv sees this interpreter's site-packages
(jax, flax, ...) through a .pth file, after its own, so it downloads one small wheel and nothing else.
Needs PyPI (marked ``network``) and takes a few tens of seconds (``slow``); both run by default.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.network, pytest.mark.slow]

CHECK = r'''
import json, sys
from pathlib import Path

import numpy as np

site = Path(sys.argv[1]).resolve()
inside = lambda mod: site in Path(mod.__file__).resolve().parents

import kernels  # Hugging Face's
assert inside(kernels) and hasattr(kernels, "get_kernel"), kernels.__file__

import olmo_hybrid_jax
from olmo_hybrid_jax.config import PRESET_DIR, OlmoHybridConfig
from olmo_hybrid_jax.kernels import gated_delta_rule
from olmo_hybrid_jax.train.config import CONFIG_DIR, load_config
from olmo_hybrid_jax.train.data import DATA_DIR, open_token_file

assert inside(olmo_hybrid_jax) and inside(sys.modules["olmo_hybrid_jax.kernels"]), olmo_hybrid_jax.__file__

# a small recurrence against a numpy loop: S = a S; S += k (beta (v - S^T k))^T; o = S^T q / sqrt(K)
rng = np.random.default_rng(0)
B, T, H, K, V = 1, 5, 2, 4, 3
q, k = rng.normal(size=(2, B, T, H, K)).astype(np.float32)
v = rng.normal(size=(B, T, H, V)).astype(np.float32)
g = -rng.uniform(0.05, 0.5, size=(B, T, H)).astype(np.float32)
beta = rng.uniform(0.1, 0.9, size=(B, T, H)).astype(np.float32)
o, state = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
S = np.zeros((B, H, K, V))
want = np.zeros((B, T, H, V))
for t in range(T):
    S = np.exp(g[:, t])[..., None, None] * S
    u = beta[:, t][..., None] * (v[:, t] - np.einsum("bhkv,bhk->bhv", S, k[:, t]))
    S = S + np.einsum("bhk,bhv->bhkv", k[:, t], u)
    want[:, t] = np.einsum("bhkv,bhk->bhv", S, q[:, t]) * K ** -0.5
np.testing.assert_allclose(np.asarray(o), want, rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(np.asarray(state), S, rtol=1e-4, atol=1e-5)

cfg = OlmoHybridConfig.preset("tiny")
try:
    OlmoHybridConfig.preset("nope")
except ValueError as e:
    assert "olmo_hybrid_7b" in str(e), e
assert load_config("tiny.yaml").data.seq_len == load_config("configs/tiny.yaml").data.seq_len
tokens = open_token_file("data/pydoc_topics.u8")
print(json.dumps({"dirs": [str(PRESET_DIR), str(CONFIG_DIR), str(DATA_DIR)], "vocab": cfg.vocab_size,
                  "tokens": int(tokens.size), "kernels": kernels.__file__}))
'''

# A training step in seconds: the tiny model on the embedded corpus, short rows, a batch of two.
QUICK = ["train.progress=false", "data.seq_len=32", "data.global_batch_size=2", "train.loss_chunk=32"]


def _run(cmd, cwd, env, timeout=300):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


def _build_wheel(repo: Path, tmp: Path) -> Path:
    """The wheel, built from a copy of pyproject's sources (the build writes build/ and *.egg-info)."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    src = tmp / "src"
    src.mkdir()
    tops = {"pyproject.toml", meta["project"]["readme"]}
    tops |= {Path(d).parts[0] for d in meta["tool"]["setuptools"]["package-dir"].values()}
    for name in sorted(tops):
        if (repo / name).is_dir():
            shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(repo / name, src / name)
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", tmp / "dist", src]
    try:  # the build backend is here already: build offline, in this environment
        setuptools = importlib.metadata.version("setuptools")
        if int(setuptools.split(".")[0]) >= 77:
            cmd.append("--no-isolation")
    except importlib.metadata.PackageNotFoundError:
        pass
    _run(cmd, tmp, dict(os.environ))
    (wheel,) = (tmp / "dist").glob("olmo_hybrid_jax-*.whl")
    return wheel


def _source_packages(repo: Path) -> dict[str, set[str]]:
    """{installed package dir: its source files} for every folder under pyproject's package-dir roots."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    out = {}
    for pkg, d in meta["tool"]["setuptools"]["package-dir"].items():
        root = repo / d
        for sub in [root, *[p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
            files = {p.name for p in sub.iterdir() if p.is_file() and p.suffix in (".py", ".yaml", ".json", ".u8")}
            if files:
                out["/".join([*pkg.split("."), *sub.relative_to(root).parts])] = files
    return out


def test_wheel_installs_next_to_hugging_face_kernels(tmp_path, repo_root):
    repo = repo_root
    wheel = _build_wheel(repo, tmp_path)

    # every source file of every package (and the package data) is in the wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg, files in _source_packages(repo).items():
        missing = sorted(f for f in files if f"{pkg}/{f}" not in names)
        assert not missing, f"the wheel lacks {pkg}/{missing}: add the package to pyproject's packages list"
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` would shadow Hugging Face's"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, dict(os.environ))
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     dict(os.environ)).stdout.strip())
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in outer))  # after the venv's own
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel, "kernels"], tmp_path,
         dict(os.environ))

    work = tmp_path / "elsewhere"  # not the checkout: nothing may come from the clone
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1", TMPDIR=str(tmp_path))
    info = json.loads(_run([py, "-c", CHECK, site], work, env).stdout.strip().splitlines()[-1])
    for d in info["dirs"]:
        assert Path(d).resolve().is_relative_to(site.resolve()), info
    assert info["vocab"] == 256 and info["tokens"] > 100_000, info

    out = work / "run"
    _run([py, "-m", "olmo_hybrid_jax.train", "--config", "tiny.yaml", "--steps", "1", "--out", out, *QUICK], work, env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["loss"] > 0, rows
    assert (out / "checkpoints").is_dir()
    p = _run([venv / "bin" / "olmo-hybrid-train", "--help"], work, env)
    assert "--config" in p.stdout
