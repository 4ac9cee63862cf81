"""Stop strings: the StopMatcher alone, and the StreamDetokenizer against an oracle that decodes
every prefix of the ids in one shot and looks for the stop strings there."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tok_support import texts
from tokenizer_svc.stops import StopMatcher
from tokenizer_svc.stream import StreamDetokenizer


def push_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], str | None]:
    out = []
    for piece in pieces:
        pushed = matcher.push(piece)
        out.append(pushed.text)
        if pushed.stop is not None:
            return out, pushed.stop
    out.append(matcher.flush())
    return out, None


def test_match_spanning_pieces_is_held_then_cut():
    out, stop = push_all(StopMatcher(["STOP"]), ["go S", "T", "O", "P and more"])
    assert out == ["go ", "", "", ""] and stop == "STOP"


def test_include_stop_string():
    out, stop = push_all(StopMatcher(["STOP"], include_stop=True), ["go S", "TOP and more"])
    assert "".join(out) == "go STOP" and stop == "STOP"


def test_stop_at_the_very_start():
    assert push_all(StopMatcher(["Once"]), ["Once", " upon"]) == ([""], "Once")


def test_overlapping_candidates_first_to_complete_wins():
    # "abcd" starts first but "bc" completes first.
    out, stop = push_all(StopMatcher(["abcd", "bc"]), ["a", "b", "c", "d"])
    assert (("".join(out)), stop) == ("a", "bc")
    # Both complete on the same character: the earlier start (the longer one) wins, so that no
    # character of either is shown.
    out, stop = push_all(StopMatcher(["c", "abc"]), ["ab", "c"])
    assert ("".join(out), stop) == ("", "abc")


def test_self_overlapping_stop():
    # "aab" inside "aaab": the held "aa" must slide, not be dropped.
    out, stop = push_all(StopMatcher(["aab"]), ["a", "a", "a", "b"])
    assert ("".join(out), stop) == ("a", "aab")


def test_false_start_is_released():
    out, stop = push_all(StopMatcher(["STOP"]), ["ST", "OR", "Y"])
    assert stop is None and out == ["", "STOR", "Y", ""]


def _oracle(tok, ids, stops, include):
    """First stop match by decoding every prefix of ids in one shot: (text, stop, token_index)."""
    for i in range(len(ids)):
        text = tok.text_tokenizer.decode(ids[:i + 1])
        found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if found:
            end, start, stop = min(found)
            return text[:end] if include else text[:start], stop, i
    return tok.text_tokenizer.decode(ids), None, None


_stops = st.lists(st.sampled_from(["Once", " a", "the", "😀", "é", "STOP", "\n", "  ", "e\u0301", ".", "dog"])
                  | st.text(min_size=1, max_size=3).filter(lambda s: "\ufffd" not in s), min_size=1, max_size=4)


@pytest.mark.parametrize("method", ["window", "bytes"])  # re-decoded window / table lookup
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, stops=_stops, include=st.booleans(), batch=st.integers(1, 4))
def test_session_matches_the_oracle(stories_tok, method, text, stops, include, batch):
    ids = stories_tok.text_tokenizer.encode(text, add_special_tokens=False).ids
    table = stories_tok.token_bytes if method == "bytes" else None
    session = StreamDetokenizer(stories_tok.text_tokenizer, [1], stops=stops, include_stop=include,
                                special_ids=stories_tok.special_ids, token_bytes=table)
    shown, match = [], None
    for k in range(0, len(ids), batch):
        step = session.feed(ids[k:k + batch])
        shown.append(step.text)
        assert step.num_tokens == min(k + batch, len(ids))
        if step.stop is not None:
            match = (step.stop, step.stop_token_index)
            assert step.done
            break
    else:
        last = session.finish()
        shown.append(last.text)
        if last.stop is not None:
            match = (last.stop, last.stop_token_index)
    expected_text, expected_stop, expected_index = _oracle(stories_tok, ids, stops, include)
    assert "".join(shown) == expected_text
    assert match == ((expected_stop, expected_index) if expected_stop is not None else None)
