"""The official `openai` SDK and LangChain's `ChatOpenAI` against a running modelgate.

Run by tests/gateway/openai_compat.rs, which starts the gateway and sets:
  MODELGATE_URL       the gateway's base URL (the SDK's base_url is it + /v1)
  MODELGATE_KEY       a key the gateway knows (any text on a gateway without keys)
  MODELGATE_MODEL     the model to ask
  MODELGATE_LIMITED   optional: a key allowed one request a minute (RateLimitError)
  MODELGATE_CAN       what the model takes besides text: "tools,images" or "" (then tools
                      and images must be refused with BadRequestError naming them)
  MODELGATE_TOOL_MODEL  optional: the model to ask for tool calls (one that calls them)
Prints one line per check and exits non-zero if any failed.
"""

import asyncio
import base64
import json
import os
import sys
import traceback

import openai
from langchain_openai import ChatOpenAI

URL = os.environ["MODELGATE_URL"] + "/v1"
KEY = os.environ["MODELGATE_KEY"]
MODEL = os.environ["MODELGATE_MODEL"]
LIMITED = os.environ.get("MODELGATE_LIMITED")
CAN = set(filter(None, os.environ.get("MODELGATE_CAN", "").split(",")))
TOOL_MODEL = os.environ.get("MODELGATE_TOOL_MODEL", MODEL)

# A 1x1 PNG.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201"
        "e2b5d1e90000000049454e44ae426082"
    )
).decode()

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=120)
aclient = openai.AsyncOpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=120)
ASK = [{"role": "user", "content": "What is the capital of France? One word."}]
checks = []


def check(function):
    checks.append(function)
    return function


def expect(condition, what):
    if not condition:
        raise AssertionError(what)


def expect_usage(usage):
    expect(usage is not None, "usage is given")
    expect(usage.prompt_tokens > 0 and usage.completion_tokens > 0, f"token counts: {usage}")
    expect(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"total is the sum: {usage}",
    )


@check
def sync_whole():
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=20, temperature=0
    )
    expect(completion.object == "chat.completion", completion)
    expect(completion.id.startswith("chatcmpl-"), completion.id)
    choice = completion.choices[0]
    expect(choice.message.role == "assistant", choice)
    expect(choice.message.content, f"some text: {choice}")
    expect(choice.finish_reason in ("stop", "length"), choice.finish_reason)
    expect_usage(completion.usage)


@check
def sync_stream_with_usage():
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_completion_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expect(chunks[0].choices[0].delta.role == "assistant", chunks[0])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expect(text, "some text")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expect(finishes in (["stop"], ["length"]), finishes)
    expect(chunks[-1].choices == [], "the last chunk has no choices")
    expect_usage(chunks[-1].usage)


@check
def async_whole_and_stream():
    async def run():
        completion = await aclient.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20)
        expect(completion.choices[0].message.content, completion)
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=20, stream=True
        )
        pieces = [chunk async for chunk in stream]
        expect(all(c.usage is None for c in pieces), "no usage without include_usage")
        expect("".join(c.choices[0].delta.content or "" for c in pieces), "some text")

    asyncio.run(run())


@check
def models():
    ids = [model.id for model in client.models.list()]
    expect(MODEL in ids, ids)
    expect(client.models.retrieve(MODEL).id == MODEL, "retrieve")


@check
def bad_request_names_the_parameter():
    try:
        client.chat.completions.create(model=MODEL, messages=ASK, n=2)
    except openai.BadRequestError as err:
        expect(err.param == "n", f"param: {err.param}")
        return
    raise AssertionError("n=2 was accepted")


@check
def not_found():
    try:
        client.chat.completions.create(model="no-such-model", messages=ASK)
    except openai.NotFoundError as err:
        expect(err.code == "model_not_found", err.code)
        return
    raise AssertionError("an unknown model was served")


if LIMITED:

    @check
    def authentication():
        wrong = openai.OpenAI(base_url=URL, api_key="sk-wrong", max_retries=0)
        try:
            wrong.chat.completions.create(model=MODEL, messages=ASK)
        except openai.AuthenticationError:
            return
        raise AssertionError("a wrong key was accepted")

    @check
    def rate_limit():
        limited = openai.OpenAI(base_url=URL, api_key=LIMITED, max_retries=0)
        limited.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5)
        try:
            limited.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5)
        except openai.RateLimitError as err:
            expect(int(err.response.headers["retry-after"]) > 0, "Retry-After")
            return
        raise AssertionError("a second request in the minute was served")


def ask_tool(**options):
    return client.chat.completions.create(
        model=TOOL_MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        **options,
    )


def ask_image():
    return client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            }
        ],
    )


if "tools" in CAN:

    @check
    def tools_round_trip():
        completion = ask_tool(tool_choice="required")
        choice = completion.choices[0]
        expect(choice.finish_reason == "tool_calls", choice)
        call = choice.message.tool_calls[0]
        expect(call.function.name == "weather", call)
        expect(isinstance(json.loads(call.function.arguments), dict), call.function.arguments)
        answer = client.chat.completions.create(
            model=TOOL_MODEL,
            tools=[WEATHER],
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18°C and sunny"},
            ],
        )
        expect(answer.choices[0].message.content, answer)

    @check
    def tools_streamed():
        stream = ask_tool(stream=True, tool_choice={"type": "function", "function": {"name": "weather"}})
        calls = {}
        for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = entry["id"] or call.id
                entry["name"] = entry["name"] or (call.function.name if call.function else None)
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
        expect(calls and calls[0]["name"] == "weather" and calls[0]["id"], calls)
        expect(isinstance(json.loads(calls[0]["arguments"]), dict), calls)

else:

    @check
    def tools_are_refused():
        try:
            ask_tool()
        except openai.BadRequestError as err:
            expect("cannot take `tools`" in err.message, err.message)
            return
        raise AssertionError("tools were accepted by a model that cannot take them")


if "images" in CAN:

    @check
    def image():
        completion = ask_image()
        expect(completion.choices[0].message.content, completion)

else:

    @check
    def images_are_refused():
        try:
            ask_image()
        except openai.BadRequestError as err:
            expect("cannot take `image`" in err.message, err.message)
            return
        raise AssertionError("an image was accepted by a model that cannot take it")


@check
def langchain_streaming():
    llm = ChatOpenAI(
        model=MODEL, base_url=URL, api_key=KEY, max_retries=0, max_tokens=20, stream_usage=True
    )
    chunks = list(llm.stream("What is the capital of France? One word."))
    expect(len(chunks) > 1, f"{len(chunks)} chunks")
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    expect(whole.content, "some text")
    usage = whole.usage_metadata
    expect(usage and usage["input_tokens"] > 0 and usage["output_tokens"] > 0, usage)
    answer = llm.invoke("Say hello.")
    expect(answer.content, answer)


failed = 0
for function in checks:
    try:
        function()
        print(f"ok {function.__name__}", flush=True)
    except Exception:
        failed += 1
        print(f"FAILED {function.__name__}:\n{traceback.format_exc()}", flush=True)
print(f"openai {openai.__version__}: {len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
