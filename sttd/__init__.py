"""sttd: a real-time speech-to-text server.

Where things are (README.md, "Layout", has the full table):

* a connection's life: `sttd.nursery` (the trio tasks that move its data, its one close path)
  around `sttd.session` (the sans-I/O core: utterances in, decode requests and events out),
  linked by `sttd.channels` (the bounded channels and their policies);
* the wire protocols: `sttd.api` (one codec per protocol over the typed events they share);
* audio in: `sttd.audio` (the one converter, WAV and FFmpeg readers) and `sttd.vad`;
* the engine: `sttd.engine` (the cross-session scheduler and the file pipeline) over
  `sttd.backends`;
* the server: `sttd.http` (the routes), `sttd.admission` (who gets in, within what limits),
  `sttd.server` (start-up, signals, drain), `sttd.settings`, `sttd.metrics`, `sttd.errors`;
* the client side: `sttd.client` (the trio library and the ``sttd stream``/``transcribe``
  commands) and `sttd.cli` (the ``sttd`` command).
"""

__all__: list[str] = []
