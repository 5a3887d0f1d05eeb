// Browser scenarios for the chat page and Swagger UI, run by tests/browser.rs against a real
// gateway backed by the Bedrock emulator, in Debian's Chromium driven by playwright-core.
//
//   node browser-tests.mjs BASE_URL KEYED_URL SCREENSHOT_DIR RESUMABLE_URL
//   (env API_KEY: KEYED_URL's key; RESUMABLE_URL: a gateway with resume_window on, whose echo
//   model counts p1 … p20, a piece every 300 ms)
//
// One browser for every scenario (starting Chromium costs seconds); each scenario gets its own
// browser context. Prints one JSON line: [{name, passed, error?}] for the Rust test to assert.
// The emulator's models (see tests/browser.rs): echo (a Markdown answer, paced), slow (never-ending,
// paced), throttled (429 before any token), breaks (fails mid-stream), markup (HTML as text).

import assert from "node:assert/strict";
import net from "node:net";
import path from "node:path";
import { chromium } from "playwright-core";

// KEYED_URL is a second gateway, which wants the API key API_KEY.
const [base, keyed, screenshots, resumable] = process.argv.slice(2);
const origin = new URL(base).origin;
const WAIT_MS = 20_000;

// What the `echo` model answers, as the page shows it once rendered.
const ECHO_TEXT = "Here is a list:one itemtwo itemsfn main() {}Done.";

// Playwright starts Chromium with a fresh temporary profile and deletes it on close.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

/** A fresh page with its console errors, uncaught exceptions, dialogs and WebSocket frames recorded. */
async function open(options = {}, gateway = origin) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  const seen = { errors: [], dialogs: [], sent: [], requests: [], offHost: [] };
  page.on("console", (message) => message.type() === "error" && seen.errors.push(message.text()));
  page.on("pageerror", (error) => seen.errors.push(String(error)));
  page.on("dialog", (dialog) => {
    seen.dialogs.push(dialog.message());
    dialog.dismiss();
  });
  page.on("websocket", (socket) => socket.on("framesent", (frame) => seen.sent.push(frame.payload)));
  page.on("request", (request) => seen.requests.push(`${request.method()} ${new URL(request.url()).pathname}`));
  // Nothing may leave the machine: the page must work offline, and the tests must never reach
  // the internet. Anything not for the gateway is refused and remembered.
  await context.route(
    (url) => url.origin !== gateway && url.protocol !== "data:",
    (route) => {
      seen.offHost.push(route.request().url());
      return route.abort();
    },
  );
  return { context, page, seen };
}

async function chat(page, { transport = "ws", model = "echo", url = base } = {}) {
  await page.goto(url);
  await page.locator("#model option").first().waitFor({ state: "attached" });
  await page.selectOption("#model", model);
  await page.check(`input[name="transport"][value="${transport}"]`);
  if (transport === "ws") await waitForText(page, "#connection", "connected");
}

async function send(page, text) {
  await page.fill("#prompt", text);
  await page.press("#prompt", "Enter");
}

const lastAnswer = ".turn.assistant:last-of-type";

async function waitForStatus(page, status) {
  await page.waitForSelector(`${lastAnswer}[data-status="${status}"]`);
}

async function waitForText(page, selector, text) {
  await page.waitForFunction(
    ([selector, text]) => document.querySelector(selector)?.textContent.includes(text),
    [selector, text],
  );
}

/** Records every distinct text of the newest answer while it streams. */
async function recordStreaming(page) {
  await page.evaluate(() => {
    window.streamed = [];
    new MutationObserver(() => {
      const answer = [...document.querySelectorAll(".turn.assistant")].at(-1);
      const text = answer?.querySelector(".content").textContent;
      if (answer?.dataset.status === "streaming" && text && text !== window.streamed.at(-1)) {
        window.streamed.push(text);
      }
    }).observe(document.querySelector("#conversation"), { subtree: true, childList: true, characterData: true });
  });
}

async function expectFinishedAnswer(page) {
  assert.equal(await page.textContent(`${lastAnswer} .content`), ECHO_TEXT);
  const meta = await page.textContent(`${lastAnswer} .meta`);
  for (const figure of [/first token \d+(\.\d+)? (ms|s)/, /[\d.]+ tokens\/s/, /7 in \/ 5 out tokens/, /stop: end_turn/]) {
    assert.match(meta, figure);
  }
  await page.locator("#send").waitFor({ state: "visible" });
}

function expectClean(seen) {
  assert.deepEqual(seen.errors, [], "console errors");
  assert.deepEqual(seen.offHost, [], "requests that left the gateway");
}

async function screenshot(page, name) {
  await page.screenshot({ path: path.join(screenshots, `${name}.png`), fullPage: true });
}

const scenarios = {
  async page_loads_without_console_errors() {
    const { page, seen, context } = await open();
    await chat(page);
    const models = await page.$$eval("#model option", (options) => options.map((o) => o.value));
    assert.deepEqual(models, ["echo", "slow", "throttled", "breaks", "markup"]);
    assert.equal(await page.getAttribute('a[href="/docs"]', "href"), "/docs");
    assert.equal(await page.getAttribute('a[href="/openapi.json"]', "href"), "/openapi.json");
    expectClean(seen);
    await context.close();
  },

  async websocket_answer_streams_in_and_shows_figures() {
    const { page, seen, context } = await open();
    await chat(page);
    await page.click("#settings summary");
    await page.fill("#system", "Answer in lists.");
    await page.fill("#max_tokens", "100");
    await page.fill("#temperature", "0.2");
    await recordStreaming(page);
    await send(page, "First question");
    await page.locator(`${lastAnswer} .typing`).waitFor({ state: "visible" });
    await waitForStatus(page, "done");
    const streamed = await page.evaluate(() => window.streamed);
    assert.ok(streamed.length >= 3, `intermediate states: ${JSON.stringify(streamed)}`);
    assert.ok(streamed.slice(0, -1).every((text, i) => streamed[i + 1].startsWith(text)), JSON.stringify(streamed));
    await expectFinishedAnswer(page);
    await page.locator(`${lastAnswer} .typing`).waitFor({ state: "hidden" });
    assert.equal(await page.locator(`${lastAnswer} ul > li`).count(), 2, "a Markdown list");
    assert.equal(await page.textContent(`${lastAnswer} pre > code`), "fn main() {}", "a code block");
    await send(page, "Second question");
    await waitForStatus(page, "done");
    assert.equal(await page.locator(".turn.assistant").count(), 2);
    const requests = seen.sent.map((frame) => JSON.parse(frame));
    assert.equal(requests.length, 2, "one WebSocket message per question");
    assert.deepEqual(requests[1].messages.map((m) => m.role), ["user", "assistant", "user"]);
    assert.ok(!seen.requests.some((r) => r.includes("/stream")), "nothing went over SSE");
    expectClean(seen);
    await context.close();
  },

  async sse_answer_streams_in_and_shows_figures() {
    const { page, seen, context } = await open();
    await chat(page, { transport: "sse" });
    await recordStreaming(page);
    await send(page, "Over SSE");
    await waitForStatus(page, "done");
    assert.ok((await page.evaluate(() => window.streamed)).length >= 2, "the answer grew while streaming");
    await expectFinishedAnswer(page);
    assert.ok(seen.requests.includes("POST /stream"), JSON.stringify(seen.requests));
    assert.deepEqual(seen.sent, [], "nothing went over the WebSocket");
    expectClean(seen);
    await context.close();
  },

  async websocket_stop_cancels_the_answer() {
    await stopScenario("ws");
  },

  async sse_stop_aborts_the_answer() {
    await stopScenario("sse");
  },

  async upstream_error_shows_in_the_conversation_with_retry() {
    const { page, seen, context } = await open();
    await chat(page, { model: "throttled" });
    await send(page, "Are you busy?");
    await waitForStatus(page, "failed");
    await waitForText(page, `${lastAnswer} .problem`, "The model is busy right now");
    assert.match(await page.textContent(`${lastAnswer} .problem`), /The model is busy right now\.throttled: .*Rate exceeded/);
    await page.selectOption("#model", "echo");
    await page.click(`${lastAnswer} .retry`);
    await waitForStatus(page, "done");
    await expectFinishedAnswer(page);
    assert.equal(await page.locator(".turn.assistant").count(), 1, "the retry answered in place");
    assert.equal(seen.sent.length, 2);
    expectClean(seen);
    await context.close();
  },

  async error_midway_over_sse_keeps_the_partial_answer() {
    const { page, seen, context } = await open();
    await chat(page, { transport: "sse", model: "breaks" });
    await send(page, "Try");
    await waitForStatus(page, "failed");
    assert.equal(await page.textContent(`${lastAnswer} .content`), "Partial answer");
    assert.match(await page.textContent(`${lastAnswer} .problem`), /The model's service failed\.upstream_error: /);
    await page.locator(`${lastAnswer} .retry`).waitFor({ state: "visible" });
    expectClean(seen);
    await context.close();
  },

  async lost_websocket_reconnects_and_retry_answers() {
    const proxy = await severableProxy();
    const { page, seen, context } = await open({}, proxy.url);
    await chat(page, { model: "slow", url: proxy.url });
    await page.evaluate(() => {
      const connection = document.querySelector("#connection");
      window.connection = [];
      new MutationObserver(() => window.connection.push(connection.textContent)).observe(connection, {
        childList: true,
      });
    });
    await send(page, "Go on forever");
    await waitForText(page, `${lastAnswer} .content`, "word1 ");
    proxy.cut();
    await waitForStatus(page, "failed");
    await waitForText(page, `${lastAnswer} .problem`, "The connection to the gateway was lost");
    await waitForText(page, "#connection", "connected (WebSocket)");
    const states = await page.evaluate(() => window.connection);
    assert.deepEqual(states.slice(0, 1), ["disconnected, retrying in 1 s"], JSON.stringify(states));
    assert.equal(states.at(-1), "connected (WebSocket)");
    await page.selectOption("#model", "echo");
    await page.click(`${lastAnswer} .retry`);
    await waitForStatus(page, "done");
    await expectFinishedAnswer(page);
    assert.deepEqual(seen.offHost, []);
    await context.close();
    await proxy.close();
  },

  async api_key_is_asked_for_and_kept_for_the_tab_only() {
    const { page, seen, context } = await open({}, new URL(keyed).origin);
    await page.goto(keyed);
    await waitForText(page, "#connection", "API key needed");
    assert.equal(await page.evaluate(() => document.activeElement.id), "api_key", "the key field is offered");
    await send(page, "Hello?");
    await waitForStatus(page, "failed");
    await waitForText(page, `${lastAnswer} .problem`, "The gateway needs a valid API key");
    await page.fill("#api_key", process.env.API_KEY);
    await page.press("#api_key", "Tab");
    await waitForText(page, "#connection", "connected (WebSocket)");
    await page.click(`${lastAnswer} .retry`);
    await waitForStatus(page, "done");
    await expectFinishedAnswer(page);
    await page.check('input[name="transport"][value="sse"]');
    await send(page, "And over SSE?");
    await waitForStatus(page, "done");
    await expectFinishedAnswer(page);
    await page.reload();
    await waitForText(page, "#connection", "connected (WebSocket)");
    assert.equal(await page.evaluate(() => localStorage.length), 0, "nothing outlives the session");
    const otherTab = await context.newPage();
    await otherTab.goto(keyed);
    await waitForText(otherTab, "#connection", "API key needed");
    assert.equal(await otherTab.inputValue("#api_key"), "");
    assert.deepEqual(seen.offHost, []);
    await context.close();
  },

  async model_markup_is_shown_as_text() {
    const { page, seen, context } = await open();
    await chat(page, { model: "markup" });
    await send(page, "Show me HTML");
    await waitForStatus(page, "done");
    const text = await page.textContent(`${lastAnswer} .content`);
    assert.ok(text.includes("<img src=x onerror=alert(1)>"), text);
    assert.ok(text.includes("<script>alert(2)</script>"), text);
    assert.equal(await page.locator("#conversation img, #conversation script, #conversation b").count(), 0);
    assert.equal(await page.textContent(`${lastAnswer} strong`), "bold", "the Markdown subset still applies");
    assert.equal(await page.textContent(`${lastAnswer} p > code`), "<b>code</b>");
    assert.deepEqual(seen.dialogs, [], "no script ran");
    expectClean(seen);
    await context.close();
  },

  async screenshots_desktop_and_phone_light_and_dark() {
    const layouts = {
      desktop: { viewport: { width: 1280, height: 800 } },
      phone: { viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true },
    };
    for (const [layout, options] of Object.entries(layouts)) {
      for (const colorScheme of ["light", "dark"]) {
        const { page, seen, context } = await open({ ...options, colorScheme });
        await chat(page);
        await send(page, "Show me a list and some code, please.");
        await waitForStatus(page, "done");
        await page.selectOption("#model", "throttled");
        await send(page, "And now?");
        await waitForStatus(page, "failed");
        await page.selectOption("#model", "echo");
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        assert.ok(overflow <= 0, `${layout}: the page scrolls sideways by ${overflow}px`);
        await screenshot(page, `chat-${layout}-${colorScheme}`);
        expectClean(seen);
        await context.close();
      }
    }
  },

  async eventsource_reconnects_by_itself_and_resumes_every_event_once() {
    const proxy = await severableProxy(resumable);
    const { page, seen, context } = await open({}, proxy.url);
    await page.goto(proxy.url);
    // The connection is cut after the fifth event, as a network failure would.
    await page.exposeFunction("cutConnection", () => proxy.cut());
    const { events, errors, streamId } = await page.evaluate(
      () =>
        new Promise((resolve) => {
          const events = [];
          let errors = 0;
          const source = new EventSource("/stream?model=echo&prompt=count");
          source.addEventListener("chunk", (event) => {
            events.push([event.lastEventId, JSON.parse(event.data).text]);
            if (events.length === 5) window.cutConnection();
          });
          source.addEventListener("done", (event) => {
            events.push([event.lastEventId, JSON.parse(event.data).type]);
            source.close();
            resolve({ events, errors, streamId: events[0][0].split(":")[0] });
          });
          // EventSource reports the lost connection, then reconnects by itself.
          source.addEventListener("error", () => errors++);
        }),
    );
    const expected = Array.from({ length: 20 }, (_, n) => [`${streamId}:${n + 1}`, `p${n + 1}`]);
    expected.push([`${streamId}:21`, "done"]);
    assert.deepEqual(events, expected, "every event once, in order, across the reconnection");
    assert.equal(errors, 1, "one lost connection, one reconnection");
    assert.match(streamId, /^[0-9a-f]{32}$/);
    assert.deepEqual(seen.dialogs, []);
    await context.close();
    await proxy.close();
  },

  async swagger_ui_try_it_out_invokes_a_model() {
    const { page, seen, context } = await open({ viewport: { width: 1280, height: 900 } });
    await page.goto(`${base}/docs`);
    const operation = page.locator("#operations-default-invoke");
    await operation.locator(".opblock-summary").click();
    await operation.getByRole("button", { name: "Try it out" }).click();
    await operation.locator("textarea.body-param__text").fill(JSON.stringify({ model: "echo", prompt: "Hi" }));
    await operation.getByRole("button", { name: "Execute" }).click();
    const live = operation.locator(".live-responses-table .response");
    await live.locator(".response-col_status").filter({ hasText: "200" }).waitFor();
    const body = JSON.parse(await live.locator(".response-col_description pre").first().textContent());
    assert.equal(body.model, "echo");
    assert.equal(body.stop_reason, "end_turn");
    assert.ok(body.text.startsWith("Here is a list:"), body.text);
    await live.scrollIntoViewIfNeeded();
    await page.screenshot({ path: path.join(screenshots, "docs-invoke-try-it-out.png") });
    expectClean(seen);
    await context.close();
  },
};

/** A TCP proxy in front of a gateway whose connections can be cut, as a network failure would. */
async function severableProxy(gatewayUrl = base) {
  const gateway = new URL(gatewayUrl);
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(gateway.port), gateway.hostname);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on("close", () => sockets.delete(socket));
      socket.on("error", () => {});
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const cut = () => sockets.forEach((socket) => socket.destroy());
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut,
    close: () => {
      cut();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

async function stopScenario(transport) {
  const { page, seen, context } = await open();
  await chat(page, { transport, model: "slow" });
  await send(page, "Count forever");
  await waitForText(page, `${lastAnswer} .content`, "word1 ");
  await page.click("#stop");
  await waitForStatus(page, "stopped");
  assert.match(await page.textContent(`${lastAnswer} .meta`), /stopped after/);
  assert.match(await page.textContent(`${lastAnswer} .content`), /^word0 word1 /);
  await page.locator("#send").waitFor({ state: "visible" });
  if (transport === "ws") assert.deepEqual(JSON.parse(seen.sent.at(-1)), { type: "cancel" });
  expectClean(seen);
  await context.close();
}

const results = [];
try {
  for (const [name, scenario] of Object.entries(scenarios)) {
    try {
      await scenario();
      results.push({ name, passed: true });
    } catch (error) {
      results.push({ name, passed: false, error: String(error.stack ?? error) });
    }
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(results));
