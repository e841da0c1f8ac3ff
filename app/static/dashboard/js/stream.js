// Server-Sent Events over fetch(). EventSource cannot send an Authorization header, so the
// `text/event-stream` format is parsed here; reconnects send Last-Event-ID so the server
// replays what was missed. After repeated failures the caller is told to fall back to polling.

import { authHeaders } from "./api.js";

/** Splits a text/event-stream into messages {event, data, id}; feed it decoded chunks. */
export class EventStreamParser {
  constructor(onMessage) {
    this.onMessage = onMessage;
    this.buffer = "";
    this.pendingCR = false;
    this.delivered = 0;
    this.event = "";
    this.data = [];
    this.id = null;
  }

  push(chunk) {
    // A CRLF split across two chunks: the CR already ended the line, so drop the LF.
    this.buffer += this.pendingCR && chunk.startsWith("\n") ? chunk.slice(1) : chunk;
    this.pendingCR = this.buffer.endsWith("\r");
    const lines = this.buffer.split(/\r\n|\r|\n/);
    this.buffer = lines.pop(); // an unfinished line waits for the next chunk
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return undefined; // comment / keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    return undefined;
  }

  dispatch() {
    const message = { event: this.event || "message", data: this.data.join("\n"), id: this.id };
    const hasData = this.data.length > 0;
    this.event = "";
    this.data = [];
    if (hasData) {
      this.delivered += 1;
      this.onMessage(message);
    }
  }
}

/**
 * Opens the run's stream and keeps it open until `close()` or until the server ends it after a
 * terminal status. `onMessage({event, data, id})` gets parsed JSON data; `onFallback()` is called
 * once when the stream keeps failing, so the caller can poll instead.
 */
export function openStream(url, { onMessage, onOpen, onFallback, maxFailures = 3 }) {
  const controller = new AbortController();
  let lastEventId = null;
  let failures = 0;
  let closed = false;

  const close = () => {
    closed = true;
    controller.abort();
  };

  const deliver = (message) => {
    failures = 0;
    if (message.id !== null) lastEventId = message.id;
    let data = message.data;
    try {
      data = JSON.parse(message.data);
    } catch {
      // a plain-text payload is passed through as is
    }
    const verdict = onMessage({ event: message.event, data, id: message.id });
    if (verdict === "close") close();
  };

  async function connectOnce(parser) {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
    const response = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
    const type = response.headers.get("content-type") ?? "";
    if (!response.ok || !type.startsWith("text/event-stream")) {
      throw Object.assign(new Error(`stream answered ${response.status}`), { status: response.status });
    }
    onOpen?.();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
  }

  (async () => {
    while (!closed) {
      const parser = new EventStreamParser(deliver);
      try {
        await connectOnce(parser);
        if (closed) return;
        // The server ended the stream: reconnect with Last-Event-ID after a pause; a stream that
        // keeps ending without a message counts as failing.
        if (parser.delivered === 0 && ++failures >= maxFailures) {
          closed = true;
          onFallback?.(new Error("stream keeps ending without messages"));
          return;
        }
      } catch (error) {
        if (closed || error.name === "AbortError") return;
        failures += 1;
        const permanent = error.status && error.status >= 400 && error.status < 500 && error.status !== 429;
        if (permanent || failures >= maxFailures) {
          closed = true;
          onFallback?.(error);
          return;
        }
      }
      await new Promise((resolve) => setTimeout(resolve, parser.retryMs ?? 1000 * 2 ** failures));
    }
  })();

  return { close };
}
