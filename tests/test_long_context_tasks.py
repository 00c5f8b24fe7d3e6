"""olmo_hybrid_jax.eval.long_context: RULER-style task files, checked without the generator's own code.

Prompt lengths are re-counted (a byte-level BPE tokenizer.json, and UTF-8 bytes), answers are recovered
from the prompts by small independent solvers (needle regex, variable-chain resolution, word counts),
the YAMLs load in lm-eval (its prompt is the row's input + " " + gen_prefix; the metric gives 1.0 / 0.0
/ a fraction) and one tiny 512-token task runs end to end on the project's lm-eval model. Offline.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks' datasets are local: never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eval_helpers import eval_checkpoint, write_tokenizer  # noqa: E402

from olmo_hybrid_jax.eval import long_context as lc  # noqa: E402

L = 2048
NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _prompt(row: dict) -> str:
    return row["input"] + " " + row["gen_prefix"]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def written(tmp_path_factory, tok_dir):
    """Every task at 2048 tokens of the test tokenizer, 4 samples each."""
    out = tmp_path_factory.mktemp("lc") / "tasks"
    return out, lc.write_tasks(out, [L], lc.TASKS, samples_per_task=4, seed=0, tokenizer=tok_dir)


def _check_lengths(rows, task, max_length, count, tol):
    budget = max_length - lc.MAX_GEN_TOKS[task]
    for r in rows:
        n = count(_prompt(r))
        assert n == r["length"] and r["max_length"] == max_length, (task, r["index"])
        assert budget - tol <= n <= budget, (task, r["index"], n, budget)


def test_prompt_lengths_in_tokens(written, tok_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    out, manifest = written
    assert manifest["counting"]["kind"] == "tokenizer"
    for t in lc.TASKS:
        rows = _rows(out / f"ruler_{L}" / f"{t}.jsonl")
        assert [r["index"] for r in rows] == [0, 1, 2, 3] and {r["task"] for r in rows} == {t}
        # within one haystack unit: a corpus word, a filler sentence, a rare word's repeats (~10 bytes each)
        _check_lengths(rows, t, L, lambda s: len(tok.encode(s).ids), tol=48)


def test_prompt_lengths_in_bytes(tmp_path):
    tasks = ["niah_multikey", "variable_tracking", "common_words"]
    lc.write_tasks(tmp_path, [3000], tasks, samples_per_task=2, seed=5, haystack="noise")
    for t in tasks:
        rows = _rows(tmp_path / "ruler_3000" / f"{t}.jsonl")
        assert all(_prompt(r).isascii() for r in rows)  # bytes = characters
        _check_lengths(rows, t, 3000, lambda s: len(s.encode("utf-8")), tol=48)
    assert "The grass is green." in _rows(tmp_path / "ruler_3000" / "niah_multikey.jsonl")[0]["input"]


def test_deterministic(tmp_path, tok_dir):
    kw = dict(lengths=[2048, 2500], tasks=["niah_single", "variable_tracking", "common_words"],
              samples_per_task=3, tokenizer=tok_dir)
    lc.write_tasks(tmp_path / "a", seed=7, **kw)
    lc.write_tasks(tmp_path / "b", seed=7, **kw)
    lc.write_tasks(tmp_path / "c", seed=8, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 1 + 2 * (3 * 2 + 2)  # manifest; per length 3 jsonl + 3 task YAMLs, group, utils
    assert all(a[k] != c[k] for k in a if k.endswith(".jsonl"))
    assert all(a[k] == c[k] for k in a if k.endswith((".yaml", ".py")))


def test_needles_recoverable(written):
    out, _ = written
    for t, (n_keys, n_values, n_asked) in lc.NIAH.items():
        for r in _rows(out / f"ruler_{L}" / f"{t}.jsonl"):
            found: dict[str, list[str]] = {}
            for k, v in NEEDLE.findall(r["input"]):
                found.setdefault(k, []).append(v)
            assert len(found) == n_keys and all(len(v) == n_values for v in found.values()), (t, found)
            asked = re.search(r"for (.+) mentioned in the provided text", r["gen_prefix"]).group(1)
            asked = re.split(r", and |, ", asked)
            assert len(asked) == n_asked and asked[0] in r["input"].split("\n")[-1]  # the question names them
            assert sorted(v for k in asked for v in found[k]) == sorted(r["outputs"])
            assert all(r["input"].count(v) == 1 for v in r["outputs"])
            assert r["depth"] in r["needle_depths"] and all(0 <= d <= 100 for d in r["needle_depths"])
    rows = _rows(out / f"ruler_{L}" / "niah_single.jsonl")
    for r in rows:  # the recorded depth: where the needle sits in the haystack, in percent of its characters
        hay = r["input"].split("\n", 1)[1].rsplit("\n", 1)[0]
        assert abs(100 * hay.index(NEEDLE.search(hay).group(0)) / len(hay) - r["depth"]) < 0.01
    depths = [r["depth"] for r in rows]
    assert max(depths) - min(depths) > 40  # four samples already spread over the depth


def _resolve_chains(text: str) -> dict[str, str]:
    """Every variable's value from ``VAR X = 12345`` / ``VAR Y = VAR X`` statements, in any order."""
    refs = dict((a, b or c) for a, b, c in re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))", text))

    def value(v, seen=()):
        assert v not in seen, "cycle"
        x = refs[v]
        return x if x.isdigit() else value(x, (*seen, v))

    return {v: value(v) for v in refs}


def test_variable_tracking_resolves(written):
    out, _ = written
    for r in _rows(out / f"ruler_{L}" / "variable_tracking.jsonl"):
        value = re.search(r"assigned the value (\d+), they are:$", r["gen_prefix"]).group(1)
        vals = _resolve_chains(r["input"])
        assert sorted(v for v, x in vals.items() if x == value) == sorted(r["outputs"]) and len(r["outputs"]) == 5
        main = r["input"].rsplit("\n\n", 1)[-1]  # after the solved example: the asked chain, in order
        order = [m.start() for m in (re.search(rf"VAR {v} = ", main) for v in r["outputs"])]
        assert order == sorted(order)


def test_common_words_countable(written):
    out, _ = written
    for r in _rows(out / f"ruler_{L}" / "common_words.jsonl"):
        main = r["input"].rsplit("\n\n", 1)[-1]  # after the solved example
        entries = re.findall(r"(\d+)\. ([a-z]+)", main.split("\n")[1])
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        top = Counter(w for _, w in entries).most_common()
        assert {w for w, _ in top[:10]} == set(r["outputs"]) and (len(top) == 10 or top[9][1] > top[10][1])
        assert r["depth"] is None


def test_lm_eval_loads_and_scores(written):
    from lm_eval.tasks import TaskManager

    out, manifest = written
    tm = TaskManager(include_path=str(out), include_defaults=False)
    names = manifest["groups"][f"ruler_{L}"]
    assert set(names) | {f"ruler_{L}"} <= set(tm.all_tasks)
    loaded = tm.load([f"ruler_{L}"])
    assert loaded["group_map"] == {f"ruler_{L}": names}
    for name in names:
        task = loaded["tasks"][name]
        doc = next(iter(task.test_docs()))
        assert task.fewshot_context(doc, 0, gen_prefix=task.doc_to_prefix(doc)) == _prompt(doc)
        assert task.config.generation_kwargs["max_gen_toks"] == lc.MAX_GEN_TOKS[doc["task"]]
        outs = doc["outputs"]
        assert task.process_results(doc, [" " + " and ".join(outs).upper() + ".\n"]) == {"string_match": 1.0}
        assert task.process_results(doc, [" 0000000, I do not know"]) == {"string_match": 0.0}
        if len(outs) > 1:
            got = task.process_results(doc, [" " + " ".join(outs[:2])])["string_match"]
            assert got == pytest.approx(2 / len(outs))


@pytest.mark.slow
def test_end_to_end_tiny_model(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from olmo_hybrid_jax.eval.harness import OlmoHybridLM

    _, ckpt = eval_checkpoint(tmp_path / "ckpt")
    m = lc.write_tasks(tmp_path / "tasks", [512], ["niah_single"], samples_per_task=1, tokenizer=ckpt)
    assert m["files"]["ruler_512/niah_single.jsonl"]["max_length"] <= 512 - 128
    lm = OlmoHybridLM(pretrained=str(ckpt), max_length=512)
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=["ruler_512"], task_manager=tm, log_samples=False)["results"]
    for name in ("ruler_512", "ruler_niah_single_512"):
        assert 0.0 <= res[name]["string_match,none"] <= 1.0, res  # a random model scores ~0: the pipeline is checked


def _cli(argv) -> int:
    from olmo_hybrid_jax.eval.__main__ import main  # the project's eval CLI, as a user runs it

    return main(["long-context", *argv])


def test_cli_and_bad_input(tmp_path, tok_dir, capsys):
    assert _cli(["--out", str(tmp_path / "ok"), "--lengths", "1k", "--tasks", "niah_single", "--samples", "1",
                 "--tokenizer", str(tok_dir / "tokenizer.json"), "--quiet"]) == 0
    assert (tmp_path / "ok" / "ruler_1024" / "ruler_1024.yaml").is_file()
    cases = {"unknown task": ["--tasks", "niah_single,needle_dance"],
             "too small": ["--lengths", "4096,300", "--tasks", "common_words"],
             "no tokenizer.json": ["--tokenizer", str(tmp_path / "nowhere")],
             "bad length": ["--lengths", "4q"]}
    for why, argv in cases.items():
        out = tmp_path / why.replace(" ", "_")
        assert _cli(["--out", str(out), "--samples", "1", *argv]) == 2, why
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (why, err)
        assert not out.exists(), why  # checked before anything is written
        with pytest.raises(ValueError):
            lc.write_tasks(out, **{"unknown task": dict(tasks=["needle_dance"]),
                                   "too small": dict(lengths=[300], tasks=["common_words"]),
                                   "no tokenizer.json": dict(tokenizer=tmp_path / "nowhere"),
                                   "bad length": dict(lengths="4q")}[why])
