"""``python -m olmo_hybrid_jax.eval sweep``: a series of checkpoints into one table and plot.

A tiny training run's three orbax steps give the same numbers as ``ppl`` / ``lm-eval`` on each step
alone, with the run's own token counter; ``stageK-stepN`` / ``stepN`` folders parse, order and count
tokens as documented; a second call skips the rows it has; bad input is one ``error:`` line, exit 2,
before any model loads. Offline: no downloads.
"""

from __future__ import annotations

import csv
import json
import os
import weakref

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local task's json dataset: never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from eval_helpers import mc_task_dir  # noqa: E402

from olmo_hybrid_jax.eval import loading  # noqa: E402
from olmo_hybrid_jax.eval.__main__ import main as eval_cli  # noqa: E402
from olmo_hybrid_jax.eval.commands import InputError  # noqa: E402
from olmo_hybrid_jax.eval.sweep import assign_tokens, discover, parse_name  # noqa: E402

TINY_RUN = ["train.steps=3", "checkpoint.every=1", "checkpoint.keep=5", "train.progress=false",
            "data.global_batch_size=4", "data.seq_len=32", "model.scan_layers=false"]
TINY_EOS = 1  # the tiny preset's byte-level EOS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.trainer import run

    out = tmp_path_factory.mktemp("sweep") / "run"
    run(load_config("configs/tiny.yaml", TINY_RUN), out)
    return out


@pytest.fixture(scope="module")
def task_dir():
    return mc_task_dir()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    rng = np.random.default_rng(0)
    f = tmp_path_factory.mktemp("docs") / "docs.u8"
    np.concatenate([np.r_[rng.integers(2, 256, n), TINY_EOS] for n in (5, 40, 12)]).astype(np.uint8).tofile(f)
    return f


def _sweep_args(source, out, *extra):
    # batch 1 and max_length 32, as the one-checkpoint runs below: every program compiles once
    return ["sweep", "--checkpoints", str(source), "--output", str(out), "--max-length", "32", "--quiet", *extra]


@pytest.fixture(scope="module")
def swept(run_dir, task_dir, docs, tmp_path_factory):
    """The run swept on tiny_mc and docs.u8, with every model's liveness recorded at each load."""
    out = tmp_path_factory.mktemp("out") / "sweep.json"
    refs, alive = [], []
    orig = loading.load_model

    def load(*a, **k):
        alive.append(sum(r() is not None for r in refs))
        model = orig(*a, **k)
        refs.append(weakref.ref(model))
        return model

    loading.load_model = load
    try:
        assert eval_cli(_sweep_args(run_dir, out, "--tasks", "tiny_mc", "--include-path", str(task_dir),
                                    "--ppl", str(docs))) == 0
    finally:
        loading.load_model = orig
    return out, alive


@pytest.mark.slow
def test_sweep_of_a_run_equals_each_checkpoint_alone(swept, run_dir, task_dir, docs, tmp_path):
    import matplotlib.image

    out, alive = swept
    assert alive == [0, 0, 0]  # each model was gone before the next one loaded
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert [r["name"] for r in rows] == ["step1", "step2", "step3"]
    assert [r["tokens"] for r in rows] == [32 * 4 * s for s in (1, 2, 3)]  # seq_len x global batch x step
    assert {r["tokens_source"] for r in rows} == {"metrics.jsonl"}
    with open(out.with_suffix(".csv")) as f:
        got = list(csv.DictReader(f))
    assert [r["name"] for r in got] == ["step1", "step2", "step3"]
    for c, r in zip(got, rows):
        for k, v in r.items():
            assert c[k] == ("" if v is None else str(v)), k
    png = matplotlib.image.imread(out.with_suffix(".png"))
    assert png.ndim == 3 and png.shape[0] > 100
    losses = [r["ppl/docs.u8/loss"] for r in rows]
    assert len(set(losses)) == 3  # three different checkpoints
    for r in rows:
        one = tmp_path / f"{r['name']}.json"
        step = ["--checkpoint", str(run_dir), "--step", str(r["step"]), "--max-length", "32", "--quiet",
                "--output", str(one)]
        assert eval_cli(["ppl", *step, str(docs)]) == 0
        alone = json.loads(one.read_text())["files"][str(docs)]
        for k in ("loss", "perplexity", "bits_per_byte"):
            assert r[f"ppl/docs.u8/{k}"] == alone[k], (r["name"], k)
        assert eval_cli(["lm-eval", *step, "--tasks", "tiny_mc", "--include-path", str(task_dir)]) == 0
        alone = json.loads(one.read_text())["results"]["tiny_mc"]
        for k in ("acc", "acc_norm", "acc_stderr"):
            assert r[f"tiny_mc/{k}"] == alone[f"{k},none"], (r["name"], k)


@pytest.mark.slow
def test_resume_skips_done_rows(swept, run_dir, task_dir, docs, capsys):
    out, _ = swept
    table = json.loads(out.read_text())
    before = {r["name"]: r for r in table["rows"]}
    table["rows"] = [r for r in table["rows"] if r["name"] != "step2"]  # as if the sweep had died there
    out.write_text(json.dumps(table))
    capsys.readouterr()
    assert eval_cli(_sweep_args(run_dir, out, "--tasks", "tiny_mc", "--include-path", str(task_dir),
                                "--ppl", str(docs))) == 0
    err = capsys.readouterr().err
    assert f"step1: already in {out}, skipped" in err and f"step3: already in {out}, skipped" in err
    assert "step2: already" not in err
    after = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert after == before


def _fake_hf(d):
    """A folder that ``checkpoint_kind`` calls an HF checkpoint (discovery reads no weights)."""
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"")
    return d


def test_stage_names_parse_order_and_count_tokens(tmp_path):
    assert parse_name("stage1-step1000") == (1, 1000, None)
    assert parse_name("step42") == (None, 42, None)
    assert parse_name("stage1-step928646-tokens3896B") == (1, 928646, 3896 * 10**9)
    assert parse_name("stage2-ingredient1-step1000") is None and parse_name("main") is None
    for name in ("stage2-step100", "stage1-step2000", "stage1-step1000", "stage3-step5", "step7"):
        _fake_hf(tmp_path / name)
    (tmp_path / "README.md").write_text("ignored")
    (tmp_path / ".cache").mkdir()
    ckpts = discover(tmp_path)
    assert [c.name for c in ckpts] == ["step7", "stage1-step1000", "stage1-step2000", "stage2-step100", "stage3-step5"]
    # stage 2 starts where stage 1 ended (20,000), stage 3 where stage 2 ended
    got = assign_tokens(ckpts, {None: 10}, {})
    assert [c.tokens for c in got] == [70, 10_000, 20_000, 21_000, 21_050]
    assert {c.tokens_source for c in got} == {"--tokens-per-step"}
    got = assign_tokens(ckpts, {None: 10, 2: 3}, {3: 0})  # per-stage tokens per step; stage 3 restarts at 0
    assert [c.tokens for c in got] == [70, 10_000, 20_000, 20_300, 50]
    with pytest.raises(InputError, match="no token count"):
        assign_tokens(ckpts, {}, {})
    with pytest.raises(InputError, match="--stage-offset 3=TOKENS"):
        assign_tokens([c for c in ckpts if c.stage != 2], {None: 10}, {})


@pytest.mark.slow
def test_sweep_of_stage_folders(swept, run_dir, docs, tmp_path):
    """HF revision folders (stageK-stepN) and an OLMo-core-style stepN folder: the run's steps exported to HF."""
    from olmo_hybrid_jax.train.export import main as export

    series = tmp_path / "series"
    for step, name in ((1, "step3"), (3, "stage2-step5")):
        assert export([str(run_dir), str(series / name), "--step", str(step)]) == 0
    for name in ("stage1-step10", "stage1-step20"):  # copies of step 1: discovery follows links
        (series / name).symlink_to(series / "step3", target_is_directory=True)
    out = tmp_path / "s" / "table"  # no .json: the suffix is added
    assert eval_cli(_sweep_args(series, out, "--ppl", str(docs), "--tokens-per-step", "100",
                                "--tokens-per-step", "2=7")) == 0
    rows = json.loads((tmp_path / "s" / "table.json").read_text())["rows"]
    assert [(r["name"], r["stage"], r["step"], r["tokens"]) for r in rows] == [
        ("step3", None, 3, 300), ("stage1-step10", 1, 10, 1000), ("stage1-step20", 1, 20, 2000),
        ("stage2-step5", 2, 5, 2035)]  # stage 2 continues from stage 1's last checkpoint
    assert (tmp_path / "s" / "table.csv").is_file() and (tmp_path / "s" / "table.png").is_file()
    run_rows = json.loads(swept[0].read_text())["rows"]
    want = [run_rows[i]["ppl/docs.u8/loss"] for i in (0, 0, 0, 2)]  # the HF copies score as the run's steps
    np.testing.assert_allclose([r["ppl/docs.u8/loss"] for r in rows], want, rtol=1e-6)


def test_bad_input_exits_2_before_any_model_loads(tmp_path, task_dir, docs, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_model", no_load)
    empty = tmp_path / "empty"
    empty.mkdir()
    odd = tmp_path / "odd"
    _fake_hf(odd / "stage1-step10")
    _fake_hf(odd / "final")
    stages = tmp_path / "stages"
    _fake_hf(stages / "stage1-step10")
    only2 = tmp_path / "only2"
    _fake_hf(only2 / "stage2-step10")
    olmo_core = tmp_path / "olmo_core"
    (olmo_core / "step100" / "model_and_optim").mkdir(parents=True)
    bare_run = tmp_path / "bare_run"
    bare_run.mkdir()
    (bare_run / "config.yaml").write_text("{}\n")  # the defaults: the tiny preset
    run_dir = tmp_path / "run"  # a run folder as discovery sees it (the weights are never read)
    (run_dir / "checkpoints" / "1").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}\n")
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"settings": {"ppl": ["other.u8"]}, "rows": []}))
    out = str(tmp_path / "o.json")
    ppl = ["--ppl", str(docs)]
    cases = {
        "holds no checkpoint folders": _sweep_args(empty, out, *ppl),
        "neither stageK-stepN nor stepN": _sweep_args(odd, out, *ppl, "--tokens-per-step", "1"),
        "no token count": _sweep_args(stages, out, *ppl),
        "--stage-offset 2=TOKENS": _sweep_args(only2, out, *ppl, "--tokens-per-step", "5"),
        "OLMo-core distributed checkpoint": _sweep_args(olmo_core, out, *ppl, "--tokens-per-step", "5"),
        "holds no finished checkpoint": _sweep_args(bare_run, out, *ppl),
        "expected N or STAGE=N": _sweep_args(stages, out, *ppl, "--tokens-per-step", "x"),
        "nothing to evaluate": _sweep_args(run_dir, out),
        "input file not found": _sweep_args(run_dir, out, "--ppl", str(tmp_path / "nope.u8")),
        "unknown task 'no_such_task_xyz'": _sweep_args(run_dir, out, "--tasks", "no_such_task_xyz",
                                                       "--include-path", str(task_dir)),
        "was written with": _sweep_args(run_dir, prev, *ppl),
        "is one hf checkpoint": _sweep_args(stages / "stage1-step10", out, *ppl),
    }
    for want, argv in cases.items():
        assert eval_cli(argv) == 2, want
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], (want, err)
