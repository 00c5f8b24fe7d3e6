"""Test helpers for the evaluation tests: a tiny random checkpoint with a byte-level BPE tokenizer.

The tokenizer is byte level (256 byte tokens) with a few merges (" t", "he", " the", " a"), so the
encoding of context + continuation is not the concatenation of the two encodings and lm-eval's
context/continuation split is exercised; ``<|endoftext|>`` (EOS) and ``<|pad|>`` are special tokens.
transformers' ``AutoTokenizer`` loads the folder (tokenizer.json + tokenizer_config.json).
``mc_task_dir`` holds a local lm-eval multiple-choice task ``tiny_mc`` (8 questions, acc and acc_norm),
one folder per process: lm-eval's TaskManager indexes its thousands of YAMLs for each include path
(~10 s on 2 cores), and the CLI keeps one per path, so every test that shares the folder shares the index.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from hf_utils import release_checkpoint

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a")]
EOS, PAD = 260, 261  # after the 256 bytes and 4 merges
VOCAB = 264


def write_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    assert tok.token_to_id("<|endoftext|>") == EOS and tok.token_to_id("<|pad|>") == PAD
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "bos_token": None, "model_max_length": 4096, "clean_up_tokenization_spaces": False}))
    return path


def eval_checkpoint(path: Path, seed: int = 3):
    """(transformers model, folder with the HF checkpoint and the tokenizer)."""
    hf, path = release_checkpoint(path, seed=seed, vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD,
                                  max_position_embeddings=4096)
    write_tokenizer(path)
    return hf, path


@functools.cache
def mc_task_dir() -> Path:
    """The folder with the lm-eval task ``tiny_mc`` (tiny_mc.yaml + data.jsonl): pass it as ``--include-path``."""
    d = Path(tempfile.mkdtemp(prefix="tiny_mc_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sea", "road", "mat", "sun", "tree", "bird"]
    with open(d / "data.jsonl", "w") as f:
        for i in range(8):
            ch = list(rng.choice(words, 3, replace=False))
            f.write(json.dumps({"question": f"Q{i}: the {words[i]} is near the", "choices": [f" {c}" for c in ch],
                                "answer": int(i % 3)}) + "\n")
    (d / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'data.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return d
