"""Test helpers for the evaluation tests: a tiny random checkpoint with a byte-level BPE tokenizer.

The tokenizer is byte level (256 byte tokens) with a few merges (" t", "he", " the", " a"), so the
encoding of context + continuation is not the concatenation of the two encodings and lm-eval's
context/continuation split is exercised; ``<|endoftext|>`` (EOS) and ``<|pad|>`` are special tokens.
transformers' ``AutoTokenizer`` loads the folder (tokenizer.json + tokenizer_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

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
