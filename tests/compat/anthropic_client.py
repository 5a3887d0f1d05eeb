"""The official `anthropic` Python package against a running modelgate, with only its base URL
changed. Run by tests/gateway/anthropic.rs, which spawns the gateway and its Bedrock emulator
(suite `bedrock`) or the local model (suite `local`):

    python anthropic_client.py SUITE BASE_URL API_KEY

Each check prints `ok: NAME`; the first failure raises and the exit status is non-zero.
"""

import asyncio
import sys

import anthropic

SUITE, BASE_URL, API_KEY = sys.argv[1:4]

client = anthropic.Anthropic(base_url=BASE_URL, api_key=API_KEY, max_retries=0)
async_client = anthropic.AsyncAnthropic(base_url=BASE_URL, api_key=API_KEY, max_retries=0)
HI = [{"role": "user", "content": "Hi"}]


def ok(name):
    print(f"ok: {name}", flush=True)


def expect_error(error_class, call, status):
    try:
        call()
    except error_class as err:
        assert err.status_code == status, (err.status_code, err)
        assert isinstance(err.body, dict) and err.body["type"] == "error", err.body
        return err
    raise AssertionError(f"expected {error_class.__name__}")


def bedrock():
    message = client.messages.create(model="anthropic", max_tokens=100, messages=HI)
    assert message.id.startswith("msg_"), message
    assert message.type == "message" and message.role == "assistant", message
    assert message.content[0].type == "text", message
    assert message.content[0].text == "Hello, world!", message
    assert message.stop_reason == "end_turn", message
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 4), message
    ok("messages.create")

    with client.messages.stream(
        model="anthropic",
        max_tokens=100,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=HI,
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "Hello, world!", pieces
    assert len(pieces) == 4, pieces
    assert final.content[0].text == "Hello, world!", final
    assert final.stop_reason == "end_turn", final
    # The input tokens are known at the end: message_delta carries them.
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 4), final
    ok("messages.stream + get_final_message")

    events = [
        event.type
        for event in client.messages.create(
            model="anthropic", max_tokens=100, messages=HI, stream=True
        )
    ]
    assert events[:3] == ["message_start", "content_block_start", "content_block_delta"], events
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"], events
    ok("messages.create(stream=True)")

    count = client.messages.count_tokens(model="anthropic", messages=HI, system="Be brief.")
    assert count.input_tokens == 7, count
    ok("messages.count_tokens")

    async def async_calls():
        message = await async_client.messages.create(model="anthropic", max_tokens=100, messages=HI)
        assert message.content[0].text == "Hello, world!", message
        async with async_client.messages.stream(
            model="anthropic", max_tokens=100, messages=HI
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "Hello, world!" and final.usage.input_tokens == 7, (text, final)

    asyncio.run(async_calls())
    ok("AsyncAnthropic create and stream")

    err = expect_error(
        anthropic.BadRequestError,
        lambda: client.messages.create(model="anthropic", max_tokens=5000, messages=HI),
        400,
    )
    assert "max_tokens" in str(err), err
    expect_error(
        anthropic.BadRequestError,
        lambda: client.messages.create(
            model="anthropic",
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
                    ],
                }
            ],
        ),
        400,
    )
    expect_error(
        anthropic.NotFoundError,
        lambda: client.messages.create(model="nope", max_tokens=10, messages=HI),
        404,
    )
    wrong_key = anthropic.Anthropic(base_url=BASE_URL, api_key="wrong", max_retries=0)
    expect_error(
        anthropic.AuthenticationError,
        lambda: wrong_key.messages.create(model="anthropic", max_tokens=10, messages=HI),
        401,
    )
    expect_error(
        anthropic.RateLimitError,
        lambda: client.messages.create(model="throttled", max_tokens=10, messages=HI),
        429,
    )
    expect_error(
        anthropic.InternalServerError,
        lambda: client.messages.create(model="busy", max_tokens=10, messages=HI),
        503,
    )
    expect_error(
        anthropic.BadRequestError,
        lambda: client.messages.count_tokens(model="llama3", messages=HI),
        400,
    )
    ok("error classes")

    tools = [
        {
            "name": "weather",
            "description": "The weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    question = [{"role": "user", "content": "Weather in Paris?"}]
    message = client.messages.create(
        model="claude-tools", max_tokens=100, tools=tools, messages=question
    )
    assert message.stop_reason == "tool_use", message
    assert [block.type for block in message.content] == ["text", "tool_use"], message
    assert message.content[1].name == "weather", message
    assert message.content[1].input == {"city": "Paris"}, message
    with client.messages.stream(
        model="claude-tools", max_tokens=100, tools=tools, messages=question
    ) as stream:
        fragments = [event.partial_json for event in stream if event.type == "input_json"]
        final = stream.get_final_message()
    assert len(fragments) == 3, fragments
    assert final.content[1].input == {"city": "Paris"}, final
    call = final.content[1]
    answer_turn = question + [
        {"role": "assistant", "content": final.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18°C"}],
        },
    ]
    client.messages.create(model="claude-tools", max_tokens=100, tools=tools, messages=answer_turn)
    ok("tools: a tool_use block, its input streamed, a tool_result round trip")

    thinking = {"type": "enabled", "budget_tokens": 1024}
    with client.messages.stream(
        model="claude-thinking", max_tokens=2048, thinking=thinking, messages=HI
    ) as stream:
        thought = "".join(event.thinking for event in stream if event.type == "thinking")
        final = stream.get_final_message()
    assert thought == "The user greets me.", thought
    assert final.content[0].type == "thinking", final
    assert final.content[0].signature == "sig-abc==", final
    assert final.content[1].text == "Hello!", final
    client.messages.create(
        model="claude-thinking",
        max_tokens=2048,
        thinking=thinking,
        messages=HI
        + [
            {"role": "assistant", "content": final.content},
            {"role": "user", "content": "And?"},
        ],
    )
    ok("thinking: thinking and signature streamed, sent back in the next turn")

    png = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    message = client.messages.create(
        model="claude-thinking",
        max_tokens=100,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                ],
            }
        ],
    )
    assert message.content[-1].text == "Hello!", message
    ok("an image")

    try:
        with client.messages.stream(model="broken", max_tokens=10, messages=HI) as stream:
            for _ in stream.text_stream:
                pass
        raise AssertionError("the stream should have failed")
    except anthropic.APIStatusError as err:
        assert err.body["error"]["type"] == "api_error", err.body
    ok("an error after the stream began")


def local():
    message = client.messages.create(model="local", max_tokens=8, messages=HI)
    assert message.content and message.content[0].type == "text", message
    assert 1 <= message.usage.output_tokens <= 8, message
    ok("messages.create (local)")

    with client.messages.stream(model="local", max_tokens=8, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text, (text, final)
    count = client.messages.count_tokens(model="local", messages=HI)
    assert count.input_tokens == final.usage.input_tokens > 0, (count, final)
    ok("messages.stream and count_tokens (local)")

    err = expect_error(
        anthropic.BadRequestError,
        lambda: client.messages.create(
            model="local",
            max_tokens=8,
            messages=HI,
            tools=[{"name": "weather", "input_schema": {"type": "object"}}],
        ),
        400,
    )
    assert "cannot take `tools`" in str(err), err
    err = expect_error(
        anthropic.BadRequestError,
        lambda: client.messages.create(
            model="local",
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                        }
                    ],
                }
            ],
        ),
        400,
    )
    assert "cannot take `image`" in str(err), err
    ok("tools and images are a clear 400 (local)")


{"bedrock": bedrock, "local": local}[SUITE]()
