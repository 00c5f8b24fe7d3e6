"""Chat data: conversations rendered with a checkpoint's chat template, tokenized, with an assistant-token mask,
packed into fixed rows (one segment per conversation) and written once as memory-mapped arrays for SFT.

Rendering matches transformers' ``apply_chat_template``: the same sandboxed jinja2 environment
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, a ``tojson`` that does not escape
HTML, ``strftime_now``, the ``{% generation %}`` tag), the tokenizer's special tokens (``bos_token``,
``eos_token``, ...) as variables, message keys whose value is None dropped. The text is tokenized without
added special tokens (the template writes them).

Assistant mask: a token is an assistant token when its character span overlaps a ``{% generation %}``
block (transformers' ``return_assistant_tokens_mask=True``). A template without generation blocks is
handled by prefixes: assistant turn i spans from the end of the rendering of messages[:i] with
``add_generation_prompt=True`` to the end of the rendering of messages[:i + 1] (its content and whatever
closes the turn, e.g. EOS, so the model learns to stop); the template must render those as prefixes of the
whole conversation, else the conversation is refused.

The byte-level tiny model (token = UTF-8 byte, EOS = 1, no tokenizer files) uses ``--tokenizer bytes``:
``ByteTokenizer`` and the built-in ``BYTE_TEMPLATE`` (Tulu style, ``<|user|>`` / ``<|assistant|>`` headers,
EOS = "\\x01" = byte 1 ending each assistant turn, inside its generation block).

Prepared data (``prepare``; a folder, written to a temporary name and renamed when complete)::

    tokens.npy          [rows, seq_len] uint16 / uint32: token ids, padding = the pad id
    assistant_mask.npy  [rows, seq_len] bool: the token is an assistant token (a loss target)
    segment_ids.npy     [rows, seq_len] int32: conversation number within the row (padding: one more)
    index.npy           [conversations, 4] int64: (input ordinal, row, start, length) of each conversation
    meta.json           format, seq_len, rows, counts, pad / eos ids, vocab size, max token id, template hash
    tokenizer/          tokenizer.json + tokenizer_config.json (with the chat template), for the export

Packing is best-fit decreasing: conversations longest first, each into the open row with the least room
that still fits it (a new row when none does). A conversation longer than a row is truncated to its first
``seq_len`` tokens (open-instruct's choice; a split would train on turns without their context); one whose
truncation keeps no assistant token is dropped. Both are counted in meta.json and reported.

CLI::

    python -m olmo_hybrid_jax.post.chat prepare --tokenizer DIR|tokenizer.json|bytes --input convs.jsonl \\
        --out data/sft --seq-len 4096 [--template FILE]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path

import numpy as np

FORMAT = "olmo_hybrid_jax.chat/1"
#: tokenizer_config.json fields exposed to the template (transformers' SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ROLES_HINT = "system, user, assistant"

#: The built-in template of the byte-level tiny model: Tulu-style headers, EOS (byte 1) closes each reply.
BYTE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ' (the template knows system, user, assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatError(ValueError):
    """A conversation, template or tokenizer cannot be used (the message names it, in one line)."""


# ------------------------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """Token = UTF-8 byte (vocab 256), the tiny preset's tokenizer; EOS = byte 1 ("\\x01" in a template)."""

    vocab_size = 256
    eos_id = 1
    pad_id = 1
    special_tokens = {"eos_token": "\x01", "pad_token": "\x01"}
    path = None

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n] int32, character offsets [n, 2]): each byte maps to the character it encodes."""
        data = text.encode("utf-8")
        ids = np.frombuffer(data, np.uint8).astype(np.int32)
        per_char = np.fromiter((len(c.encode("utf-8")) for c in text), np.int64, len(text))
        char = np.repeat(np.arange(len(text)), per_char)
        return ids, np.stack([char, char + 1], axis=1)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """An HF ``tokenizers`` tokenizer.json with the special tokens of its tokenizer_config.json."""

    def __init__(self, tokenizer_json: Path, config: dict | None = None):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception type)
            raise ChatError(f"cannot load tokenizer {tokenizer_json}: {e}") from e
        self.path = Path(tokenizer_json)
        self.config = dict(config or {})
        self.special_tokens = {}
        for name in SPECIAL_TOKENS:
            v = self.config.get(name)
            v = v.get("content") if isinstance(v, dict) else v  # older configs store AddedToken dicts
            if isinstance(v, str):
                self.special_tokens[name] = v
        self.vocab_size = self.tok.get_vocab_size()
        eos = self.special_tokens.get("eos_token")
        self.eos_id = self.tok.token_to_id(eos) if eos else None
        pad = self.special_tokens.get("pad_token")
        pad_id = self.tok.token_to_id(pad) if pad else None
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n] int32, character offsets [n, 2]), no added special tokens (the template writes them)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _tokenizer_files(path_or_dir: str | Path) -> tuple[Path | None, Path | None]:
    """(tokenizer.json, tokenizer_config.json) of a folder or of a tokenizer.json path (either may be None)."""
    p = Path(path_or_dir).expanduser()
    d = p if p.is_dir() else p.parent
    tj = p if p.is_file() and p.name != "tokenizer_config.json" and p.suffix == ".json" else d / "tokenizer.json"
    tc = d / "tokenizer_config.json"
    return (tj if tj.is_file() else None), (tc if tc.is_file() else None)


def load_tokenizer(path_or_dir: str | Path):
    """``bytes`` -> ``ByteTokenizer``; a folder or a tokenizer.json -> ``HFTokenizer`` (special tokens from the
    sibling tokenizer_config.json when there is one)."""
    if str(path_or_dir) == "bytes":
        return ByteTokenizer()
    p = Path(path_or_dir).expanduser()
    if not p.exists():
        raise ChatError(f"tokenizer not found: {p} (a folder with tokenizer.json, a tokenizer.json, or 'bytes')")
    tj, tc = _tokenizer_files(p)
    if tj is None:
        raise ChatError(f"no tokenizer.json at {p}")
    try:
        config = json.loads(tc.read_text()) if tc is not None else {}
    except (OSError, ValueError) as e:
        raise ChatError(f"cannot read {tc}: {e}") from e
    return HFTokenizer(tj, config)


def _as_tokenizer(tokenizer):
    if tokenizer is None or isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):  # a bare tokenizers.Tokenizer: no special-token names known
        t = HFTokenizer.__new__(HFTokenizer)
        t.tok, t.path, t.config, t.special_tokens = tokenizer, None, {}, {}
        t.vocab_size, t.eos_id, t.pad_id = tokenizer.get_vocab_size(), None, 0
        return t
    raise TypeError(f"tokenizer: expected a load_tokenizer() result, a tokenizers.Tokenizer or a path, "
                    f"got {type(tokenizer).__name__}")


# ------------------------------------------------------------------------------------------- templates
def load_chat_template(path_or_dir: str | Path) -> str:
    """The chat template of a checkpoint or tokenizer: ``bytes`` -> ``BYTE_TEMPLATE``; a ``.jinja`` file -> its
    text; a folder -> its chat_template.jinja, else tokenizer_config.json's ``chat_template``; a
    tokenizer.json / tokenizer_config.json path -> that of its folder. A list of named templates gives
    ``default``."""
    if str(path_or_dir) == "bytes":
        return BYTE_TEMPLATE
    p = Path(path_or_dir).expanduser()
    if p.is_file() and p.suffix == ".jinja":
        return p.read_text(encoding="utf-8")
    d = p if p.is_dir() else p.parent
    if not d.is_dir():
        raise ChatError(f"chat template not found: {p} does not exist")
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    tc = d / "tokenizer_config.json"
    if not tc.is_file():
        raise ChatError(f"no chat template in {d} (neither chat_template.jinja nor tokenizer_config.json)")
    try:
        t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError) as e:
        raise ChatError(f"cannot read {tc}: {e}") from e
    if isinstance(t, list):  # [{"name": ..., "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    if not isinstance(t, str) or not t:
        raise ChatError(f"{tc} has no chat_template (pass --template FILE.jinja)")
    return t


def has_generation_blocks(template: str) -> bool:
    return bool(_GENERATION_RE.search(template))


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """transformers' environment (chat_template_utils._cached_compile_jinja_template), compiled once."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span of its output while a
        tracker is active (``render_with_spans``)."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self._tracking = ContextVar("generation_tracker", default=None)
            environment.extend(activate_tracker=self.activate)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_support"), [], [], body).set_lineno(lineno)

        def _support(self, caller):
            rv = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(rv)))
            return rv

        @contextmanager
        def activate(self, blocks, spans):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatError(f"chat template does not compile: {e} (line {e.lineno})") from e


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("a conversation must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatError(f"message {i} is not an object with a string 'role'")
        out.append({k: v for k, v in m.items() if v is not None})  # as transformers: None keys dropped
    return out


def _template_vars(tokenizer, vars: dict) -> dict:
    tok = _as_tokenizer(tokenizer)
    return {**(tok.special_tokens if tok is not None else {}), **vars}  # explicit vars win, as in transformers


def render_with_spans(messages: Sequence[dict], template: str, *, tokenizer=None, add_generation_prompt: bool = False,
                      **vars) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of the ``{% generation %}`` blocks in it); ``render``'s arguments."""
    import jinja2

    compiled = _compile(template)
    msgs = _check_messages(messages)
    kw = _template_vars(tokenizer, vars)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    try:
        with compiled.environment.activate_tracker(blocks, spans):
            for b in compiled.generate(messages=msgs, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **kw):
                blocks.append(b)
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"the chat template refused the conversation: {e}") from e
    return "".join(blocks), spans


def render(messages: Sequence[dict], template: str, *, tokenizer=None, add_generation_prompt: bool = False,
           **vars) -> str:
    """The conversation as text, as transformers' ``apply_chat_template(..., tokenize=False)`` renders it.

    ``tokenizer`` (a ``load_tokenizer`` result, a tokenizer path, or None) supplies ``bos_token`` /
    ``eos_token`` / ...; ``vars`` are further template variables (they override the special tokens).
    """
    return render_with_spans(messages, template, tokenizer=tokenizer, add_generation_prompt=add_generation_prompt,
                             **vars)[0]


def _prefix_spans(messages, template, tokenizer, vars, full: str) -> list[tuple[int, int]]:
    """Assistant spans of a template without generation blocks, from the renderings of prefixes."""
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render(messages[:i], template, tokenizer=tokenizer, add_generation_prompt=True, **vars) if i else ""
        upto = render(messages[:i + 1], template, tokenizer=tokenizer, **vars)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ChatError(f"the chat template has no {{% generation %}} blocks and does not render message {i}'s "
                            "prefix as a prefix of the conversation; cannot locate the assistant turn")
        spans.append((len(before), len(upto)))
    return spans


def _spans_to_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens whose character span overlaps a span (transformers' rule: start < span end and end > span start)."""
    mask = np.zeros(len(offsets), np.bool_)
    for s, e in spans:
        mask |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
    return mask


def tokenize_conversation(messages: Sequence[dict], template: str, tokenizer, *, add_generation_prompt: bool = False,
                          **vars) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int32, assistant_mask [n] bool) of the rendered conversation.

    The mask marks the tokens of the template's ``{% generation %}`` blocks (transformers'
    ``return_assistant_tokens_mask=True``), or, for a template without them, the assistant turns located by
    rendering prefixes (see the module doc). ``tokenizer``: a ``load_tokenizer`` result, a path, or a
    ``tokenizers.Tokenizer``.
    """
    tok = _as_tokenizer(tokenizer)
    msgs = _check_messages(messages)
    text, spans = render_with_spans(msgs, template, tokenizer=tok, add_generation_prompt=add_generation_prompt,
                                    **vars)
    if not has_generation_blocks(template):
        spans = _prefix_spans(msgs, template, tok, vars, text)
    ids, offsets = tok.encode(text)
    return ids, _spans_to_mask(offsets, spans)


# ------------------------------------------------------------------------------------------- packing
def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows (lists of item indices, longest first) packing items of ``lengths`` (each <= ``capacity``):
    longest first, each into the open row with the least room that still fits it, else a new row.

    The open rows are found by their remaining room with a segment tree over 0..capacity (O(log capacity)
    per item), so a million conversations pack in seconds.
    """
    n = 1
    while n < capacity + 1:
        n *= 2
    tree = [0] * (2 * n)  # tree[n + c]: open rows with c free slots; inner nodes: sums
    buckets: dict[int, list[int]] = {}
    rows: list[list[int]] = []

    def add(c, delta):
        k = n + c
        while k:
            tree[k] += delta
            k //= 2

    def first_at_least(c):  # the smallest room >= c held by an open row, or None
        k = n + c
        if tree[k]:
            return c
        while k > 1:
            if k % 2 == 0 and tree[k + 1]:
                k += 1
                break
            k //= 2
        else:
            return None
        while k < n:
            k = 2 * k if tree[2 * k] else 2 * k + 1
        return k - n

    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        ln = int(lengths[i])
        if not 0 < ln <= capacity:
            raise ValueError(f"item {i} has length {ln}, outside 1..{capacity}")
        room = first_at_least(ln)
        if room is None:
            r = len(rows)
            rows.append([i])
        else:
            r = buckets[room].pop()
            add(room, -1)
            rows[r].append(i)
        left = (capacity if room is None else room) - ln
        if left > 0:
            buckets.setdefault(left, []).append(r)
            add(left, 1)
    return rows


# ------------------------------------------------------------------------------------------- prepare
def read_conversations(path: str | Path) -> Iterator[tuple[int, list[dict]]]:
    """(line number, messages) of each non-blank line of a JSONL file of ``{"messages": [...]}`` objects."""
    p = Path(path)
    if not p.is_file():
        raise ChatError(f"input file not found: {p}")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatError(f"{p}:{n}: not valid JSON: {e}") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                raise ChatError(f"{p}:{n}: expected an object with a 'messages' list")
            yield n, obj["messages"]


def _tokenizer_dir_files(tok, template: str) -> dict[str, bytes]:
    """The tokenizer files the prepared folder (and an export) carries: tokenizer.json as is, and
    tokenizer_config.json with ``chat_template`` set to the template the data was rendered with."""
    files = {}
    config = dict(getattr(tok, "config", None) or {})
    if isinstance(tok, ByteTokenizer):
        config.update(tok.special_tokens)
    elif tok.path is not None:
        files["tokenizer.json"] = tok.path.read_bytes()
        stm = tok.path.parent / "special_tokens_map.json"
        if stm.is_file():
            files["special_tokens_map.json"] = stm.read_bytes()
    config["chat_template"] = template
    files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def prepare(conversations: Iterable[tuple[int, list[dict]]], template: str, tokenizer, out: str | Path, seq_len: int,
            *, source: str = "input", skip_bad: bool = False, overwrite: bool = False,
            progress: bool = False) -> dict:
    """Tokenize, mask, pack and write ``conversations`` ((line, messages) pairs; a str line is a whole location)
    to the folder ``out`` (module doc); returns meta.json's contents. A bad conversation raises ChatError naming
    ``source``:line, or is skipped and counted with ``skip_bad``. index.npy's ordinal counts every input
    conversation (skipped and dropped ones too). ``out`` must be new, or a prepared folder with ``overwrite``."""
    from tqdm.auto import tqdm

    tok = _as_tokenizer(tokenizer)
    out = Path(out)
    if seq_len < 2:
        raise ChatError(f"--seq-len must be >= 2, got {seq_len}")
    if out.exists():
        if not (out / "meta.json").is_file():
            raise ChatError(f"{out} exists and is not a prepared chat folder; choose a new --out")
        if not overwrite:
            raise ChatError(f"{out} already holds prepared chat data; pass --overwrite to replace it")
    _compile(template)  # a template that does not compile fails before any work
    ids_all, mask_all, lines = [], [], []
    truncated = dropped = skipped = 0
    for k, (line, messages) in enumerate(tqdm(conversations, unit="conv", disable=not progress, desc="tokenize")):
        try:
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
                raise ChatError("no assistant turn")
            ids, mask = tokenize_conversation(messages, template, tok)
        except ChatError as e:
            if skip_bad:
                skipped += 1
                continue
            raise ChatError(f"{line if isinstance(line, str) else f'{source}:{line}'}: {e}") from e
        if len(ids) > seq_len:
            truncated += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        if not mask[1:].any():  # the first token is never a target
            dropped += 1
            continue
        ids_all.append(ids)
        mask_all.append(mask)
        lines.append(k)
    if not ids_all:
        raise ChatError(f"{source}: no conversation with an assistant token to train on")
    lengths = [len(a) for a in ids_all]
    rows = best_fit_decreasing(lengths, seq_len)
    max_id = max(int(a.max()) for a in ids_all)
    dt = np.uint16 if max(tok.vocab_size, tok.pad_id + 1) <= 2 ** 16 else np.uint32
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        shape = (len(rows), seq_len)
        fmt = np.lib.format
        tokens = fmt.open_memmap(tmp / "tokens.npy", "w+", dt, shape)
        amask = fmt.open_memmap(tmp / "assistant_mask.npy", "w+", np.bool_, shape)
        seg = fmt.open_memmap(tmp / "segment_ids.npy", "w+", np.int32, shape)
        index = np.zeros((len(ids_all), 4), np.int64)
        for r, items in enumerate(tqdm(rows, unit="row", disable=not progress, desc="pack")):
            pos = 0
            for s, i in enumerate(items):
                n = lengths[i]
                tokens[r, pos:pos + n] = ids_all[i]
                amask[r, pos:pos + n] = mask_all[i]
                seg[r, pos:pos + n] = s
                index[i] = (lines[i], r, pos, n)
                pos += n
            tokens[r, pos:] = tok.pad_id
            seg[r, pos:] = len(items)  # padding: a segment of its own, never a target
        for a in (tokens, amask, seg):
            a.flush()
        del tokens, amask, seg
        np.save(tmp / "index.npy", index)
        meta = {"format": FORMAT, "seq_len": int(seq_len), "rows": len(rows), "conversations": len(ids_all),
                "tokens": int(sum(lengths)), "assistant_tokens": int(sum(int(m.sum()) for m in mask_all)),
                "truncated": truncated, "dropped": dropped, "skipped": skipped,
                "pad_id": int(tok.pad_id), "eos_id": None if tok.eos_id is None else int(tok.eos_id),
                "vocab_size": int(tok.vocab_size), "max_token_id": max_id,
                "tokenizer": "bytes" if isinstance(tok, ByteTokenizer) else str(tok.path),
                "generation_blocks": has_generation_blocks(template),
                "template_sha256": hashlib.sha256(template.encode()).hexdigest(), "source": source}
        (tmp / "tokenizer").mkdir()
        for name, data in _tokenizer_dir_files(tok, template).items():
            (tmp / "tokenizer" / name).write_bytes(data)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # a prepared folder (checked above), replaced with --overwrite
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.post.chat", description="chat data for SFT")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="JSONL conversations -> packed token / assistant-mask rows")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (+ tokenizer_config.json), "
                                                      "a tokenizer.json, or 'bytes' (the byte-level tiny model)")
    p.add_argument("--input", required=True, nargs="+", help="JSONL file(s), one {\"messages\": [...]} per line")
    p.add_argument("--out", required=True, help="output folder (new, or a prepared one with --overwrite)")
    p.add_argument("--seq-len", type=int, required=True, help="row length (= data.seq_len of the SFT run)")
    p.add_argument("--template", default=None, help="chat template (.jinja, or a folder / tokenizer_config.json); "
                                                    "default: the tokenizer's")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad conversations instead of failing")
    p.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer)
        template = load_chat_template(args.template or args.tokenizer)

        def convs():
            for path in args.input:
                for n, messages in read_conversations(path):
                    yield (f"{path}:{n}" if len(args.input) > 1 else n), messages

        src = args.input[0] if len(args.input) == 1 else "input"
        meta = prepare(convs(), template, tok, args.out, args.seq_len, source=src, skip_bad=args.skip_bad,
                       overwrite=args.overwrite, progress=True)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fill = meta["tokens"] / (meta["rows"] * meta["seq_len"])
    print(f"wrote {args.out}: {meta['conversations']:,} conversations in {meta['rows']:,} rows x {meta['seq_len']} "
          f"({fill:.1%} full), {meta['assistant_tokens']:,} assistant tokens; {meta['truncated']} truncated, "
          f"{meta['dropped']} dropped (no assistant token left), {meta['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
