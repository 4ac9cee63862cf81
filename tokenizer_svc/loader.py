"""Load a tokenizer (a HuggingFace model directory, or the built-in demo) and what GetInfo reports.

Two `tokenizers` objects serve encoding: one that reads special-token text in user input as plain
text (the default; a user typing "<s>" gets the characters, not BOS) and one that parses it (for
parse_special_tokens and for rendered chat templates). `encode_special_tokens` is a property of the
object, so we keep two rather than toggle a shared one from several threads. The transformers
tokenizer is kept for chat templates, which we render with transformers' own machinery.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from kvmesh.demo import DEMO_MAX_MODEL_LEN, DEMO_MODEL_NAME
from tokenizer_svc.demo import DEMO_CHAT_TEMPLATE, build_demo_tokenizer
from tokenizer_svc.detokenizer import special_token_ids
from tokenizer_svc.token_bytes import TokenBytes

# tokenizer_config.json's model_max_length for "no limit" (transformers writes int(1e30)).
_NO_LIMIT = 10**9


@dataclass
class LoadedTokenizer:
    """A loaded tokenizer and its facts. Read-only after load, shared by all RPCs and threads."""

    name: str  # model name reported by GetInfo
    text_tokenizer: Tokenizer = field(repr=False)  # special-token text encodes as plain text
    special_tokenizer: Tokenizer = field(repr=False)  # special-token text becomes special ids
    hf: object = field(repr=False)  # transformers tokenizer, for chat templates
    vocab_size: int  # valid ids are [0, vocab_size)
    special_ids: frozenset[int]  # dropped by skip_special_tokens
    bos_token_id: int | None
    eos_token_ids: list[int]  # tokenizer, config.json and generation_config.json, deduplicated
    pad_token_id: int | None
    max_length: int  # 0 when unknown
    # Per-id bytes for streaming detokenization by lookup; None: the decoder needs the window method.
    token_bytes: TokenBytes | None = field(default=None, repr=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))


def load_tokenizer(model: str) -> LoadedTokenizer:
    """Load `model`: "demo", or a HuggingFace model directory (tokenizer.json or tokenizer.model,
    usually tokenizer_config.json, config.json, generation_config.json). Never downloads.

    Raises:
        FileNotFoundError / ValueError when the directory holds no usable tokenizer.
    """
    if model == "demo":
        return _load_demo()
    return _load_dir(pathlib.Path(model))


def _load_demo() -> LoadedTokenizer:
    from transformers import PreTrainedTokenizerFast

    tok = build_demo_tokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=build_demo_tokenizer(), bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", model_max_length=DEMO_MAX_MODEL_LEN,
                                 chat_template=DEMO_CHAT_TEMPLATE)
    return _assemble(DEMO_MODEL_NAME, tok, hf, config={}, generation_config={})


def _load_dir(path: pathlib.Path) -> LoadedTokenizer:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (give a HuggingFace model directory or 'demo')")
    # Offline by construction: a local directory, and the hub told never to reach out.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # Encode with the `tokenizers` object transformers built (from tokenizer.json, or converted
    # from a SentencePiece model), so Tokenize and ApplyChatTemplate agree with transformers.
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{path}: transformers loaded a slow tokenizer ({type(hf).__name__}); "
                         "kvmesh needs a fast one (tokenizer.json)")
    return _assemble(path.name, backend, hf, config=_read_json(path / "config.json"),
                     generation_config=_read_json(path / "generation_config.json"))


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _copy(tok: Tokenizer) -> Tokenizer:
    # Our own copy, never truncating or padding, whatever state transformers leaves in its object.
    copy = Tokenizer.from_str(tok.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _assemble(name: str, tok: Tokenizer, hf, *, config: dict, generation_config: dict) -> LoadedTokenizer:
    # The tokenizer.json's own post-processor and added tokens stay as they are; only the
    # special-token parsing differs between the two copies.
    text_tok, special_tok = _copy(tok), _copy(tok)
    text_tok.encode_special_tokens = True
    special_tok.encode_special_tokens = False
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = max(vocab.values()) + 1 if vocab else 0

    eos: list[int] = []
    for source in (_ids(hf.eos_token_id), _ids(config.get("eos_token_id")),
                   _ids(generation_config.get("eos_token_id"))):
        eos.extend(i for i in source if i not in eos)
    bos = hf.bos_token_id if hf.bos_token_id is not None else (config.get("bos_token_id"))
    pad = hf.pad_token_id if hf.pad_token_id is not None else (
        config.get("pad_token_id", generation_config.get("pad_token_id")))

    max_length = int(getattr(hf, "model_max_length", 0) or 0)
    if not 0 < max_length < _NO_LIMIT:
        max_length = int(config.get("max_position_embeddings") or 0)
    return LoadedTokenizer(
        name=name, text_tokenizer=text_tok, special_tokenizer=special_tok, hf=hf, vocab_size=vocab_size,
        special_ids=special_token_ids(tok), bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos, pad_token_id=None if pad is None else int(pad), max_length=max_length,
        token_bytes=TokenBytes.build(text_tok))
