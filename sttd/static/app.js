// The live transcription page: microphone -> AudioWorklet (16 kHz PCM16) -> /v1/stt/ws, and the
// server's partials and finals -> the transcript. One `Session` per press of Start.
"use strict";

const RATE_HZ = 16000;
const FRAME_MS = 40;
const KEY_STORAGE = "sttd.apiKey";
const END_WAIT_MS = 15000; // after Stop, how long to wait for the server's last finals

const ui = {
  controls: document.getElementById("controls"),
  button: document.getElementById("toggle"),
  key: document.getElementById("api-key"),
  language: document.getElementById("language"),
  status: document.getElementById("status"),
  error: document.getElementById("error"),
  warnings: document.getElementById("warnings"),
  transcript: document.getElementById("transcript"),
};

let session = null; // the running Session, or null

class Session {
  constructor(key, language) {
    // Created within the click, so that every browser lets it play.
    this.audio = new AudioContext();
    this.audio.resume();
    this.stream = null;
    this.released = false;
    this.sentMs = 0; // audio sent so far, ms
    this.sent = []; // [sentMs, performance.now() at sending], oldest first
    const query = new URLSearchParams({
      call_id: "browser-" + Math.random().toString(36).slice(2, 10),
      sample_rate: RATE_HZ,
      frame_ms: FRAME_MS,
      words: "false", // the page shows no word timings: the server need not align them
    });
    if (key) query.set("token", key);
    if (language && language !== "auto") query.set("language", language);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.socket = new WebSocket(`${scheme}//${location.host}/v1/stt/ws?${query}`);
    this.socket.onmessage = (event) => this.receive(JSON.parse(event.data));
    this.socket.onclose = (event) => this.closed(event);
    setStatus("connecting");
  }

  receive(message) {
    switch (message.type) {
      case "ready":
        if (this.released) break; // stopped before the server was ready
        setStatus(`ready (session ${message.session_id}, backend ${message.backend})`);
        this.capture().catch((error) => {
          showError(`microphone: ${error.message}`);
          this.socket.close();
        });
        break;
      case "partial":
        showPartial(message);
        break;
      case "final":
        showFinal(message, this.latencyMs(message.end_ms));
        break;
      case "error":
        showError(`${message.code}: ${message.message}`);
        break;
      case "warning":
        showWarning(message);
        break;
    }
  }

  async capture() {
    if (!navigator.mediaDevices || !window.AudioWorkletNode) {
      throw new Error("this browser gives the microphone only to https pages or localhost");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
               autoGainControl: false },
    });
    await this.audio.audioWorklet.addModule("/static/pcm-worklet.js");
    if (this.released) return this.stopMicrophone(); // stopped meanwhile
    const node = new AudioWorkletNode(this.audio, "pcm16-downsampler", {
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { frameSamples: (RATE_HZ * FRAME_MS) / 1000 },
    });
    node.port.onmessage = (event) => this.send(event.data);
    this.audio.createMediaStreamSource(this.stream).connect(node);
    node.connect(this.audio.destination); // silent; some browsers only run connected nodes
    await this.audio.resume();
    setStatus(`streaming (microphone at ${this.audio.sampleRate} Hz, sent to the server at 16 kHz)`);
  }

  send(frame) {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    this.socket.send(frame);
    this.sentMs += (frame.byteLength / 2 / RATE_HZ) * 1000;
    this.sent.push([this.sentMs, performance.now()]);
  }

  // Wall time from sending the audio up to `endMs` to now, or null if none was sent.
  latencyMs(endMs) {
    const now = performance.now();
    const i = this.sent.findIndex(([sentMs]) => sentMs >= endMs);
    const entry = this.sent[i === -1 ? this.sent.length - 1 : i];
    this.sent.splice(0, Math.max(i, 0)); // finals come in order: older entries are done with
    return entry ? now - entry[1] : null;
  }

  stop() {
    this.release();
    if (this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({ type: "end" }));
      setStatus("finishing: waiting for the last finals");
      ui.button.disabled = true;
      this.endTimer = setTimeout(() => this.socket.close(), END_WAIT_MS);
    } else {
      this.socket.close();
    }
  }

  // Stops capturing (once): the microphone and the audio graph.
  release() {
    if (this.released) return;
    this.released = true;
    this.stopMicrophone();
    this.audio.close();
  }

  stopMicrophone() {
    this.stream?.getTracks().forEach((track) => track.stop());
  }

  closed(event) {
    clearTimeout(this.endTimer);
    if (event.code === 1006 && !this.released && ui.error.hidden) {
      showError("the connection to the server failed or was lost (1006)");
    }
    const reason = event.reason ? ` ${event.reason}` : "";
    setStatus(`closed (${event.code}${reason})`);
    this.release();
    session = null;
    ui.button.disabled = false;
    ui.button.textContent = "Start";
    delete ui.button.dataset.running;
    ui.button.formNoValidate = false;
  }
}

function setStatus(text) {
  ui.status.textContent = text;
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function showWarning(message) {
  const detail = message.skipped_ms ? ` (${message.skipped_ms} ms of audio skipped)`
    : message.frames_dropped ? ` (${message.frames_dropped} frames dropped)` : "";
  const item = document.createElement("li");
  item.textContent = `${message.code}: ${message.message}${detail}`;
  ui.warnings.append(item);
  while (ui.warnings.children.length > 5) ui.warnings.firstElementChild.remove();
  ui.warnings.hidden = false;
}

// The transcript line of an utterance, if it has one yet.
function lineOf(utteranceId) {
  return ui.transcript.querySelector(`[data-utterance="${utteranceId}"]`);
}

// Puts `line` where the utterance's previous line was, or at the end, and scrolls to it.
function place(line, utteranceId) {
  line.dataset.utterance = utteranceId;
  const old = lineOf(utteranceId);
  if (old) old.replaceWith(line);
  else ui.transcript.append(line);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function span(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

function showPartial(message) {
  if (lineOf(message.utterance_id)?.classList.contains("final")) return;
  const line = document.createElement("p");
  line.className = "partial";
  line.setAttribute("aria-hidden", "true"); // the log announces finals only
  const gap = message.stable && message.unstable ? " " : "";
  line.append(span("stable", message.stable), gap, span("unstable", message.unstable));
  place(line, message.utterance_id);
}

function showFinal(message, latencyMs) {
  if (!message.text) { // nothing was said (a final forced by Stop)
    lineOf(message.utterance_id)?.remove();
    return;
  }
  const line = document.createElement("p");
  line.className = "final";
  line.append(span("text", message.text));
  if (latencyMs !== null) {
    const latency = span("latency", `${Math.round(latencyMs)} ms`);
    latency.title = "latency: from sending the utterance's last audio to receiving its final";
    line.append(" ", latency);
  }
  place(line, message.utterance_id);
}

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return ""; // storage disabled
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: the key lasts as long as the page
  }
}

ui.controls.addEventListener("submit", (event) => {
  event.preventDefault();
  if (session) {
    session.stop();
    return;
  }
  const key = ui.key.value.trim();
  storeKey(key);
  ui.error.hidden = true;
  ui.warnings.hidden = true;
  ui.warnings.replaceChildren();
  ui.transcript.replaceChildren();
  try {
    session = new Session(key, ui.language.value.trim());
  } catch (error) { // no Web Audio, or a URL the browser refuses
    showError(error.message);
    return;
  }
  ui.button.textContent = "Stop";
  ui.button.dataset.running = "";
  ui.button.formNoValidate = true; // Stop must work whatever the fields hold meanwhile
});

// A key in the page's URL (/?token=KEY) is stored, then taken out of the address bar.
const urlKey = new URLSearchParams(location.search).get("token");
if (urlKey !== null) {
  storeKey(urlKey.trim());
  history.replaceState(null, "", location.pathname);
}
ui.key.value = storedKey();
