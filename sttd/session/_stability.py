"""Stable partials: the words of an utterance's partials that will not change, sans I/O.

Theory of operation (local agreement). Each partial of an open utterance is a new decode of all
its audio so far. A word becomes *stable* once ``agreement`` consecutive decodes agree on it and
on every word before it, and it is not the last word of the newest decode (the audio may end
inside that word). Three decodes, not two: early decodes of under a second of audio often agree
on a wrong start. Stable words only ever grow: the session passes them to the backend as a forced
decoder prefix for every later partial, so no partial takes back a stable word. The utterance's
final is a fresh decode of all its audio with a wider beam: it is the transcript of record, and
it may correct a stable word (forcing the prefix into finals cost about 5 WER points on the dev
set; benchmarks/wer.py reports how often a final keeps the last stable prefix).
Words are compared case- and punctuation-insensitively.
"""

from __future__ import annotations

import string

import attrs

__all__ = ["PartialStabilizer"]


def _norm(word: str) -> str:
    return word.strip(string.punctuation + "“”‘’…").lower()


# Validated when built; its state then changes per frame, without attrs' setattr hooks.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class PartialStabilizer:
    """Tracks the stable prefix of one utterance's partials."""

    agreement: int = attrs.field(default=3, validator=attrs.validators.ge(2))
    _stable: list[str] = attrs.field(factory=list)
    _history: list[list[str]] = attrs.field(factory=list)

    @property
    def stable_text(self) -> str:
        """The words already promised to the client."""
        return " ".join(self._stable)

    def update(self, text: str) -> tuple[str, str]:
        """Take a new decode of the utterance; returns its (stable, unstable) split.

        The stable part always starts with every word promised before.
        """
        words = text.split()
        held = len(self._stable)
        if [_norm(w) for w in words[:held]] != [_norm(w) for w in self._stable]:
            # The decode did not keep the promised words (a backend that cannot force a
            # prefix): keep the promise and show the rest of the new decode as tentative.
            words = self._stable + words[held:]
        self._history = [*self._history[-(self.agreement - 1):], words]
        if len(self._history) == self.agreement:
            agreed = 0
            while all(len(h) > agreed for h in self._history) and len(
                    {_norm(h[agreed]) for h in self._history}) == 1:
                agreed += 1
            committed = min(agreed, len(words) - 1)
            if committed > held:
                # The promised words as first shown (a decode may differ in case or
                # punctuation), then the newly agreed ones.
                self._stable = self._stable + words[held:committed]
        return self.stable_text, " ".join(words[len(self._stable):])

    def reset(self) -> None:
        """Forget the utterance (after its final)."""
        self._stable = []
        self._history = []
