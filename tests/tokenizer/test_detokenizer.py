"""The incremental detokenizer against one-shot `tokenizers` decodes of the same ids (the oracle).

Driven directly (no gRPC): 500 generated strings, one id at a time, must give exactly the one-shot
decode; the same with a prompt, with special ids mixed in, and with skip_special_tokens off.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tok_support import texts
from tokenizer_svc.detokenizer import MAX_HELD_TOKENS, MAX_WINDOW_TOKENS, IncrementalDetokenizer

_SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def stream(tok, ids, prompt=(), skip=True) -> list[str]:
    detok = IncrementalDetokenizer(tok.text_tokenizer, prompt, skip_special_tokens=skip,
                                   special_ids=tok.special_ids)
    return [detok.step(i) for i in ids] + [detok.flush()]


def encode(tok, text, special=True) -> list[int]:
    return tok.text_tokenizer.encode(text, add_special_tokens=special).ids


def decode(tok, ids, skip=True) -> str:
    return tok.text_tokenizer.decode(ids, skip_special_tokens=skip)


@_SETTINGS
@given(text=texts)
def test_one_id_at_a_time_equals_whole_decode(stories_tok, text):
    ids = encode(stories_tok, text)
    deltas = stream(stories_tok, ids)
    assert "".join(deltas) == decode(stories_tok, ids) == text
    # Never half a character: no delta holds a replacement character the text does not have.
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, cut=st.integers(min_value=0), skip=st.booleans())
def test_with_prompt_gives_the_text_after_the_prompt(stories_tok, text, cut, skip):
    ids = encode(stories_tok, text)
    cut = cut % (len(ids) + 1)
    prompt, generated = ids[:cut], ids[cut:]
    full, head = decode(stories_tok, ids, skip), decode(stories_tok, prompt, skip)
    if not full.startswith(head):  # the prompt ends inside a character: no well-defined answer
        return
    assert "".join(stream(stories_tok, generated, prompt, skip)) == full[len(head):]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(texts, st.sampled_from([0, 1, 2])), min_size=1, max_size=4), skip=st.booleans())
def test_special_ids_between_texts(stories_tok, parts, skip):
    # EOS/BOS/unk between pieces: skipped ones must not eat the next piece's leading space.
    ids = []
    for text, special in parts:
        ids += encode(stories_tok, text, special=False) + [special]
    assert "".join(stream(stories_tok, ids, skip=skip)) == decode(stories_tok, ids, skip)


def test_emoji_split_across_byte_tokens_is_held_then_whole(stories_tok):
    ids = encode(stories_tok, "a😀", special=False)
    byte_ids = [i for i in ids if stories_tok.text_tokenizer.id_to_token(i).startswith("<0x")]
    assert len(byte_ids) == 4  # the emoji is four byte-fallback tokens
    deltas = stream(stories_tok, ids)
    assert deltas[-5:] == ["", "", "", "😀", ""]


def test_leading_space_of_first_generated_token(stories_tok):
    prompt = encode(stories_tok, "Once upon")
    generated = encode(stories_tok, "Once upon a time", special=False)[len(prompt) - 1:]
    assert "".join(stream(stories_tok, generated, prompt)) == " a time"
    assert "".join(stream(stories_tok, generated)) == "a time"  # no prompt: as Detokenize would
    # A prompt ending in more special ids than the initial window holds.
    assert "".join(stream(stories_tok, generated, prompt + [2] * 8)) == " a time"


def test_long_sequence_trims_the_window(stories_tok):
    from tok_support import PIECES
    text = "".join(PIECES) * 20
    ids = encode(stories_tok, text)
    assert len(ids) > 20 * MAX_WINDOW_TOKENS  # the window is trimmed many times
    detok = IncrementalDetokenizer(stories_tok.text_tokenizer, special_ids=stories_tok.special_ids)
    out = []
    for i in ids:
        out.append(detok.step(i))
        assert len(detok._ids) <= MAX_WINDOW_TOKENS + 4  # O(1) work per token: the window stays short
    assert "".join(out) + detok.flush() == text


def test_invalid_bytes_do_not_stall_the_stream(stories_tok):
    # 40 lone continuation bytes never form a character: after MAX_HELD_TOKENS they are emitted as
    # U+FFFD instead of being re-decoded forever.
    cont = stories_tok.text_tokenizer.token_to_id("<0x80>")
    deltas = stream(stories_tok, [cont] * 40)
    assert any(deltas[:MAX_HELD_TOKENS + 1])
    assert set("".join(deltas)) == {"\ufffd"}


def _train(kind: str):
    """A small tokenizer of another family, trained here in a fraction of a second (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tok_support import PIECES
    corpus = [" ".join(PIECES)] * 3 + ["Once upon a time there was a little dog. It liked to run and play."] * 20
    if kind == "byte_level":  # GPT-2 / Llama 3 style: bytes mapped to printable characters
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>"])
    else:  # SentencePiece style without byte fallback: unknown characters become <unk>
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def other_tokenizer(request):
    return _train(request.param)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, skip=st.booleans(), special=st.booleans())
def test_other_tokenizer_families(other_tokenizer, text, skip, special):
    ids = other_tokenizer.encode(text).ids
    if special:  # a special id in the middle, as a model might emit
        ids = ids[:len(ids) // 2] + [0] + ids[len(ids) // 2:]
    detok = IncrementalDetokenizer(other_tokenizer, skip_special_tokens=skip)
    deltas = [detok.step(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == other_tokenizer.decode(ids, skip_special_tokens=skip)


class _CountingDecodes:
    """A tokenizer whose decode calls are counted (the rest passes through)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.num_decodes = 0

    def decode(self, ids, **kwargs):
        self.num_decodes += 1
        return self._tokenizer.decode(ids, **kwargs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1), skip=st.booleans())
def test_batches_decode_once_each_and_equal_whole_decode(stories_tok, text, sizes, skip):
    ids = encode(stories_tok, text) + [2]
    counting = _CountingDecodes(stories_tok.text_tokenizer)
    detok = IncrementalDetokenizer(counting, skip_special_tokens=skip, special_ids=stories_tok.special_ids)
    deltas, i, k = [], 0, 0
    while i < len(ids):
        batch = ids[i:i + sizes[k % len(sizes)]]
        before = counting.num_decodes
        deltas.append(detok.extend(batch))
        # One decode per batch, one more to trim a long window; id by id only when the batch's text
        # ends inside a character.
        stepped = counting.num_decodes - before > 2
        assert not stepped or stories_tok.text_tokenizer.decode(ids[:i + len(batch)], skip_special_tokens=skip
                                                                 ).endswith("\ufffd")
        i, k = i + len(batch), k + 1
    assert "".join(deltas) + detok.flush() == decode(stories_tok, ids, skip)
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, size=st.integers(min_value=2, max_value=6))
def test_batches_in_other_tokenizer_families(other_tokenizer, text, size):
    ids = other_tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(other_tokenizer)
    deltas = [detok.extend(ids[i:i + size]) for i in range(0, len(ids), size)] + [detok.flush()]
    assert "".join(deltas) == other_tokenizer.decode(ids, skip_special_tokens=True)
