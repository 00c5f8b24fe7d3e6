"""RULER-style synthetic long-context tasks, written as local jsonl files and lm-eval task YAMLs.

    python -m olmo_hybrid_jax.eval long-context --out DIR --lengths 4k,8k,16k,32k,64k,128k
        [--tasks niah_single,niah_multikey,...] [--samples 100] [--seed 0] [--tokenizer CKPT_DIR_or_tokenizer.json]
        [--haystack corpus|noise]
    python -m olmo_hybrid_jax.eval lm-eval --checkpoint CKPT --include-path DIR --tasks ruler_4096 --max-length 4096

Tasks (the shapes of RULER's, Hsieh et al. 2024, https://github.com/NVIDIA/RULER; answers are lists of strings
and the score is RULER's ``string_match_all``: the fraction of them found in the generated text, case-insensitive):

- ``niah_single``: one needle ``One of the special magic numbers for {key} is: {value}.`` (key: two words
  joined by ``-``, value: 7 digits) in the haystack; asked for the key's number (RULER's niah_single_2).
- ``niah_multikey``: four needles with different keys, one asked (niah_multikey_1).
- ``niah_multivalue``: four needles with one key and four values, all asked (niah_multivalue).
- ``niah_multiquery``: four needles with different keys, all four asked (niah_multiquery).
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops, 5 variables of 5
  capital letters) among filler sentences; name every variable assigned the chain's value. One solved
  example (a short chain) comes first, as in RULER's vt.
- ``common_words``: a numbered list of 6-letter made-up words in which 10 words repeat 30 times and the
  others 3 times (6 and 1 below 4096 tokens, or where 30 repeats of 10 words do not fit, as with byte
  counts at 4096); name the 10 most common. One solved short example first.

Haystacks: ``corpus`` (default for the needle tasks) is the repo's embedded text corpus (the CPython
help topics of ``data/pydoc_topics.u8``: real prose and code, whitespace collapsed, taken cyclically from
a random word of it; needles go in at sentence ends); ``noise`` is RULER's filler ``The grass is green.
The sky is blue. ...`` sentence by sentence (variable tracking always uses it). No network.

Lengths: a task at length L is for a model run at ``max_length=L``: its prompt (the text lm-eval gives the
model, ``input + " " + gen_prefix``, with the special tokens the tokenizer adds) is at most
``L - max_gen_toks`` tokens (128 for the needle tasks, 30 for variable tracking, 120 for common words,
RULER's budgets), so prompt and answer fit in L, as RULER counts. The haystack grows until one more unit
(a corpus word, a filler sentence, one more rare word with its repeats) would not fit: the prompt is
within about one unit of that budget. Tokens are those of the target checkpoint's ``tokenizer.json`` (HF
``tokenizers``); without one, UTF-8 bytes (all text here is ASCII: bytes = characters = the ids of a
byte-level model). Needle depths follow a rotated van der Corput sequence over the samples, so any
first k samples (lm-eval ``--limit k``) spread over the depth.

Written files (deterministic given the arguments and the tokenizer: the same bytes on every run)::

    DIR/manifest.json                      arguments, tokenizer sha256, per file: sha256, rows, lengths
    DIR/ruler_{L}/ruler_{L}.yaml           group ruler_{L}: every task at L, score = unweighted task mean
    DIR/ruler_{L}/ruler_{task}_{L}.yaml    generate_until task, greedy, metric string_match
    DIR/ruler_{L}/{task}.jsonl             one row per sample (below)
    DIR/ruler_{L}/utils.py                 the dataset loader and the metric (no olmo_hybrid_jax import)

A jsonl row: ``index``, ``task``, ``max_length`` (L), ``length`` (the prompt's tokens), ``depth`` (percent
of the haystack's characters before the asked needle placed at the sample's depth, for variable tracking
the chain's first assignment; null for common_words), ``needle_depths``
(every inserted needle's, ascending), ``outputs`` (the expected answers), ``gen_prefix`` (the answer's
start, which lm-eval appends to the prompt after a space) and ``input`` (the prompt before it). The
folder is self-contained (the loader finds the jsonl next to itself): copy it to any machine with lm-eval.

Bad input (an unknown task, a length too small to hold a task's prompt, a missing tokenizer) raises
``LongContextError`` (a ValueError) before any file is written; the CLI prints one ``error:`` line and
exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words")
HAYSTACKS = ("corpus", "noise")
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
#: Tokens generated per task (RULER's tokens_to_generate); the prompt gets the rest of the length.
MAX_GEN_TOKS = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128,
                "variable_tracking": 30, "common_words": 120}
#: (keys, values per key, keys asked) of each needle task, RULER's counts.
NIAH = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
        "niah_multiquery": (4, 1, 4)}
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
FORMAT_VERSION = 1

_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
_VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {k} variables are "
              "assigned the value {value}, they are:")
_CW_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
_CW_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
_CW_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
_WORD_POOL = len(_SYLLABLES) ** 3  # 3-syllable words: all 6 letters, so no answer is a substring of another
_SNAP = 64  # words searched either side of a needle's depth for a sentence end


class LongContextError(ValueError):
    """Bad input for the task generator: reported as one ``error:`` line, exit status 2."""


# ----------------------------------------------------------------------------------------- counting
class _Counter:
    """Prompt length in tokens of a ``tokenizer.json`` (with its special tokens), else in UTF-8 bytes."""

    def __init__(self, tokenizer):
        self.tok, self.sha256 = None, None
        if tokenizer is None or (isinstance(tokenizer, str) and tokenizer in ("bytes", "chars")):
            return
        if not isinstance(tokenizer, (str, Path)):  # a tokenizers.Tokenizer
            self.tok = tokenizer
            self.sha256 = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
            return
        p = Path(tokenizer).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise LongContextError(f"no tokenizer.json at {p} (give a tokenizer.json, a checkpoint folder holding "
                                   "one, or 'bytes')")
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise LongContextError(f"{p}: not a tokenizers file ({e})") from e
        self.sha256 = hashlib.sha256(p.read_bytes()).hexdigest()

    @property
    def kind(self) -> str:
        return "bytes" if self.tok is None else "tokenizer"

    def __call__(self, texts: list[str]) -> list[int]:
        if self.tok is None:
            return [len(t.encode("utf-8")) for t in texts]
        return [len(e.ids) for e in self.tok.encode_batch(texts)]  # threads over the batch


# ----------------------------------------------------------------------------------------- haystacks
@dataclass(frozen=True)
class _Corpus:
    words: tuple[str, ...]
    ends: tuple[bool, ...]  # a sentence (or document) ends after words[i]: a needle may follow it
    text: str  # the words joined: keys and values are checked against it
    vocab: tuple[str, ...]  # lowercase words of 4-10 letters: the needle keys are pairs of them


@lru_cache(maxsize=1)
def _corpus() -> _Corpus:
    """The embedded corpus as words (ASCII only; markup rules like ``*****`` dropped), cached per process."""
    raw = resources.files("olmo_hybrid_jax.data").joinpath("pydoc_topics.u8").read_bytes()
    words, ends = [], []
    for doc in raw.split(b"\x01"):  # EOS = 1 between documents (train.data's byte corpus)
        ws = [w for w in doc.decode("utf-8", errors="replace").split()
              if w.isascii() and not re.fullmatch(r"[*=\-~^#+]{3,}", w)]
        for i, w in enumerate(ws):
            words.append(w)
            ends.append(i == len(ws) - 1 or w.rstrip("\"')]").endswith((".", "?", "!")))
    text = " ".join(words)
    vocab = sorted({w for w in words if re.fullmatch(r"[a-z]{4,10}", w)})
    return _Corpus(tuple(words), tuple(ends), text, tuple(vocab))


def _cyclic(seq: Sequence[str], start: int, n: int) -> list[str]:
    """n items of seq from start, wrapping around."""
    out = list(seq[start:start + n])
    while len(out) < n:
        out.extend(seq[:n - len(out)])
    return out


# ----------------------------------------------------------------------------------------- samples
@dataclass
class _Sample:
    """One prompt as a function of its haystack size n: ``head + context(n) + tail``, then ``" " + gen_prefix``.

    The needles are (depth fraction, text): each goes before haystack unit ``round(fraction * n)``,
    moved to the nearest position ``boundary`` allows.
    """

    head: str
    tail: str
    gen_prefix: str
    outputs: list[str]
    units: Callable[[int], list[str]]
    needles: list[tuple[float, str]] = field(default_factory=list)
    boundary: Callable[[int, int], bool] = lambda j, n: True
    primary: str | None = None  # the needle whose depth is the row's depth

    def context(self, n: int) -> str:
        units = self.units(n)
        at = []
        for frac, text in self.needles:
            t = min(n, max(0, round(frac * n)))
            j = next((c for d in range(_SNAP + 1) for c in (t - d, t + d) if 0 <= c <= n and self.boundary(c, n)), t)
            at.append((j, text))
        for j, text in reversed(sorted(at, key=lambda a: a[0])):  # from the back, ties too: the needles keep order
            units.insert(j, text)
        return " ".join(units)

    def input(self, n: int) -> str:
        return self.head + self.context(n) + self.tail

    def prompt(self, n: int) -> str:
        return self.input(n) + " " + self.gen_prefix  # lm-eval's target_delimiter between the two


def _seed(*parts) -> int:
    """A 64-bit seed from the parts (stable across processes and Python versions, unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _vdc(i: int) -> float:
    """The i-th van der Corput number in base 2: any prefix of the sequence covers [0, 1) evenly."""
    x, f = 0.0, 0.5
    while i:
        x, i, f = x + f * (i & 1), i >> 1, f / 2
    return x


def _haystack(kind: str, rng: random.Random):
    """(units(n), boundary(j, n)) of a haystack from a random starting point."""
    if kind == "noise":
        start = rng.randrange(len(NOISE))
        return (lambda n: _cyclic(NOISE, start, n)), (lambda j, n: True)
    c = _corpus()
    start = rng.randrange(len(c.words))
    return ((lambda n: _cyclic(c.words, start, n)),
            (lambda j, n: j in (0, n) or c.ends[(start + j - 1) % len(c.words)]))


def _fresh(rng: random.Random, make: Callable[[], str], taken: set[str], text: str = "") -> str:
    """A value from make() not in taken and not in text (so the haystack cannot answer for a needle)."""
    while True:
        v = make()
        if v not in taken and v not in text:
            taken.add(v)
            return v


def _niah(task: str, rng: random.Random, depth: float, haystack: str) -> _Sample:
    n_keys, n_values, n_asked = NIAH[task]
    c = _corpus()
    taken: set[str] = set()
    text = c.text if haystack == "corpus" else ""
    keys = [_fresh(rng, lambda: f"{rng.choice(c.vocab)}-{rng.choice(c.vocab)}", taken, text) for _ in range(n_keys)]
    values = [[_fresh(rng, lambda: str(rng.randrange(10 ** 6, 10 ** 7)), taken, text) for _ in range(n_values)]
              for _ in keys]
    asked = rng.sample(range(n_keys), n_asked)
    query = keys[asked[0]] if n_asked == 1 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
    needles = [(i, _NEEDLE.format(key=k, value=v)) for i, k in enumerate(keys) for v in values[i]]
    rng.shuffle(needles)
    primary = next(t for i, t in needles if i == asked[0])
    one = n_asked * n_values == 1
    head = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
            "about the number afterwards.\n" if one else "Some special magic numbers are hidden within the following "
            "text. Make sure to memorize it. I will quiz you about the numbers afterwards.\n")
    tail = (f"\nWhat is the special magic number for {query} mentioned in the provided text?" if one else
            f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?")
    gen_prefix = (f"The special magic number for {query} mentioned in the provided text is" if one else
                  f"The special magic numbers for {query} mentioned in the provided text are")
    units, boundary = _haystack(haystack, rng)
    fracs = [depth if t == primary else rng.random() for _, t in needles]
    return _Sample(head, tail, gen_prefix, [v for i in asked for v in values[i]], units,
                   list(zip(fracs, [t for _, t in needles])), boundary, primary)


def _vt_chain(rng: random.Random, taken: set[str], hops: int = 4) -> tuple[list[str], list[str], str]:
    """(variable names, assignment statements in chain order, the value) of one chain."""
    names = [_fresh(rng, lambda: "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)), taken)
             for _ in range(hops + 1)]
    value = _fresh(rng, lambda: str(rng.randrange(10000, 100000)), taken)
    return names, [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])], value


def _vt(rng: random.Random, depth: float) -> _Sample:
    taken: set[str] = set()
    ex_names, ex_chain, ex_value = _vt_chain(rng, taken)
    ex_start = rng.randrange(len(NOISE))
    ex = _Sample(_VT_HEAD, _VT_QUESTION.format(value=ex_value), _VT_PREFIX.format(k=len(ex_names), value=ex_value),
                 ex_names, lambda n: _cyclic(NOISE, ex_start, n),
                 [((i + 0.5) / len(ex_chain), s) for i, s in enumerate(ex_chain)])
    example = ex.prompt(3 * len(ex_chain)) + " " + " ".join(ex_names) + "\n\n"
    names, chain, value = _vt_chain(rng, taken)
    # the first assignment at the sample's depth, the rest spread after it in chain order
    fracs = sorted([depth] + [depth + (1 - depth) * rng.random() for _ in chain[1:]])
    start = rng.randrange(len(NOISE))
    return _Sample(example + _VT_HEAD, _VT_QUESTION.format(value=value), _VT_PREFIX.format(k=len(names), value=value),
                   names, lambda n: _cyclic(NOISE, start, n), list(zip(fracs, chain)), primary=chain[0])


def _word(i: int) -> str:
    """The i-th made-up 3-syllable word (i < _WORD_POOL)."""
    s = len(_SYLLABLES)
    return _SYLLABLES[i // (s * s)] + _SYLLABLES[i // s % s] + _SYLLABLES[i % s]


def _cw_list(words: list[str], common: int, freq_common: int, freq_rare: int, seed: int) -> list[str]:
    """The numbered entries: the first `common` words freq_common times each, the rest freq_rare times, shuffled."""
    entries = words[:common] * freq_common + words[common:] * freq_rare
    random.Random(seed).shuffle(entries)
    return [f"{i + 1}. {w}" for i, w in enumerate(entries)]


def _cw(rng: random.Random, short: bool, budget: int) -> _Sample:
    freq, ex_words, ex_freq = ((6, 1), 20, (3, 1)) if short else ((30, 3), 40, (10, 3))
    pool = [_word(i) for i in rng.sample(range(_WORD_POOL), min(_WORD_POOL, 10 + ex_words + budget // freq[1] + 1))]
    ex_seed, seed = rng.getrandbits(64), rng.getrandbits(64)
    ex_list = pool[:ex_words]
    ex_context = " ".join(_cw_list(ex_list, 10, *ex_freq, ex_seed))
    example = (_CW_HEAD + ex_context + _CW_QUESTION + " " + _CW_PREFIX + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_list[:10])) + "\n\n")
    words = pool[ex_words:]
    return _Sample(example + _CW_HEAD, _CW_QUESTION, _CW_PREFIX, words[:10],
                   lambda n: _cw_list(words[:10 + n], 10, *freq, _seed(seed, n)))


def _sample(task: str, max_length: int, index: int, seed: int, haystack: str, short: bool = False) -> _Sample:
    """Sample ``index`` of a task at a length (``short``: common_words with its small counts)."""
    rng = random.Random(_seed(seed, task, max_length, index))
    shift = random.Random(_seed(seed, task, max_length, "depth")).random()
    depth = (_vdc(index + 1) + shift) % 1.0
    if task in NIAH:
        return _niah(task, rng, depth, haystack)
    if task == "variable_tracking":
        return _vt(rng, depth)
    return _cw(rng, short, max_length - MAX_GEN_TOKS[task])


# ----------------------------------------------------------------------------------------- fitting
def _too_small(task: str, max_length: int, tokens: int) -> LongContextError:
    g = MAX_GEN_TOKS[task]
    return LongContextError(f"length {max_length} is too small for {task}: its prompt without haystack is {tokens} "
                            f"tokens, and {g} more are generated (needs at least {tokens + g})")


def _fit(samples: list[_Sample], count: _Counter, budget: int, task: str, max_length: int) -> list[tuple[int, int]]:
    """Per sample (haystack size n, prompt tokens): the largest n whose prompt fits the budget, within one unit.

    All samples advance together (one batched encode per step): secant steps aimed half a unit under
    the budget from the tokens per unit measured so far (or those of the bracket once there is one),
    bisection of the bracket after 8 steps, so it always ends. Assumes tokens grow with n, as they do up
    to tokenizer noise; typically 2-4 encodes per sample.
    """
    k = len(samples)
    c0 = count([s.prompt(0) for s in samples])
    for c in c0:
        if c > budget:
            raise _too_small(task, max_length, c)
    lo, clo, hi, chi = [0] * k, list(c0), [None] * k, [None] * k
    # the first guess: the template's tokens per character times the characters per unit
    probes = [s.prompt(256) for s in samples]
    nxt = []
    for s, c, p in zip(samples, c0, probes):
        per_unit = max((len(p) - len(s.prompt(0))) / 256 * c / len(s.prompt(0)), 1e-3)
        nxt.append(max(1, int((budget - c) / per_unit)))
    active, step = [i for i in range(k) if clo[i] < budget], 0
    limit = 4 * budget + 16  # every unit adds at least a character: no fit needs more units
    while active:
        step += 1
        cs = count([samples[i].prompt(nxt[i]) for i in active])
        still = []
        for i, c in zip(active, cs):
            if c <= budget:
                lo[i], clo[i] = nxt[i], c
            else:
                hi[i], chi[i] = nxt[i], c
            slope = (clo[i] - c0[i]) / lo[i] if lo[i] else (c - c0[i]) / nxt[i]
            if (hi[i] is not None and hi[i] - lo[i] <= 1) or (lo[i] and budget - clo[i] < slope):
                continue  # one more unit would not fit (or on average cannot)
            if hi[i] is not None:  # inside the bracket: its own slope, bisection once that has had its chances
                slope = max(chi[i] - clo[i], 1) / (hi[i] - lo[i])
            # aimed half a unit under the budget, so that a step lands on the fitting side
            n = lo[i] + max(1, int((budget - clo[i] - slope / 2) / max(slope, 1e-3)))
            if hi[i] is not None and step > 8:
                n = (lo[i] + hi[i]) // 2
            nxt[i] = min(max(n, lo[i] + 1), hi[i] - 1 if hi[i] is not None else limit)
            if lo[i] >= limit or step > 200:
                raise RuntimeError(f"{task} at {max_length}: no haystack size fits (the token counts do not grow)")
            still.append(i)
        active = still
    return list(zip(lo, clo))


def _row(task: str, index: int, max_length: int, s: _Sample, n: int, tokens: int) -> dict:
    context = s.context(n)
    inp = s.head + context + s.tail

    def depth(text):
        return round(100 * context.index(text) / max(len(context), 1), 2)

    return {"index": index, "task": task, "max_length": max_length, "length": tokens,
            "depth": depth(s.primary) if s.primary else None,
            "needle_depths": sorted(depth(t) for _, t in s.needles),
            "outputs": s.outputs, "gen_prefix": s.gen_prefix, "input": inp}


# ----------------------------------------------------------------------------------------- files
_UTILS = '''"""Written by olmo_hybrid_jax.eval.long_context: the loader of the jsonl beside it and RULER's metric."""

import json
import re
from pathlib import Path

_CONTROL = re.compile(r"[\\x00-\\x1f]")


def load_dataset(data_file, **kwargs):
    """{"test": the rows of data_file}, a path relative to this folder (the folder can move)."""
    import datasets

    with open(Path(__file__).parent / data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {"test": datasets.Dataset.from_list(rows)}


def string_match(prediction, answers):
    """RULER's string_match_all: the fraction of answers found in the prediction, case-insensitive."""
    pred = _CONTROL.sub("\\n", prediction.strip()).strip().lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def process_results(doc, results):
    return {"string_match": string_match(results[0], doc["outputs"])}
'''

_TASK_YAML = """# {name}: {task} at {max_length} tokens, written by olmo_hybrid_jax.eval.long_context ({counting})
task: {name}
dataset_path: ""
dataset_name: null
custom_dataset: !function utils.load_dataset
dataset_kwargs:
  data_file: {task}.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{{{input}}}}"
doc_to_target: "{{{{outputs}}}}"
gen_prefix: "{{{{gen_prefix}}}}"
target_delimiter: " "
process_results: !function utils.process_results
metric_list:
  - metric: string_match
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
  until: []
metadata:
  version: {version}
"""

_GROUP_YAML = """# {group}: RULER-style tasks at {max_length} tokens, written by olmo_hybrid_jax.eval.long_context
group: {group}
task:
{tasks}
aggregate_metric_list:
  - metric: string_match
    aggregation: mean
    weight_by_size: false
metadata:
  version: {version}
"""


def task_name(task: str, max_length: int) -> str:
    return f"ruler_{task}_{max_length}"


def group_name(max_length: int) -> str:
    return f"ruler_{max_length}"


def parse_lengths(spec: str | Iterable) -> list[int]:
    """``"4k,8192,128k"`` (k = 1024) or ints -> sorted unique ints; LongContextError for anything else."""
    items = [x.strip() for x in spec.split(",") if x.strip()] if isinstance(spec, str) else list(spec)
    out = set()
    for x in items:
        m = re.fullmatch(r"(\d+)([kK]?)", str(x))
        if not m or int(m.group(1)) < 1:
            raise LongContextError(f"bad length {x!r}: a positive integer of tokens, or Nk (N * 1024)")
        out.add(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise LongContextError("no length given")
    return sorted(out)


def _check_tasks(tasks) -> list[str]:
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    tasks = [t for t in tasks if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise LongContextError(f"unknown task {bad[0]!r} (known: {', '.join(TASKS)})" if bad else "no task given")
    return list(dict.fromkeys(tasks))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tasks(out_dir, lengths=DEFAULT_LENGTHS, tasks=TASKS, samples_per_task: int = 100, seed: int = 0,
                tokenizer=None, haystack: str = "corpus", progress: Callable[[str], None] | None = None) -> dict:
    """Write the tasks at every length under ``out_dir`` (layout in the module docstring); return the manifest.

    ``tokenizer``: a tokenizer.json, a folder holding one (an HF checkpoint), a ``tokenizers.Tokenizer``,
    or None / "bytes" to count UTF-8 bytes. ``haystack``: "corpus" or "noise", for the needle tasks.
    ``progress`` gets one line per task written. Every task and length is checked (the prompt without
    haystack must fit) before any file is written.
    """
    tasks, lengths = _check_tasks(tasks), parse_lengths(lengths)
    if haystack not in HAYSTACKS:
        raise LongContextError(f"unknown haystack {haystack!r} (known: {', '.join(HAYSTACKS)})")
    if int(samples_per_task) < 1:
        raise LongContextError(f"samples per task must be >= 1, got {samples_per_task}")
    count = _Counter(tokenizer)
    short = {}  # common_words: RULER's small counts below 4096, or where 30 repeats of 10 words do not fit
    for L in lengths:  # the smallest prompt of each task at each length, before any file is written
        for t in tasks:
            budget = L - MAX_GEN_TOKS[t]
            if budget < 1:
                raise _too_small(t, L, 0)
            c, = count([_sample(t, L, 0, seed, haystack).prompt(0)])
            if t == "common_words":
                short[L] = L < 4096 or c > budget
                if short[L]:
                    c, = count([_sample(t, L, 0, seed, haystack, True).prompt(0)])
            if c > budget:
                raise _too_small(t, L, c)
    out = Path(out_dir)
    files: dict[str, dict] = {}
    for L in lengths:
        folder = out / group_name(L)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "utils.py").write_text(_UTILS)
        for t in tasks:
            samples = [_sample(t, L, i, seed, haystack, short.get(L, False)) for i in range(samples_per_task)]
            fits = _fit(samples, count, L - MAX_GEN_TOKS[t], t, L)
            data = folder / f"{t}.jsonl"
            with open(data, "w", encoding="utf-8", newline="\n") as f:
                for i, (s, (n, tokens)) in enumerate(zip(samples, fits)):
                    f.write(json.dumps(_row(t, i, L, s, n, tokens)) + "\n")
            (folder / f"{task_name(t, L)}.yaml").write_text(_TASK_YAML.format(
                name=task_name(t, L), task=t, max_length=L, max_gen_toks=MAX_GEN_TOKS[t], version=FORMAT_VERSION,
                counting="UTF-8 bytes" if count.tok is None else f"tokenizer.json sha256 {count.sha256[:12]}"))
            toks = [c for _, c in fits]
            files[f"{group_name(L)}/{t}.jsonl"] = {"rows": len(fits), "sha256": _sha256(data),
                                                  "min_length": min(toks), "max_length": max(toks),
                                                  "budget": L - MAX_GEN_TOKS[t]}
            if progress:
                progress(f"{task_name(t, L)}: {len(fits)} samples, prompts of {min(toks)}-{max(toks)} tokens "
                         f"(at most {L - MAX_GEN_TOKS[t]} + {MAX_GEN_TOKS[t]} generated)")
        (folder / f"{group_name(L)}.yaml").write_text(_GROUP_YAML.format(
            group=group_name(L), max_length=L, version=FORMAT_VERSION,
            tasks="\n".join(f"  - {task_name(t, L)}" for t in tasks)))
    manifest = {"generator": "olmo_hybrid_jax.eval.long_context", "format": FORMAT_VERSION, "seed": seed,
                "samples_per_task": samples_per_task, "tasks": tasks, "lengths": lengths, "haystack": haystack,
                "counting": {"kind": count.kind, "tokenizer_sha256": count.sha256},
                "max_gen_toks": {t: MAX_GEN_TOKS[t] for t in tasks},
                "groups": {group_name(L): [task_name(t, L) for t in tasks] for L in lengths}, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``long-context`` subcommand to an argparse subparsers object (its handler is ``main``)."""
    p = subparsers.add_parser("long-context", help="write RULER-style long-context tasks (jsonl + lm-eval YAMLs)",
                              description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (--include-path of `lm-eval`)")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="comma-separated total lengths in tokens, Nk = N*1024 (default 4k..128k)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    p.add_argument("--samples", type=int, default=100, help="samples per task and length (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or a checkpoint folder holding one; 'bytes' or none: count UTF-8 bytes")
    p.add_argument("--haystack", choices=HAYSTACKS, default="corpus", help="haystack of the needle tasks")
    p.add_argument("--quiet", action="store_true", help="no line per task written")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    """Run the ``long-context`` subcommand on parsed args; 0, or 2 after one ``error:`` line for bad input."""
    try:
        m = write_tasks(args.out, args.lengths, args.tasks, args.samples, args.seed, args.tokenizer, args.haystack,
                        progress=None if args.quiet else print)
    except LongContextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        groups = ",".join(m["groups"])
        print(f"wrote {sum(map(len, m['groups'].values()))} tasks to {args.out}; run them with\n"
              f"  python -m olmo_hybrid_jax.eval lm-eval --checkpoint CKPT --include-path {args.out} "
              f"--tasks {groups} --max-length {max(m['lengths'])}")
    return 0


if __name__ == "__main__":
    _ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.eval.long_context")
    add_parser(_ap.add_subparsers(dest="cmd", required=True))
    _args = _ap.parse_args()
    raise SystemExit(_args.func(_args))
