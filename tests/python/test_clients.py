"""The official Python clients (`ollama`, `openai`) through corral.

Run by tests/python/run.sh, which starts `corral sim` and `corral serve` and
sets CORRAL_URL. Every simulated backend has seed 0, so an answer depends only
on the model and the prompt: streamed and non-streamed answers must agree.
"""

import base64
import os
import struct

import ollama
import openai
import pytest

URL = os.environ["CORRAL_URL"]


@pytest.fixture
def client():
    return ollama.Client(host=URL)


@pytest.fixture
def oai():
    return openai.OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0)


def test_generate_streamed_equals_generate_whole(client):
    whole = client.generate(model="llama3.2", prompt="why is the sky blue")
    assert whole.done and whole.response
    parts = list(client.generate(model="llama3.2", prompt="why is the sky blue", stream=True))
    assert parts[-1].done
    assert "".join(p.response for p in parts) == whole.response


def test_chat_streams_and_not(client):
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat(model="llama3.2", messages=messages)
    assert whole.message.role == "assistant" and whole.message.content
    parts = list(client.chat(model="llama3.2", messages=messages, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content


def test_embed_list_ps_show_version(client):
    e = client.embed(model="all-minilm", input=["a", "b"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 16
    names = sorted(m.model for m in client.list().models)
    assert names == ["all-minilm:latest", "llama3.2:latest"]
    assert client.ps().models is not None
    assert client.show("llama3.2").modelinfo is not None


def test_unknown_model_raises_response_error_404(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="ghost", prompt="hi")
    assert err.value.status_code == 404
    assert "ghost" in err.value.error


def test_model_management_is_refused(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("llama3.2")
    assert err.value.status_code == 403


def test_openai_chat_stream_and_not(oai):
    messages = [{"role": "user", "content": "hi there"}]
    whole = oai.chat.completions.create(model="llama3.2", messages=messages)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason == "stop"
    stream = oai.chat.completions.create(model="llama3.2", messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_openai_completions_embeddings_models(oai):
    c = oai.completions.create(model="llama3.2", prompt="say something")
    assert c.choices[0].text
    # openai-python asks for base64 unless told otherwise.
    e = oai.embeddings.create(model="all-minilm", input="x")
    vector = e.data[0].embedding
    if isinstance(vector, str):
        vector = struct.unpack("<16f", base64.b64decode(vector))
    assert len(vector) == 16
    ids = sorted(m.id for m in oai.models.list().data)
    assert ids == ["all-minilm:latest", "llama3.2:latest"]


def test_openai_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])
