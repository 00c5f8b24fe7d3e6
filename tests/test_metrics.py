"""olmo_hybrid_jax.train.metrics and .plot: metrics bookkeeping on resume, the loss plot."""

import json

import pytest

from olmo_hybrid_jax.train.metrics import truncate_metrics


def test_truncate_metrics_keeps_one_row_per_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 31)) + '{"step": 31, "lo')
    assert truncate_metrics(p, 25) == 25
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == list(range(1, 26))


def test_plot_loss_curve(tmp_path):
    pytest.importorskip("matplotlib")
    from olmo_hybrid_jax.train.plot import main

    rows = (json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 20))
    (tmp_path / "metrics.jsonl").write_text("".join(rows))
    assert main([str(tmp_path), "--out", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "nope")]) == 2
