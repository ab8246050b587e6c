"""A session's core, sans I/O: utterances in, decode requests and events out.

`SessionCore` is the whole of a session's bookkeeping (what to decode, when, and what to tell
the client, in order); the trio tasks in `sttd.nursery` only move data between it, the
connection and the engine. `UtteranceTracker` cuts the audio into utterances with the VAD's
`Endpointer`; `PartialStabilizer` keeps the stable prefix of partials.
"""

from sttd.session._core import (
    AudioFrame,
    Decode,
    Gap,
    InputItem,
    SessionCore,
    Stop,
    stream_words,
)
from sttd.session._stability import PartialStabilizer
from sttd.session._utterances import TAIL_MS, SampleBuffer, Utterance, UtteranceTracker

__all__ = [
    "TAIL_MS",
    "AudioFrame",
    "Decode",
    "Gap",
    "InputItem",
    "PartialStabilizer",
    "SampleBuffer",
    "SessionCore",
    "Stop",
    "Utterance",
    "UtteranceTracker",
    "stream_words",
]
