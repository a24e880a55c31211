// voicestack web page: the microphone to the gateway over WebRTC, the agent's voice back,
// and the conversation's events (data channel "events", JSON) drawn as they come.
// Plain JS, no build step.
//
// Hooks for tests (and curious people with a console):
//   window.voicestackEvents          every event received, in order, with t (ms, page clock)
//   window.voicestackReceivedAudio   with ?record=1: the agent's audio as played
//                                    {sampleRate, chunks: Float32Array[], seconds}
//   window.voicestackAudioRms(s)     RMS of the recorded audio per window of s seconds
//   window.voicestackAudioPcm16(r)   the recorded audio at r Hz (16000), PCM16 LE, base64
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const talkButton = $("talk");
  const stateBox = $("state");
  const errorsBox = $("errors");
  const conversation = $("conversation");
  const listening = $("listening");
  const remoteAudio = $("remote");
  const params = new URLSearchParams(location.search);

  const events = [];
  window.voicestackEvents = events;
  const received = { sampleRate: 0, chunks: [], seconds: 0 };
  window.voicestackReceivedAudio = received;
  const MAX_RECORD_SECONDS = 300;

  let pc = null;
  let channel = null;
  let microphone = null;
  let audioContext = null;
  let inCall = false;
  const turns = new Map();

  // ------------------------------------------------------------ small helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setState(text, kind) {
    stateBox.textContent = text;
    stateBox.className = "state " + (kind || "idle");
  }

  function showError(message) {
    const item = el("div", "error", message);
    errorsBox.appendChild(item);
    while (errorsBox.children.length > 5) errorsBox.removeChild(errorsBox.firstChild);
  }

  function record(event) {
    event.t = Math.round(performance.now());
    events.push(event);
  }

  function ms(value) {
    const n = Number(value);
    return Number.isFinite(n) ? Math.round(n) + " ms" : "-";
  }

  // ------------------------------------------------------------ turns on screen

  function turn(index) {
    index = Number(index) || 0;
    let t = turns.get(index);
    if (t) return t;
    const box = el("article", "turn");
    box.dataset.turn = String(index);
    const user = el("p", "bubble user empty");
    const agent = el("p", "bubble agent empty");
    const metrics = el("div", "metrics");
    const waterfall = el("div", "waterfall-box");
    if (index > 0) box.appendChild(user);
    box.append(agent, metrics, waterfall);
    // Turns in index order (a reply can start before the next turn's speech ends).
    const after = [...turns.keys()].filter((i) => i > index).sort((a, b) => a - b)[0];
    conversation.insertBefore(box, after === undefined ? null : turns.get(after).box);
    t = { index, box, user, agent, metrics, waterfall, reply: "" };
    turns.set(index, t);
    box.scrollIntoView({ block: "end", behavior: "smooth" });
    return t;
  }

  function setUserText(t, text, final) {
    t.user.textContent = text || "…";
    t.user.classList.remove("empty");
    t.user.classList.toggle("interim", !final);
    t.user.classList.toggle("final", !!final);
  }

  function setAgentText(t, text) {
    t.agent.textContent = text;
    t.agent.classList.toggle("empty", !text);
  }

  function showMetrics(t, m) {
    const parts = [
      ["voice-to-voice", m.voice_to_voice_ms],
      ["endpointing", m.endpointing_ms],
      ["STT final", m.stt_final_ms],
      ["LLM first token", m.llm_first_token_ms],
      ["TTS first audio", m.tts_first_audio_ms],
    ];
    t.metrics.textContent = "";
    for (const [label, value] of parts) {
      if (!Number(value)) continue;
      const item = el("span", label === "voice-to-voice" ? "metric main" : "metric");
      item.append(el("b", null, ms(value)), document.createTextNode(" " + label));
      t.metrics.appendChild(item);
    }
  }

  const SPAN_CLASS = [
    ["stt", "stt"], ["endpoint", "endpointing"], ["llm", "llm"], ["tts", "tts"],
    ["first_audio", "audio"], ["tool", "tool"], ["turn", "turn"],
  ];

  function spanClass(name) {
    for (const [prefix, cls] of SPAN_CLASS) if (name.startsWith(prefix)) return cls;
    return "other";
  }

  function drawWaterfall(t, trace) {
    const spans = (trace.spans || []).map((s) => ({
      name: s.name || "?",
      parent: s.parent_name || "",
      start: Number(s.start_ms) || 0,
      duration: Number(s.duration_ms) || 0,
    }));
    if (!spans.length) return;
    const total = Math.max(1, ...spans.map((s) => s.start + s.duration));
    const box = el("div", "waterfall");
    const title = el("div", "wf-title");
    title.append(el("span", null, "turn " + t.index + " trace"),
      el("span", "wf-id", (trace.trace_id || "").slice(0, 16)),
      el("span", "wf-total", ms(total)));
    box.appendChild(title);
    for (const s of spans) {
      const row = el("div", "wf-row");
      row.appendChild(el("span", "wf-label" + (s.parent ? " child" : ""), s.name));
      const track = el("div", "wf-track");
      const bar = el("div", "bar " + spanClass(s.name));
      bar.style.left = (100 * s.start / total).toFixed(2) + "%";
      bar.style.width = Math.max(0.4, 100 * s.duration / total).toFixed(2) + "%";
      bar.title = `${s.name}: starts at ${ms(s.start)}, lasts ${ms(s.duration)}`;
      track.appendChild(bar);
      row.append(track, el("span", "wf-ms", ms(s.duration)));
      box.appendChild(row);
    }
    t.waterfall.textContent = "";
    t.waterfall.appendChild(box);
  }

  // ------------------------------------------------------------ events from the gateway

  function onEvent(event) {
    record(event);
    switch (event.type) {
      case "session_started":
        setState("connected: speak when you like", "live");
        break;
      case "connection":
        if (event.state === "connected") setState("connected: speak when you like", "live");
        else if (event.state === "failed" || event.state === "closed") setState("connection " + event.state, "error");
        break;
      case "speech_started":
        listening.hidden = false;
        if (Number(event.turn_index) > 0) setUserText(turn(event.turn_index), "", false);
        break;
      case "speech_ended":
        listening.hidden = true;
        break;
      case "transcript":
        setUserText(turn(event.turn_index), event.text, event.is_final);
        break;
      case "agent_text": {
        const t = turn(event.turn_index);
        t.reply += event.text_delta || "";
        setAgentText(t, t.reply);
        t.agent.classList.add("speaking");
        break;
      }
      case "agent_turn_ended": {
        const t = turn(event.turn_index);
        if (event.text) setAgentText(t, event.text);
        t.agent.classList.remove("speaking");
        t.box.classList.add("done");
        break;
      }
      case "interrupted": {
        const t = turn(event.turn_index);
        setAgentText(t, (event.heard_text || "").trim() + " …");
        t.agent.classList.remove("speaking");
        t.agent.classList.add("interrupted");
        t.box.classList.add("done");
        break;
      }
      case "turn_metrics":
        showMetrics(turn(event.turn_index), event);
        break;
      case "turn_trace":
        drawWaterfall(turn(event.turn_index), event);
        break;
      case "error":
        showError((event.stage ? event.stage + ": " : "") + (event.message || "an error"));
        break;
      case "go_away":
        showError("The gateway is shutting down: this call ends soon. Press Talk again to reconnect.");
        break;
      case "call_ended":
        if (event.code && event.code !== "OK" && event.code !== "CANCELLED") {
          showError("Call ended: " + (event.message || event.code));
        }
        hangUp("call ended" + (event.message ? ": " + event.message : ""), event.code === "OK" ? "idle" : "error");
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------ the agent's audio

  function playAndRecord(stream) {
    record({ type: "remote_track" });  // (t: where the recording of the agent's audio starts)
    remoteAudio.srcObject = stream;
    remoteAudio.play().catch(() => { /* autoplay: the Talk click normally allows it */ });
    if (params.get("record") !== "1") return;
    audioContext = new AudioContext();
    audioContext.resume();
    received.sampleRate = audioContext.sampleRate;
    const source = audioContext.createMediaStreamSource(stream);
    const tap = audioContext.createScriptProcessor(4096, 1, 1);
    const mute = audioContext.createGain();
    mute.gain.value = 0;  // the <audio> element plays it; this only listens
    tap.onaudioprocess = (e) => {
      if (received.seconds >= MAX_RECORD_SECONDS) return;
      const samples = new Float32Array(e.inputBuffer.getChannelData(0));
      received.chunks.push(samples);
      received.seconds += samples.length / received.sampleRate;
    };
    source.connect(tap);
    tap.connect(mute);
    mute.connect(audioContext.destination);
  }

  function recordedSamples() {
    const total = received.chunks.reduce((n, c) => n + c.length, 0);
    const all = new Float32Array(total);
    let at = 0;
    for (const c of received.chunks) { all.set(c, at); at += c.length; }
    return all;
  }

  window.voicestackAudioRms = function (windowSeconds) {
    const samples = recordedSamples();
    const size = Math.max(1, Math.round((windowSeconds || 0.5) * (received.sampleRate || 48000)));
    const out = [];
    for (let i = 0; i + size <= samples.length; i += size) {
      let sum = 0;
      for (let j = i; j < i + size; j++) sum += samples[j] * samples[j];
      out.push(Math.sqrt(sum / size));
    }
    return out;
  };

  window.voicestackAudioPcm16 = function (rate) {
    rate = rate || 16000;
    const samples = recordedSamples();
    const ratio = (received.sampleRate || 48000) / rate;
    const n = Math.floor(samples.length / ratio);
    const bytes = new Uint8Array(n * 2);
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < n; i++) {
      const from = Math.floor(i * ratio), to = Math.max(from + 1, Math.floor((i + 1) * ratio));
      let sum = 0;
      for (let j = from; j < to; j++) sum += samples[j];
      const v = Math.max(-1, Math.min(1, sum / (to - from)));
      view.setInt16(i * 2, Math.round(v * 32767), true);
    }
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  };

  // ------------------------------------------------------------ the call

  function iceGathered(peer, timeoutMs) {
    if (peer.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { peer.removeEventListener("icegatheringstatechange", check); resolve(); };
      const check = () => { if (peer.iceGatheringState === "complete") done(); };
      peer.addEventListener("icegatheringstatechange", check);
      setTimeout(done, timeoutMs);  // what was gathered by then is enough on a local network
    });
  }

  async function postJson(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      const message = data.error || `${response.status} ${response.statusText}`;
      throw new Error(`${url}: ${message}`);
    }
    return data;
  }

  async function talk() {
    talkButton.disabled = true;
    errorsBox.textContent = "";
    try {
      setState("asking for the microphone…", "busy");
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("this browser gives no microphone here (the page must be on https:// or localhost)");
      }
      try {
        microphone = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
        });
      } catch (error) {
        throw new Error("the microphone is not available: " + (error.message || error.name));
      }
      record({ type: "microphone_open" });  // (t: when capture started, for latency estimates)
      setState("connecting…", "busy");
      const config = await (await fetch("/config")).json();
      const { token } = await postJson("/token");

      pc = new RTCPeerConnection({ iceServers: config.ice_servers || [] });
      channel = pc.createDataChannel("events", { ordered: true });
      channel.onmessage = (e) => {
        try { onEvent(JSON.parse(e.data)); } catch (error) { console.error("bad event", error); }
      };
      for (const track of microphone.getAudioTracks()) pc.addTrack(track, microphone);
      pc.ontrack = (e) => playAndRecord(e.streams && e.streams[0] ? e.streams[0] : new MediaStream([e.track]));
      pc.onconnectionstatechange = () => {
        const state = pc ? pc.connectionState : "closed";
        record({ type: "page_connection", state });
        if (state === "connecting") setState("connecting…", "busy");
        if (state === "failed") { showError("The connection to the gateway failed."); hangUp("connection failed", "error"); }
        if (state === "disconnected") setState("connection interrupted…", "busy");
      };

      await pc.setLocalDescription(await pc.createOffer());
      await iceGathered(pc, 2000);
      const answer = await postJson("/offer", { type: "offer", sdp: pc.localDescription.sdp, token });
      record({ type: "answered", call_id: answer.call_id, session_id: answer.session_id });
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
      inCall = true;
      talkButton.textContent = "Hang up";
      talkButton.classList.add("hangup");
    } catch (error) {
      record({ type: "page_error", message: String(error.message || error) });
      showError(String(error.message || error));
      hangUp("not connected", "error");
    } finally {
      talkButton.disabled = false;
    }
  }

  function hangUp(why, kind) {
    if (channel && channel.readyState === "open") {
      try { channel.send(JSON.stringify({ type: "hangup" })); } catch (_) { /* closing */ }
    }
    if (pc) pc.close();
    if (microphone) microphone.getTracks().forEach((t) => t.stop());
    pc = null;
    channel = null;
    microphone = null;
    inCall = false;
    listening.hidden = true;
    talkButton.textContent = "Talk";
    talkButton.classList.remove("hangup");
    setState(why || "not connected", kind || "idle");
  }

  talkButton.addEventListener("click", () => (inCall ? hangUp("you hung up") : talk()));
})();
