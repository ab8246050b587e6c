"""Stable partials: local agreement, monotonic growth, and the promise kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sttd.session import PartialStabilizer


def test_words_become_stable_when_three_decodes_agree() -> None:
    stabilizer = PartialStabilizer()
    assert stabilizer.update("go for") == ("", "go for")
    assert stabilizer.update("go forward ten") == ("", "go forward ten")
    # "go" agreed three times; "for" became "forward".
    assert stabilizer.update("go forward ten meters") == ("go", "forward ten meters")
    assert stabilizer.update("go forward ten meters") == ("go forward ten", "meters")
    assert stabilizer.stable_text == "go forward ten"


def test_two_agreeing_decodes_suffice_when_asked() -> None:
    stabilizer = PartialStabilizer(agreement=2)
    stabilizer.update("go for")
    assert stabilizer.update("go forward ten") == ("go", "forward ten")


def test_the_last_word_is_never_stable_even_when_repeated() -> None:
    stabilizer = PartialStabilizer()
    stabilizer.update("ten of clubs")
    stabilizer.update("ten of clubs")
    assert stabilizer.update("ten of clubs") == ("ten of", "clubs")


def test_agreement_ignores_case_and_punctuation() -> None:
    stabilizer = PartialStabilizer()
    stabilizer.update("Go forward, ten")
    stabilizer.update("GO FORWARD TEN!")
    assert stabilizer.update("go forward ten meters.") == ("go forward ten", "meters.")


def test_stable_words_are_kept_when_a_decode_disagrees() -> None:
    stabilizer = PartialStabilizer(agreement=2)
    stabilizer.update("he was not an")
    stabilizer.update("he was not an ill")
    assert stabilizer.stable_text == "he was not an"
    # A backend that cannot force the prefix changed its mind about "not".
    assert stabilizer.update("he was now an ill disposed") == ("he was not an ill", "disposed")


def test_reset_starts_a_new_utterance() -> None:
    stabilizer = PartialStabilizer(agreement=2)
    stabilizer.update("a b c")
    stabilizer.update("a b c d")
    assert stabilizer.stable_text == "a b c"
    stabilizer.reset()
    assert stabilizer.stable_text == ""
    assert stabilizer.update("x y") == ("", "x y")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_decodes_change_nothing(text: str) -> None:
    stabilizer = PartialStabilizer(agreement=2)
    stabilizer.update("one two three")
    stabilizer.update("one two three four")
    assert stabilizer.update(text) == ("one two three", "")


def test_stable_words_keep_the_case_they_were_shown_in() -> None:
    # A later decode that writes a promised word another way (case, punctuation) agrees with
    # it, and the words shown stay as shown: the stable text only ever grows, verbatim.
    stabilizer = PartialStabilizer(agreement=2)
    stabilizer.update("He was not")
    assert stabilizer.update("He was not an") == ("He was not", "an")
    stabilizer.update("he was not an ill")
    assert stabilizer.update("he was not an ill disposed") == ("He was not an ill", "disposed")


# Words in two spellings each (case, punctuation), which agreement takes as one word.
@given(st.lists(st.lists(st.sampled_from(["a", "A", "b", "b,", "c", "d"]), max_size=8),
                max_size=12),
       st.integers(2, 4))
def test_stable_text_only_grows(decodes: list[list[str]], agreement: int) -> None:
    stabilizer = PartialStabilizer(agreement=agreement)
    shown: list[str] = []
    for words in decodes:
        stable, unstable = stabilizer.update(" ".join(words))
        assert stable.split()[: len(shown)] == shown
        assert len(stable.split()) >= len(shown)
        shown = stable.split()
        full = (stable + " " + unstable).split()
        assert full[: len(shown)] == shown
