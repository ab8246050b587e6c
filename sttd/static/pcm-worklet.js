// AudioWorklet processor: microphone audio at the context's rate (usually 48 or 44.1 kHz) in,
// 16 kHz mono PCM16 little-endian frames out, posted to the page as ArrayBuffers.
//
// Downsampling first low-pass filters (a windowed-sinc FIR, cut off at 7.2 kHz) so that sound
// above 8 kHz cannot alias into the speech band, then reads the filtered signal at 16 kHz
// instants. Where the input rate is not a multiple of 16 kHz (44.1 kHz) an instant falls between
// two input samples, and the filtered values at both are linearly interpolated.

const OUT_RATE_HZ = 16000;
const CUTOFF_HZ = 7200;
// Filter half-length in output samples: a longer filter has a steeper edge (about 1.8 kHz from
// pass to stop band at 24) and costs more; 24 is a few million multiply-adds a second.
const HALF_TAPS_PER_OUTPUT = 24;

// Blackman-windowed sinc low-pass with `half` taps either side of the centre, unity gain at DC.
function lowPass(rateHz, cutoffHz, half) {
  const taps = new Float32Array(2 * half + 1);
  const fc = cutoffHz / rateHz;
  let sum = 0;
  for (let n = -half; n <= half; n++) {
    const sinc = n === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * n) / (Math.PI * n);
    const x = (Math.PI * n) / (half + 1);
    const window = 0.42 + 0.5 * Math.cos(x) + 0.08 * Math.cos(2 * x);
    taps[n + half] = sinc * window;
    sum += taps[n + half];
  }
  return taps.map((tap) => tap / sum);
}

class Pcm16Downsampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.step = sampleRate / OUT_RATE_HZ; // input samples per output sample
    this.half = Math.ceil(HALF_TAPS_PER_OUTPUT * Math.max(this.step, 1));
    this.taps = lowPass(sampleRate, Math.min(CUTOFF_HZ, 0.45 * sampleRate), this.half);
    // Input not yet consumed, after `half` samples of history (zeros at the start, so output
    // sample n is the input at time n / 16000 s from the first sample captured).
    this.input = new Float32Array(4 * this.half + 1024);
    this.filled = this.half;
    this.position = this.half; // the next output instant, as an index into this.input
    this.frameBytes = 2 * options.processorOptions.frameSamples;
    this.newFrame();
  }

  newFrame() {
    this.frame = new DataView(new ArrayBuffer(this.frameBytes));
    this.framed = 0; // bytes written
  }

  process(inputs) {
    const samples = inputs[0][0]; // mono (the node downmixes); absent while nothing is connected
    if (samples) this.push(samples);
    return true;
  }

  push(samples) {
    if (this.filled + samples.length > this.input.length) {
      const bigger = new Float32Array(2 * (this.filled + samples.length));
      bigger.set(this.input.subarray(0, this.filled));
      this.input = bigger;
    }
    this.input.set(samples, this.filled);
    this.filled += samples.length;
    // An output needs `half` input samples past the later of its two neighbours.
    while (Math.floor(this.position) + 1 + this.half < this.filled) {
      const i = Math.floor(this.position);
      const frac = this.position - i;
      const left = this.filtered(i);
      this.emit(frac === 0 ? left : left + frac * (this.filtered(i + 1) - left));
      this.position += this.step;
    }
    // Keep only the history the next output needs.
    const drop = Math.floor(this.position) - this.half;
    this.input.copyWithin(0, drop, this.filled);
    this.filled -= drop;
    this.position -= drop;
  }

  filtered(i) {
    const { taps, input } = this;
    const start = i - this.half;
    let sum = 0;
    for (let k = 0; k < taps.length; k++) sum += taps[k] * input[start + k];
    return sum;
  }

  emit(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.frame.setInt16(this.framed, Math.round(clipped * 32767), true);
    this.framed += 2;
    if (this.framed === this.frameBytes) {
      this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
      this.newFrame();
    }
  }
}

registerProcessor("pcm16-downsampler", Pcm16Downsampler);
