"""The table-lookup detokenizer (tokenizer_svc.token_bytes) against one-shot `tokenizers` decodes
of the same ids, as the window detokenizer is checked in test_detokenizer.py: stories260k
(SentencePiece with byte fallback), a byte-level BPE and a Metaspace tokenizer; and no table for a
decoder that is not a plain concatenation of bytes (WordPiece)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_detokenizer import _train
from tok_support import PIECES, texts
from tokenizer_svc.detokenizer import special_token_ids
from tokenizer_svc.token_bytes import ByteDetokenizer, TokenBytes

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def stream(table, tok, ids, prompt=(), skip=True) -> list[str]:
    detok = ByteDetokenizer(table, prompt, skip_special_tokens=skip, special_ids=special_token_ids(tok))
    return [detok.step(i) for i in ids] + [detok.flush()]


@pytest.fixture(scope="module")
def stories(stories_tok):
    table = TokenBytes.build(stories_tok.text_tokenizer)
    assert table is not None and stories_tok.token_bytes is not None  # the loader builds it too
    return table, stories_tok.text_tokenizer


@_SETTINGS
@given(text=texts, cut=st.integers(min_value=0), skip=st.booleans())
def test_stories_matches_one_shot_decode(stories, text, cut, skip):
    table, tok = stories
    ids = tok.encode(text).ids  # BOS first: a special id at the start
    deltas = stream(table, tok, ids, skip=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)  # never half a character
    cut = cut % (len(ids) + 1)
    full, head = tok.decode(ids, skip_special_tokens=skip), tok.decode(ids[:cut], skip_special_tokens=skip)
    if full.startswith(head):  # else the prompt ends inside a character: no well-defined answer
        assert "".join(stream(table, tok, ids[cut:], ids[:cut], skip)) == full[len(head):]


def test_stories_held_bytes_and_leading_space(stories):
    table, tok = stories
    ids = tok.encode("a😀", add_special_tokens=False).ids
    assert stream(table, tok, ids)[-5:] == ["", "", "", "😀", ""]  # four byte tokens: held, then whole
    prompt = tok.encode("Once upon").ids
    generated = tok.encode("Once upon a time", add_special_tokens=False).ids[len(prompt) - 1:]
    assert "".join(stream(table, tok, generated, prompt)) == " a time"
    assert "".join(stream(table, tok, generated)) == "a time"  # no prompt: the first space goes
    assert "".join(stream(table, tok, generated, prompt + [2] * 8)) == " a time"
    cont = tok.token_to_id("<0x80>")  # lone continuation bytes never stall the stream
    deltas = stream(table, tok, [cont] * 40)
    assert all(deltas[:40]) and set("".join(deltas)) == {"\ufffd"}


def test_batches_equal_single_steps(stories):
    table, tok = stories
    ids = tok.encode("".join(PIECES) * 3).ids
    one = ByteDetokenizer(table, special_ids=special_token_ids(tok))
    many = ByteDetokenizer(table, special_ids=special_token_ids(tok))
    singles = "".join(one.step(i) for i in ids) + one.flush()
    batched = "".join(many.extend(ids[k:k + 5]) for k in range(0, len(ids), 5)) + many.flush()
    assert singles == batched == tok.decode(ids)


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def other(request):
    tok = _train(request.param)
    table = TokenBytes.build(tok)
    assert table is not None, request.param
    return table, tok


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, skip=st.booleans(), special=st.booleans())
def test_other_tokenizer_families(other, text, skip, special):
    table, tok = other
    ids = tok.encode(text).ids
    if special:  # a special id in the middle, as a model might emit
        ids = ids[:len(ids) // 2] + [0] + ids[len(ids) // 2:]
    assert "".join(stream(table, tok, ids, skip=skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_no_table_for_a_decoder_that_is_not_concatenation():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(["Once upon a time there was a dog"] * 5,
                            trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    assert TokenBytes.build(tok) is None
