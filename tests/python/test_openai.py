"""The official `openai` SDK against `helexa up`: chat (stream and not), the tools round
trip, reasoning fields, the Responses API (stream and not) and the model list."""

import json

from conftest import MODEL, reference

REF = reference()["prompts"]


def tools_request():
    tools = REF["tools"]
    return {"model": MODEL, "messages": tools["messages"], "tools": tools["tools"],
            "max_tokens": 64, "temperature": 0}


def test_models_lists_the_served_model_as_loaded(oai):
    models = {m.id: m for m in oai.models.list()}
    assert MODEL in models, models
    assert models[MODEL].model_extra["loaded"] is True
    assert "claude-*" in models[MODEL].model_extra["aliases"]


def test_chat_completion(oai):
    chat = REF["chat"]
    answer = oai.chat.completions.create(
        model=MODEL, messages=chat["messages"], max_tokens=24, temperature=0,
        extra_body={"chat_template_kwargs": chat["chat_template_kwargs"]},
    )
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip(), answer
    assert choice.finish_reason in ("stop", "length")
    # The prompt is the fixture's rendered prompt, token for token.
    assert answer.usage.prompt_tokens == len(chat["token_ids"])
    assert 0 < answer.usage.completion_tokens <= 24


def test_chat_completion_stream(oai):
    chat = REF["chat"]
    stream = oai.chat.completions.create(
        model=MODEL, messages=chat["messages"], max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": chat["chat_template_kwargs"]},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text.strip()
    assert finish in ("stop", "length")
    assert usage.prompt_tokens == len(chat["token_ids"])
    # Greedy decoding: the stream says what the fixture's reference says.
    assert REF["chat"]["greedy_text"].startswith(text[:20])


def test_tools_round_trip(oai):
    first = oai.chat.completions.create(**tools_request())
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls", first
    [call] = message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert call.id
    messages = REF["tools"]["messages"] + [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"city": "Oslo", "temperature_c": 7, "sky": "cloudy"})},
    ]
    second = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=REF["tools"]["tools"], max_tokens=48, temperature=0)
    assert second.choices[0].message.content.strip(), second
    assert not second.choices[0].message.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_tool_call_streams_as_deltas(oai):
    stream = oai.chat.completions.create(**tools_request(), stream=True)
    name, arguments, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                name += call.function.name or ""
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Oslo"}, "tool_calls")


def test_reasoning_is_separated_from_content(oai):
    """The model opens a think block (greedy: an empty one, per the fixture's reference);
    the block goes to the reasoning field, never into content, which starts where the
    reference's answer after </think> starts."""
    think = REF["think"]
    answer = oai.chat.completions.create(
        model=MODEL, messages=think["messages"], max_tokens=48, temperature=0)
    message = answer.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert reasoning is None or "<think>" not in reasoning, message
    assert "<think>" not in message.content and "</think>" not in message.content
    after_think = think["greedy_text"].split("</think>", 1)[1].strip()
    assert message.content.strip()[:20] == after_think[:20], message


def test_reasoning_stream_keeps_markers_out_of_content(oai):
    think = REF["think"]
    stream = oai.chat.completions.create(
        model=MODEL, messages=think["messages"], max_tokens=48, temperature=0, stream=True)
    content = ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
    assert content.strip()
    assert "<think>" not in content and "</think>" not in content


def test_responses_api(oai):
    response = oai.responses.create(
        model=MODEL, input="What is ownership in Rust?", max_output_tokens=24, temperature=0)
    assert response.status in ("completed", "incomplete"), response
    assert response.output_text.strip()
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0


def test_responses_api_stream(oai):
    events = list(oai.responses.create(
        model=MODEL, input="What is ownership in Rust?", max_output_tokens=24, temperature=0,
        stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created", kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas.strip()
    assert events[-1].response.output_text == deltas


def test_responses_api_function_call(oai):
    tool = REF["tools"]["tools"][0]["function"]
    response = oai.responses.create(
        model=MODEL, input=REF["tools"]["messages"][0]["content"], max_output_tokens=64,
        temperature=0,
        tools=[{"type": "function", "name": tool["name"], "description": tool["description"],
                "parameters": tool["parameters"]}])
    calls = [o for o in response.output if o.type == "function_call"]
    assert len(calls) == 1, response.output
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
