"""olmo_hybrid_jax.eval against lm-eval's own ``hf`` backend (HFLM, torch fp32 CPU) on one tiny checkpoint.

Same numbers as HFLM is the contract: every request kind on hand-built ``Instance`` objects (shared
multiple-choice contexts, a trailing space, the empty context, left truncation at max_length=32,
greedy continuations), one local multiple-choice task through ``simple_evaluate`` / our CLI, at
batch sizes 1 and 4. ``ppl`` equals transformers' loss on the same tokens. Offline: no downloads.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local task's json dataset: never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from eval_helpers import EOS, eval_checkpoint, mc_task_dir  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from olmo_hybrid_jax.eval.__main__ import main as eval_cli  # noqa: E402
from olmo_hybrid_jax.eval.harness import OlmoHybridLM  # noqa: E402

MAX_LEN = 32
LONG = "Once upon a time there was a small cat who lived at the end of the road near the sea"
LL = [("The cat", " sat"), ("The cat", " ran away"), ("The cat", " the"),  # one context, three choices
      ("The cat ", "the mat"),  # trailing space moves to the continuation
      ("", "hello there"),  # empty context: the prefix token (EOS here) conditions
      (LONG, " and the dog"), (LONG, " a"),  # longer than max_length: left truncation
      ("Q: what is the answer? A:", " yes")]
ROLLING = ["the fox", "hi", "a"]  # each fits in max_length: HF's windows are exact too
GEN = [("The cat", {"until": ["\n"], "max_gen_toks": 10}), ("Once upon a", {"until": [], "max_gen_toks": 10}),
       (LONG, {"max_gen_toks": 8, "do_sample": False}),
       ("Q:", {"until": ["\n\n"], "max_gen_toks": 6, "temperature": 0})]


def _inst(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return eval_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt")


@pytest.fixture(scope="module")
def hflm(ckpt):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(ckpt[1]), device="cpu", dtype="float32", batch_size=4, max_length=MAX_LEN)


@pytest.fixture(scope="module", params=[1, 4], ids=["bs1", "bs4"])
def ours(request, ckpt):
    return OlmoHybridLM(pretrained=str(ckpt[1]), batch_size=request.param, max_length=MAX_LEN)


def _greedy_requests(hf, prompts):
    """Token-level requests whose continuation is HF's argmax continuation (is_greedy must be True)."""
    out = []
    for p in prompts:
        ids = list(p)
        for _ in range(3):
            with torch.no_grad():
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        out.append((None, list(p), ids[len(p):]))
        out.append((None, list(p), ids[len(p):-1] + [(ids[-1] + 1) % 256]))  # last token off the argmax
    return out


def test_registered_and_conventions(ours, hflm):
    from lm_eval.api.registry import get_model

    assert get_model("olmo_hybrid_jax") is OlmoHybridLM
    assert (ours.eot_token_id, ours.prefix_token_id, ours.max_length) == (hflm.eot_token_id, hflm.prefix_token_id,
                                                                          hflm.max_length)
    for text in ("The cat ran", " the mat", "<|endoftext|>Hi there"):
        assert ours.tok_encode(text) == hflm.tok_encode(text)
        assert ours._encode_pair(text, " the end") == hflm._encode_pair(text, " the end")


def test_loglikelihood_matches_hflm(ours, hflm, ckpt):
    theirs, mine = hflm.loglikelihood(_inst("loglikelihood", LL)), ours.loglikelihood(_inst("loglikelihood", LL))
    for (a, ga), (b, gb), req in zip(theirs, mine, LL):
        assert abs(a - b) < 1e-4, (req, a, b)
        assert ga == gb, req
    toks = _greedy_requests(ckpt[0], [[83, 257, 220], [78, 77, 258, 220, 76, 64, 83] * 3])
    theirs, mine = hflm._loglikelihood_tokens(toks), ours._loglikelihood_tokens(toks)
    assert [g for _, g in mine] == [g for _, g in theirs] == [True, False, True, False]
    np.testing.assert_allclose([x for x, _ in mine], [x for x, _ in theirs], atol=1e-4)


def test_loglikelihood_rolling(ours, hflm, ckpt):
    theirs = hflm.loglikelihood_rolling(_inst("loglikelihood_rolling", ROLLING))
    np.testing.assert_allclose(ours.loglikelihood_rolling(_inst("loglikelihood_rolling", ROLLING)), theirs, atol=1e-4)
    if ours.batch_size != 4:  # one long-document program is enough
        return
    # longer than max_length: the exact whole-document log-likelihood (HF restarts each window instead)
    ids = [EOS] + ours.tok_encode(LONG)
    assert len(ids) > MAX_LEN + 1
    with torch.no_grad():
        lp = torch.log_softmax(ckpt[0](torch.tensor([ids[:-1]])).logits[0].double(), -1)
    want = float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    got, = ours.loglikelihood_rolling(_inst("loglikelihood_rolling", [(LONG,)]))
    assert abs(got - want) < 1e-3 * max(1.0, abs(want) / 100)


def test_generate_until_matches_hflm(ours, hflm):
    theirs = hflm.generate_until(_inst("generate_until", GEN))
    assert ours.generate_until(_inst("generate_until", GEN)) == theirs
    # a stop string that occurs: both cut there
    text = theirs[1]
    stop = next((c for c in text[1:] if c.strip()), None)
    if stop is not None:
        req = [("Once upon a", {"until": [stop], "max_gen_toks": 10})]
        cut = hflm.generate_until(_inst("generate_until", req))
        assert cut == [text.split(stop)[0]]
        assert ours.generate_until(_inst("generate_until", req)) == cut
    if ours.batch_size == 4:  # one sampling program is enough
        sampled = ours.generate_until(_inst("generate_until", [("The cat", {"do_sample": True, "temperature": 0.9,
                                                                             "max_gen_toks": 5})]))
        assert isinstance(sampled[0], str)


@pytest.fixture(scope="module")
def task_dir():
    return mc_task_dir()


def test_local_task_matches_hflm(hflm, ckpt, task_dir, tmp_path):
    import lm_eval

    from olmo_hybrid_jax.eval.__main__ import task_manager

    tm = task_manager((str(task_dir),))  # the one the CLI uses: lm-eval indexes its thousands of YAMLs once
    want = lm_eval.simple_evaluate(model=hflm, tasks=["tiny_mc"], task_manager=tm, log_samples=False)["results"]
    for bs in (1, 4):
        out = tmp_path / f"res{bs}.json"
        assert eval_cli(["lm-eval", "--checkpoint", str(ckpt[1]), "--tasks", "tiny_mc", "--include-path",
                         str(task_dir), "--batch-size", str(bs), "--max-length", str(MAX_LEN), "--quiet",
                         "--output", str(out)]) == 0
        got = json.loads(out.read_text())["results"]["tiny_mc"]
        for m in ("acc,none", "acc_norm,none"):
            assert got[m] == want["tiny_mc"][m], (bs, m)


def _docs(rng, lengths):
    return [list(rng.integers(2, 256, n)) + [EOS] for n in lengths]


def test_ppl_equals_transformers_loss(ckpt, tmp_path):
    from transformers import AutoTokenizer

    hf, path = ckpt
    docs = _docs(np.random.default_rng(1), [5, 40, 12, 7, 3])  # 40 > max_length 32: windows, the state carried
    f = tmp_path / "docs.npy"
    np.save(f, np.concatenate(docs).astype(np.uint16))
    out = tmp_path / "ppl.json"
    assert eval_cli(["ppl", "--checkpoint", str(path), "--max-length", "32", "--batch-size", "4", "--quiet",
                     "--output", str(out), str(f)]) == 0
    res = json.loads(out.read_text())["total"]
    ces = []
    with torch.no_grad():
        for d in docs:
            logits = hf(torch.tensor([[EOS] + d[:-1]])).logits[0].double()
            ces.append(torch.nn.functional.cross_entropy(logits, torch.tensor(d), reduction="none"))
    ces = torch.cat(ces)
    assert res["tokens"] == len(ces) and res["documents"] == 5
    assert abs(res["perplexity"] / math.exp(float(ces.mean())) - 1) < 1e-5
    tok = AutoTokenizer.from_pretrained(str(path))
    nbytes = sum(len(tok.decode(d, skip_special_tokens=True).encode()) for d in docs)
    assert res["bytes"] == nbytes
    assert abs(res["bits_per_byte"] - float(ces.sum()) / math.log(2) / nbytes) < 1e-4

    # text input: the documents tokenized as `train.data tokenize` would, then scored the same way
    texts = ["the cat", "a dog"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert eval_cli(["ppl", "--checkpoint", str(path), "--max-length", "32", "--batch-size", "4", "--quiet",
                     "--output", str(out),
                     str(tmp_path / "docs.jsonl")]) == 0
    res = json.loads(out.read_text())["total"]
    assert res["bytes"] == sum(len(t) for t in texts)
    assert res["tokens"] == sum(len(tok(t).input_ids) + 1 for t in texts)


def test_bad_input_exits_2(ckpt, tmp_path, task_dir, capsys):
    path = str(ckpt[1])
    bad = tmp_path / "bad.u16"
    np.asarray([5, 6, 9000, EOS], np.uint16).tofile(bad)
    cases = [["ppl", "--checkpoint", str(tmp_path / "missing"), str(bad)],
             ["ppl", "--checkpoint", path, str(bad)],
             ["ppl", "--checkpoint", path, str(tmp_path / "nope.u16")],
             ["lm-eval", "--checkpoint", path, "--tasks", "no_such_task_xyz", "--include-path", str(task_dir)]]
    for argv in cases:
        assert eval_cli(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)


_SHARDED = """
import sys, numpy as np, jax
from flax import nnx
from olmo_hybrid_jax.config import OlmoHybridConfig
from olmo_hybrid_jax.convert import save_hf
from olmo_hybrid_jax.eval.harness import OlmoHybridLM
from olmo_hybrid_jax.model import OlmoHybridForCausalLM
assert jax.device_count() == 4
save_hf(OlmoHybridForCausalLM(OlmoHybridConfig.preset("tiny"), rngs=nnx.Rngs(0)), sys.argv[1], progress=False)
rng = np.random.default_rng(0)
reqs = [(None, list(rng.integers(2, 256, n)), list(rng.integers(2, 256, m))) for n in (3, 20, 50) for m in (1, 5, 30)]
out = {}
for mesh in ({}, {"fsdp": 2}):  # 2 parameter shards x 2 replicas: rows over all 4 devices
    lm = OlmoHybridLM(pretrained=sys.argv[1], batch_size=4, max_length=32, **mesh)
    out[str(mesh)] = lm._loglikelihood_tokens(reqs, disable_tqdm=True)  # continuations of 30: extend windows too
spec = lm.model.lm_head.kernel.get_value().sharding.spec
assert spec[0] == "fsdp", spec
a, b = out.values()
np.testing.assert_allclose([x for x, _ in b], [x for x, _ in a], rtol=1e-5, atol=1e-5)
assert [g for _, g in b] == [g for _, g in a]
try:
    OlmoHybridLM(pretrained=sys.argv[1], batch_size=3, mesh="fsdp")
except ValueError as e:
    assert "multiple of the 4 devices" in str(e), e
else:
    raise AssertionError("batch_size=3 on 4 devices was accepted")
print("ok")
"""


@pytest.mark.slow
def test_sharded_harness_equals_unsharded(tmp_path):
    """``fsdp=2`` on 4 emulated CPU devices (a subprocess: XLA_FLAGS must precede JAX's start)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env.pop("JAX_PLATFORMS", None)
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "ckpt")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
