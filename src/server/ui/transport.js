// The two streaming clients of the gateway, as references for front-end developers. Both take
// a request object (the body of POST /invoke) and call `handlers.chunk(text)` for each piece,
// then exactly one of `handlers.done(frame)` or `handlers.error({code, message})`.

export const SUBPROTOCOL = "modelgate.v1";
const FIRST_RETRY_MS = 500;
const LONGEST_RETRY_MS = 15_000;

/**
 * The WebSocket JSON mode: one connection for many answers, opened with the subprotocol
 * `modelgate.v1`, reopened with exponential backoff when it drops.
 */
export class WsTransport {
  /**
   * @param {() => string} url the /ws/model URL to open
   * @param {() => string[]} protocols subprotocols to offer
   * @param {(state: string, text: string, refusal?: object) => void} onStatus connection state
   * @param {() => Promise<object | null>} diagnose why a handshake failed: browsers hide the
   *   HTTP answer of a refused handshake. An error (e.g. `unauthorized`) stops the retries
   *   until `restart()`; `null` means the gateway was unreachable, and retrying helps.
   */
  constructor(url, protocols, onStatus, diagnose) {
    this.url = url;
    this.protocols = protocols;
    this.onStatus = onStatus;
    this.diagnose = diagnose;
    this.socket = null;
    this.opening = null;
    this.refusal = null;
    this.active = null;
    this.failures = 0;
    this.retryTimer = null;
  }

  /** Opens the connection now (if it is not open) and keeps it open. */
  start() {
    this.open().catch(() => {});
  }

  /** Closes the connection and stops reconnecting. */
  stop() {
    clearTimeout(this.retryTimer);
    const socket = this.socket;
    this.socket = null;
    this.opening = null;
    this.refusal = null;
    this.failures = 0;
    this.fail({ code: "connection_lost", message: "the WebSocket was closed before the answer was complete" });
    socket?.close(1000);
    this.onStatus("closed", "");
  }

  /** Closes and reopens, e.g. after the subprotocols changed. */
  restart() {
    this.stop();
    this.start();
  }

  /** Sends one request; returns a handle whose `cancel()` asks the server to stop. */
  send(request, handlers) {
    this.open().then(
      (socket) => {
        this.active = handlers;
        socket.send(JSON.stringify(request));
      },
      (error) => handlers.error(error),
    );
    return {
      cancel: () => {
        if (this.active === handlers) this.socket?.send(JSON.stringify({ type: "cancel" }));
      },
    };
  }

  /** Resolves with an open socket, connecting if needed; rejects with an error object. */
  open() {
    if (this.socket?.readyState === WebSocket.OPEN) return Promise.resolve(this.socket);
    if (this.opening) return this.opening;
    if (this.refusal) return Promise.reject(this.refusal);
    clearTimeout(this.retryTimer);
    this.onStatus("connecting", "connecting…");
    const opening = new Promise((resolve, reject) => {
      const socket = new WebSocket(this.url(), this.protocols());
      this.socket = socket;
      let opened = false;
      socket.onopen = () => {
        opened = true;
        this.opening = null;
        this.failures = 0;
        this.onStatus("connected", "connected (WebSocket)");
        resolve(socket);
      };
      socket.onmessage = (message) => this.deliver(JSON.parse(message.data));
      socket.onclose = async () => {
        const unreachable = { code: "connection_failed", message: "the WebSocket to the gateway could not be opened" };
        if (this.socket !== socket) return reject(unreachable); // stopped on purpose
        this.socket = null;
        if (opened) return this.lost();
        const refusal = await this.diagnose();
        if (this.opening !== opening) return reject(refusal ?? unreachable); // restarted meanwhile
        this.opening = null;
        if (refusal) {
          this.refusal = refusal;
          this.onStatus("refused", `refused (${refusal.code})`, refusal);
          return reject(refusal);
        }
        reject(unreachable);
        this.lost();
      };
    });
    this.opening = opening;
    return opening;
  }

  deliver(frame) {
    const handlers = this.active;
    if (!handlers) return;
    if (frame.type === "chunk") return handlers.chunk(frame.text);
    this.active = null;
    if (frame.type === "done") handlers.done(frame);
    else handlers.error(frame.error);
  }

  /** The connection dropped or could not be made: fail the answer in flight, retry later. */
  lost() {
    this.fail({ code: "connection_lost", message: "the connection to the gateway was lost before the answer was complete" });
    const delay = Math.min(FIRST_RETRY_MS * 2 ** this.failures, LONGEST_RETRY_MS);
    this.failures += 1;
    this.onStatus("offline", `disconnected, retrying in ${Math.ceil(delay / 1000)} s`);
    this.retryTimer = setTimeout(() => this.open().catch(() => {}), delay);
  }

  fail(error) {
    const handlers = this.active;
    this.active = null;
    handlers?.error(error);
  }
}

/**
 * Server-Sent Events over fetch: POST /stream with the request as JSON (EventSource can only
 * GET, which carries a single prompt and no headers). Returns a handle whose `cancel()`
 * aborts the request, which makes the gateway drop the upstream call.
 */
export function streamSse(request, handlers, headers) {
  const controller = new AbortController();
  let finished = false;
  const finish = (report) => {
    if (finished) return;
    finished = true;
    report();
  };
  (async () => {
    const response = await fetch("/stream", {
      method: "POST",
      headers: { "content-type": "application/json", accept: "text/event-stream", ...headers },
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      const error = body?.error ?? { code: `http_${response.status}`, message: response.statusText };
      return finish(() => handlers.error(error));
    }
    for await (const event of serverSentEvents(response.body)) {
      const frame = JSON.parse(event.data);
      if (event.event === "chunk") handlers.chunk(frame.text);
      else if (event.event === "done") return finish(() => handlers.done(frame));
      else if (event.event === "error") return finish(() => handlers.error(frame.error));
    }
    finish(() =>
      handlers.error({ code: "connection_lost", message: "the stream ended before the answer was complete" }),
    );
  })().catch((err) => {
    if (!controller.signal.aborted) {
      finish(() => handlers.error({ code: "connection_lost", message: String(err.message ?? err) }));
    }
  });
  return {
    cancel: () => {
      controller.abort();
      finish(() => handlers.error({ code: "cancelled", message: "stopped" }));
    },
  };
}

/** The events of a text/event-stream body, parsed as the HTML standard says EventSource does. */
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r(?!$)|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield { event: type || "message", data: data.join("\n") };
        type = "";
        data = [];
        continue;
      }
      const colon = line.indexOf(":");
      if (colon === 0) continue; // a comment: the server's keep-alive
      const field = colon < 0 ? line : line.slice(0, colon);
      const fieldValue = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") type = fieldValue;
      else if (field === "data") data.push(fieldValue);
    }
  }
}
