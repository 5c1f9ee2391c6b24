"""The official `anthropic` SDK against `helexa up`: messages (stream and not), tool_use
round trip, count_tokens, unknown beta headers, and Claude-style model names (glob aliases)."""

import json

import pytest

from conftest import MODEL, reference

REF = reference()["prompts"]
# This SDK version has no `temperature` parameter; the API still takes the field.
GREEDY = {"temperature": 0}


def weather_tool():
    function = REF["tools"]["tools"][0]["function"]
    return {"name": function["name"], "description": function["description"],
            "input_schema": function["parameters"]}


def oslo():
    return [{"role": "user", "content": REF["tools"]["messages"][0]["content"]}]


def test_message(claude):
    chat = REF["chat"]
    message = claude.messages.create(
        model=MODEL, max_tokens=24, extra_body=GREEDY, system=chat["messages"][0]["content"],
        messages=[chat["messages"][1]])
    assert message.role == "assistant" and message.type == "message"
    text = "".join(b.text for b in message.content if b.type == "text")
    assert text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_message_stream(claude):
    with claude.messages.stream(
        model=MODEL, max_tokens=24, extra_body=GREEDY,
        messages=[{"role": "user", "content": "What is ownership in Rust?"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip()
    assert "".join(b.text for b in final.content if b.type == "text") == text
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_tool_use_round_trip(claude):
    first = claude.messages.create(
        model=MODEL, max_tokens=64, extra_body=GREEDY, tools=[weather_tool()], messages=oslo())
    assert first.stop_reason == "tool_use", first
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert (call.name, call.input) == ("get_weather", {"city": "Oslo"})
    assert call.id
    messages = oslo() + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": json.dumps({"temperature_c": 7, "sky": "cloudy"})}]},
    ]
    second = claude.messages.create(
        model=MODEL, max_tokens=48, extra_body=GREEDY, tools=[weather_tool()], messages=messages)
    text = "".join(b.text for b in second.content if b.type == "text")
    assert text.strip(), second
    assert second.stop_reason in ("end_turn", "max_tokens")


def test_tool_use_stream(claude):
    with claude.messages.stream(
        model=MODEL, max_tokens=64, extra_body=GREEDY, tools=[weather_tool()], messages=oslo(),
    ) as stream:
        final = stream.get_final_message()
    [call] = [b for b in final.content if b.type == "tool_use"]
    assert (call.name, call.input) == ("get_weather", {"city": "Oslo"})
    assert final.stop_reason == "tool_use"


def test_count_tokens_is_the_real_prompt_count(claude, stack):
    """count_tokens covers system and tools: it equals the tokens of the prompt the node
    renders (the node's own /tokenize of the same conversation), and the input_tokens a
    real request reports."""
    system = "You are a concise assistant."
    counted = claude.messages.count_tokens(
        model=MODEL, system=system, tools=[weather_tool()], messages=oslo()).input_tokens
    status, rendered = stack.post_json(f"{stack.node}/tokenize", {
        "model": MODEL, "add_generation_prompt": True, "tools": REF["tools"]["tools"],
        "messages": [{"role": "system", "content": system}] + REF["tools"]["messages"]})
    assert status == 200, rendered
    assert counted == rendered["count"]
    used = claude.messages.create(
        model=MODEL, max_tokens=1, system=system, tools=[weather_tool()], messages=oslo())
    # Anthropic usage splits the prompt into fresh and cache-read tokens.
    assert used.usage.input_tokens + (used.usage.cache_read_input_tokens or 0) == counted
    # Without a system prompt the count is the fixture's known prompt length.
    bare = claude.messages.count_tokens(model=MODEL, tools=[weather_tool()], messages=oslo())
    assert bare.input_tokens == len(REF["tools"]["token_ids"])


def test_unknown_beta_headers_are_tolerated(claude):
    message = claude.messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"anthropic-beta": "made-up-feature-2099-01-01,context-1m-2025-08-07"})
    assert message.content
    beta = claude.beta.messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
        betas=["interleaved-thinking-2025-05-14", "not-a-real-beta"])
    assert beta.content


@pytest.mark.parametrize("name", [
    "claude-opus-4-1-20250805", "claude-sonnet-4-6", "claude-3-5-haiku-20241022"])
def test_claude_model_names_reach_the_served_model(claude, name):
    message = claude.messages.create(
        model=name, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert message.content, message


def test_billing_header_does_not_break_the_prefix_cache(claude):
    """Claude Code starts its system prompt with a per-request attribution line; helexa
    drops it before templating, so two requests that differ only there share the prefix:
    the second reuses the cached prompt tokens."""
    long_system = "You are Claude Code, a coding agent. " + "Follow the repository style. " * 40

    def ask(cch):
        return claude.messages.create(
            model=MODEL, max_tokens=1, extra_body=GREEDY,
            system=[{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.0.14.{cch}; cc_entrypoint=cli; cch={cch};"},
                    {"type": "text", "text": long_system}],
            messages=[{"role": "user", "content": "hi"}])

    def prompt_tokens(message):
        return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)

    first, second = ask("a1b2c"), ask("d3e4f")
    assert prompt_tokens(first) == prompt_tokens(second) > 200
    # All of the prompt but its last few tokens comes from the prefix cache.
    cached = second.usage.cache_read_input_tokens or 0
    assert cached >= prompt_tokens(second) - 16, second.usage
