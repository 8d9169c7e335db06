"""The OpenAI API of a real `vllm serve` running our plugin, through the official `openai` client, on loopback."""

from __future__ import annotations

import openai
import pytest
import requests

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client, tiny_server):
    assert [m.id for m in client.models.list().data] == [tiny_server.model]


def test_completion_returns_the_requested_number_of_tokens(client, tiny_server):
    out = client.completions.create(
        model=tiny_server.model,
        prompt="Hello world",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason == "length"


def test_completion_is_greedy_deterministic(client, tiny_server):
    texts = {
        client.completions.create(
            model=tiny_server.model,
            prompt="On the first day",
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_chat_completion_uses_the_chat_template(client, tiny_server):
    out = client.chat.completions.create(
        model=tiny_server.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    # ChatML wraps the message: the prompt is longer than the bare text's tokens.
    bare = requests.post(f"{tiny_server.url}/tokenize", json={"model": tiny_server.model, "prompt": "Say hi"}).json()
    assert out.usage.prompt_tokens > bare["count"]


def test_streaming_chat_reports_usage_at_the_end(client, tiny_server):
    stream = client.chat.completions.create(
        model=tiny_server.model,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 10
    assert chunks[-1].usage is not None and not chunks[-1].choices
    # Deltas of a random tiny model may be empty (vLLM holds back partial characters): check the text joins up.
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model=tiny_server.model,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text == full.choices[0].message.content


def test_streaming_completion_matches_non_streaming(client, tiny_server):
    kwargs = dict(
        model=tiny_server.model,
        prompt="def is_palindrome",
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == client.completions.create(**kwargs).choices[0].text


def _assert_4xx_then_still_serving(response: requests.Response, client, tiny_server, mentions: str):
    assert 400 <= response.status_code < 500, response.text
    assert mentions in response.text.lower(), response.text
    ok = client.completions.create(model=tiny_server.model, prompt="still there?", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_prompt_longer_than_max_model_len_is_a_4xx(client, tiny_server):
    long_prompt = "the quick brown fox " * 400  # far beyond --max-model-len 512 tokens
    r = requests.post(
        f"{tiny_server.url}/v1/completions",
        json={"model": tiny_server.model, "prompt": long_prompt, "max_tokens": 4},
        timeout=60,
    )
    _assert_4xx_then_still_serving(r, client, tiny_server, mentions="length")


def test_negative_max_tokens_is_a_4xx(client, tiny_server):
    r = requests.post(
        f"{tiny_server.url}/v1/completions",
        json={"model": tiny_server.model, "prompt": "hi", "max_tokens": -5},
        timeout=60,
    )
    _assert_4xx_then_still_serving(r, client, tiny_server, mentions="max_tokens")


def test_malformed_json_is_a_4xx(client, tiny_server):
    r = requests.post(
        f"{tiny_server.url}/v1/completions",
        data='{"model": "x", "prompt": ',
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    _assert_4xx_then_still_serving(r, client, tiny_server, mentions="json")


def test_unknown_model_is_a_404(client, tiny_server):
    r = requests.post(
        f"{tiny_server.url}/v1/completions",
        json={"model": "no-such-model", "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    _assert_4xx_then_still_serving(r, client, tiny_server, mentions="no-such-model")
