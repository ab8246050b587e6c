"""The speech engine: every session's and every upload's requests, batched onto one backend.

`Engine` is what the server builds (`Engine.from_settings`), runs in its app-level nursery
(`Engine.run`) and closes on the way out (`Engine.aclose`); sessions call `Engine.transcribe`
inside `Engine.live_stream`. Behind it, the `Scheduler` orders and batches requests by
`Priority` under a `SchedulerConfig`, and reports its queue in `SchedulerStatistics`.
`VadBatcher` scores every session's VAD net calls in shared batched runs off the event loop.
`transcribe_file` cuts an uploaded file at its pauses (`split_at_pauses`) and transcribes the
pieces through the engine, below live traffic.
"""

from sttd.engine._capacity import (PARTIALS_PER_SPEECH_S, PRIOR_UTTERANCE_S, CapacityModel,
                                   CapacityStatistics)
from sttd.engine._engine import Engine
from sttd.engine._files import (
    MAX_MEDIA_AUDIO_S,
    check_audio,
    file_segments,
    split_at_pauses,
    transcribe_file,
)
from sttd.engine._vad import VadBatcher, VadStatistics
from sttd.engine._scheduler import (
    LiveStreams,
    Priority,
    Scheduler,
    SchedulerConfig,
    SchedulerStatistics,
)

__all__ = [
    "MAX_MEDIA_AUDIO_S",
    "PARTIALS_PER_SPEECH_S",
    "PRIOR_UTTERANCE_S",
    "CapacityModel",
    "CapacityStatistics",
    "Engine",
    "LiveStreams",
    "Priority",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStatistics",
    "VadBatcher",
    "VadStatistics",
    "check_audio",
    "file_segments",
    "split_at_pauses",
    "transcribe_file",
]
