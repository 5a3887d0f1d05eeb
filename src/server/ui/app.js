// The chat page: a conversation with one model at a time, streamed over the WebSocket JSON
// mode or Server-Sent Events. Model output only ever reaches the page as text nodes.

import { SUBPROTOCOL, WsTransport, streamSse } from "./transport.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  connection: $("connection"),
  settings: $("settings"),
  system: $("system"),
  maxTokens: $("max_tokens"),
  temperature: $("temperature"),
  topP: $("top_p"),
  apiKey: $("api_key"),
  clear: $("clear"),
  conversation: $("conversation"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
};

// What each error code means to someone chatting; the gateway's own message follows it.
const PLAIN_WORDS = {
  cancelled: "Stopped.",
  connection_lost: "The connection to the gateway was lost.",
  connection_failed: "Could not connect to the gateway: it is unreachable or refused the connection.",
  unauthorized: "The gateway needs a valid API key: enter it under Settings.",
  forbidden: "The gateway refused this page.",
  invalid_request: "The gateway refused the request.",
  unknown_model: "The gateway does not know this model.",
  throttled: "The model is busy right now.",
  upstream_unavailable: "The model's service is unavailable right now.",
  upstream_timeout: "The model took too long to answer.",
  upstream_error: "The model's service failed.",
  model_loading: "The model is still loading.",
};

const API_KEY_ITEM = "modelgate.apiKey"; // kept for this browser tab only
const turns = [];
let current = null;

const ws = new WsTransport(
  () => {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws/model?model=${encodeURIComponent(ui.model.value)}`;
  },
  () => (apiKey() ? [SUBPROTOCOL, `bearer.${apiKey()}`] : [SUBPROTOCOL]),
  (state, text, refusal) => {
    ui.connection.dataset.state = state;
    ui.connection.textContent = refusal?.code === "unauthorized" ? "API key needed" : text;
    if (refusal?.code === "unauthorized") askForApiKey();
  },
  whyRefused,
);

/**
 * Why the WebSocket handshake failed, which browsers do not tell: an /invoke with an empty
 * conversation passes the same origin and API-key checks, then is refused without calling
 * any model.
 */
async function whyRefused() {
  try {
    const response = await fetch("/invoke", {
      method: "POST",
      headers: { "content-type": "application/json", ...authHeaders() },
      body: JSON.stringify({ model: ui.model.value, messages: [] }),
    });
    if (response.status === 401 || response.status === 403) return (await response.json()).error;
  } catch {
    // Unreachable: retrying is the answer.
  }
  return null;
}

function askForApiKey() {
  ui.settings.open = true;
  ui.apiKey.focus();
}

function apiKey() {
  return sessionStorage.getItem(API_KEY_ITEM) ?? "";
}

function authHeaders() {
  return apiKey() ? { authorization: `Bearer ${apiKey()}` } : {};
}

function transport() {
  return document.querySelector('input[name="transport"]:checked').value;
}

async function loadModels() {
  let models;
  try {
    const response = await fetch("/models", { headers: authHeaders() });
    const body = await response.json();
    if (!response.ok) throw body.error;
    models = body.models;
  } catch (error) {
    notice(`Could not list the models: ${describe(error)}`);
    if (error?.code === "unauthorized") askForApiKey();
    return;
  }
  ui.model.replaceChildren(
    ...models.map((model) => {
      const option = new Option(`${model.name} (${model.model_id})`, model.name);
      option.disabled = model.state === "failed";
      if (model.state !== "ready") option.text += ` — ${model.state}`;
      return option;
    }),
  );
  if (models.length === 0) notice("The gateway has no models configured.");
  else chooseTransport();
}

function chooseTransport() {
  if (transport() === "ws") ws.start();
  else {
    ws.stop();
    ui.connection.dataset.state = "sse";
    ui.connection.textContent = "SSE: one request per answer";
  }
}

function settings() {
  const number = (input) => (input.value === "" ? undefined : Number(input.value));
  return {
    system: ui.system.value.trim() || undefined,
    max_tokens: number(ui.maxTokens),
    temperature: number(ui.temperature),
    top_p: number(ui.topP),
  };
}

/** The conversation before `turn`, as `messages`: only exchanges that got an answer. */
function history(turn) {
  return turns
    .slice(0, turns.indexOf(turn))
    .filter((t) => t.answer && (t.status === "done" || t.status === "stopped"))
    .flatMap((t) => [
      { role: "user", content: t.user },
      { role: "assistant", content: t.answer },
    ]);
}

function addTurn(text) {
  ui.conversation.querySelector(".empty")?.remove();
  const user = element("article", "turn user");
  user.append(element("div", "bubble", text));
  const assistant = element("article", "turn assistant");
  const bubble = element("div", "bubble");
  const content = element("div", "content");
  const typing = element("span", "typing");
  typing.setAttribute("aria-label", "the model is writing");
  typing.append(element("i"), element("i"), element("i"));
  bubble.append(content, typing);
  const meta = element("div", "meta");
  const problem = element("div", "problem");
  assistant.append(bubble, meta, problem);
  ui.conversation.append(user, assistant);
  const turn = { user: text, answer: "", status: "", nodes: { assistant, content, meta, problem } };
  turns.push(turn);
  return turn;
}

function run(turn) {
  const { assistant, content, meta, problem } = turn.nodes;
  const model = ui.model.value;
  const request = {
    model,
    messages: [...history(turn), { role: "user", content: turn.user }],
    ...settings(),
  };
  Object.assign(turn, { answer: "", status: "streaming", model, sentAt: performance.now(), firstAt: null });
  assistant.dataset.status = "streaming";
  content.replaceChildren();
  meta.textContent = "";
  problem.replaceChildren();
  setBusy(true);
  const handlers = {
    chunk(text) {
      turn.firstAt ??= performance.now();
      turn.answer += text;
      follow(() => renderMarkdown(turn.answer, content));
    },
    done(frame) {
      end(turn, "done");
      meta.textContent = figures(turn, frame, performance.now());
    },
    error(error) {
      const stopped = error.code === "cancelled";
      end(turn, stopped ? "stopped" : "failed");
      if (stopped) {
        meta.textContent = `stopped after ${seconds(performance.now() - turn.sentAt)}`;
        return;
      }
      const explanation = element("p");
      explanation.append(element("strong", "", plainWords(error)), element("small", "", details(error)));
      problem.append(explanation);
      const retry = element("button", "secondary retry", "Retry");
      retry.type = "button";
      retry.onclick = () => current || run(turn);
      problem.append(retry);
      if (error.code === "unauthorized") askForApiKey();
    },
  };
  current = {
    turn,
    handle: transport() === "ws" ? ws.send(request, handlers) : streamSse(request, handlers, authHeaders()),
  };
}

function end(turn, status) {
  turn.status = status;
  turn.nodes.assistant.dataset.status = status;
  current = null;
  setBusy(false);
  follow(() => {});
}

/** Time to first token, generation speed, usage and stop reason of a finished answer. */
function figures(turn, done, doneAt) {
  const parts = [turn.model];
  if (turn.firstAt !== null) parts.push(`first token ${seconds(turn.firstAt - turn.sentAt)}`);
  const generating = (doneAt - (turn.firstAt ?? turn.sentAt)) / 1000;
  if (generating > 0 && done.usage.output_tokens > 1) {
    parts.push(`${(done.usage.output_tokens / generating).toFixed(1)} tokens/s`);
  }
  parts.push(`${done.usage.input_tokens} in / ${done.usage.output_tokens} out tokens`);
  parts.push(`stop: ${done.stop_reason}`);
  return parts.join(" · ");
}

function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function plainWords(error) {
  return PLAIN_WORDS[error?.code] ?? "Something went wrong.";
}

function details(error) {
  return [error?.code, error?.message].filter(Boolean).join(": ");
}

function describe(error) {
  return details(error) ? `${plainWords(error)} (${details(error)})` : plainWords(error);
}

function notice(text) {
  ui.conversation.querySelector(".empty")?.remove();
  ui.conversation.append(element("p", "notice", text));
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  for (const radio of document.querySelectorAll('input[name="transport"]')) radio.disabled = busy;
  for (const retry of document.querySelectorAll(".retry")) retry.disabled = busy;
}

/** Applies `change`, keeping the newest text in view if the reader was already at the bottom. */
function follow(change) {
  const page = document.scrollingElement;
  const atBottom = page.scrollHeight - page.scrollTop - page.clientHeight < 40;
  change();
  if (atBottom) page.scrollTop = page.scrollHeight;
}

function element(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || current || !ui.model.value) return;
  ui.prompt.value = "";
  run(addTurn(text));
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => current?.handle.cancel());
ui.clear.addEventListener("click", () => {
  if (current) return;
  turns.length = 0;
  ui.conversation.replaceChildren(element("p", "empty", "A new conversation."));
});
for (const radio of document.querySelectorAll('input[name="transport"]')) {
  radio.addEventListener("change", chooseTransport);
}
ui.apiKey.value = apiKey();
ui.apiKey.addEventListener("change", () => {
  const key = ui.apiKey.value.trim();
  if (key) sessionStorage.setItem(API_KEY_ITEM, key);
  else sessionStorage.removeItem(API_KEY_ITEM);
  if (transport() === "ws" && !current) ws.restart();
  if (!ui.model.value) loadModels();
});

loadModels();
