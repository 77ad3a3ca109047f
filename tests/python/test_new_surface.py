"""Today's Ollama surface through corral with the official clients: the
`anthropic` SDK (messages, streaming, tool use) and the `openai` SDK's
Responses API (create, stream, continuations with previous_response_id
across several backends), audio transcription and speech.

Run by tests/python/run.sh (three simulated backends behind corral).
"""

import os
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

URL = os.environ["CORRAL_URL"]


@pytest.fixture
def claude():
    return anthropic.Anthropic(base_url=URL, api_key="unused", max_retries=0)


@pytest.fixture
def oai():
    return openai.OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0)


MESSAGES = [{"role": "user", "content": "why is the sky blue"}]


def test_anthropic_messages_streamed_equal_whole(claude):
    whole = claude.messages.create(model="llama3.2", max_tokens=64, messages=MESSAGES)
    assert whole.id.startswith("msg_") and whole.role == "assistant"
    assert whole.content[0].type == "text" and whole.content[0].text
    assert whole.usage.output_tokens > 0
    with claude.messages.stream(model="llama3.2", max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason


def test_anthropic_tool_use_round_trip(claude):
    tools = [{
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }]
    asked = [{"role": "user", "content": "weather in Paris?"}]
    first = claude.messages.create(model="llama3.2", max_tokens=32, messages=asked, tools=tools)
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert call.type == "tool_use" and call.name == "get_weather" and "city" in call.input
    answered = asked + [
        {"role": "assistant", "content": [call.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
    ]
    second = claude.messages.create(model="llama3.2", max_tokens=32, messages=answered, tools=tools)
    assert second.content[0].type == "text" and second.content[0].text


def test_anthropic_unknown_model_is_not_found(claude):
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="ghost", max_tokens=8, messages=MESSAGES)
    assert err.value.body["error"]["type"] == "not_found_error"


def test_responses_create_and_stream(oai):
    whole = oai.responses.create(model="llama3.2", input="hello there")
    assert whole.status == "completed" and whole.output_text
    deltas = []
    completed = None
    for event in oai.responses.create(model="llama3.2", input="hello there", stream=True):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    assert "".join(deltas) == whole.output_text
    assert completed is not None and completed.output_text == whole.output_text


def test_responses_continue_on_the_backend_that_answered(oai):
    # Three slow starts at once land on the three backends; each
    # continuation must go back to its own.
    def start(i):
        raw = oai.responses.with_raw_response.create(
            model="llama3.2", input=f"start {i}", extra_headers={"x-sim-delay-ms": "400"}
        )
        return raw.headers["x-corral-backend"], raw.parse().id

    with ThreadPoolExecutor(3) as pool:
        starts = list(pool.map(start, range(3)))
    assert len({backend for backend, _ in starts}) == 3, starts
    for backend, rid in starts:
        raw = oai.responses.with_raw_response.create(model="llama3.2", input="go on", previous_response_id=rid)
        assert raw.headers["x-corral-backend"] == backend
        second = raw.parse()
        assert second.previous_response_id == rid
        stream = oai.responses.create(
            model="llama3.2", input="and then", previous_response_id=second.id, stream=True
        )
        assert [e.type for e in stream][-1] == "response.completed"


def test_responses_unknown_previous_id_is_not_found(oai):
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="llama3.2", input="x", previous_response_id="resp_never")


def test_transcription_and_speech(oai):
    t = oai.audio.transcriptions.create(model="llama3.2", file=("a.wav", b"RIFF fake wav bytes"))
    assert t.text
    speech = oai.audio.speech.create(model="llama3.2", input="hello there", voice="Harper")
    audio = speech.content
    assert audio[:4] == b"RIFF" and len(audio) == 44 + int.from_bytes(audio[40:44], "little")
