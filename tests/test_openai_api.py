"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client against a real server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import REPO, ServerProcess, wait_http_healthy

SERVER_ARGS = ("--http-port", "0")
PREAMBLE = "You are the support desk of a small web shop. Answer in one sentence, cite the policy. " * 3


@pytest.fixture(scope="module")
def api(shared_server: ServerProcess) -> openai.OpenAI:
    wait_http_healthy(shared_server)
    return openai.OpenAI(base_url=f"{shared_server.info.http}/v1", api_key="unused-on-loopback", max_retries=0)


def test_the_connection_file_names_the_endpoint_and_models_lists_the_served_model(shared_server, api):
    assert shared_server.info.http.startswith("http://127.0.0.1:")
    (card,) = api.models.list().data
    assert card.id == "tiny"
    assert card.model_extra["max_model_len"] == 4096


def test_a_completion_reports_usage_and_stops_at_max_tokens(api):
    out = api.completions.create(model="tiny", prompt="Hello there, ", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    (choice,) = out.choices
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 7
    assert out.usage.prompt_tokens == 1 + len("Hello there, ".encode())  # BOS, then one token per byte
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    assert out.id.startswith("cmpl-") and out.object == "text_completion"


def test_a_stream_carries_the_same_text_as_the_whole_answer(api):
    kw = dict(model="tiny", prompt="Streaming check: ", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = api.completions.create(**kw).choices[0].text
    chunks = list(api.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == whole
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (len(with_choices) - 1)
    assert with_choices[-1].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_a_raw_stream_is_server_sent_events_ending_in_done(shared_server, api):
    body = {"model": "tiny", "prompt": "Raw: ", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{shared_server.info.http}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all("choices" in json.loads(d) for d in data[:-1])


def test_prompts_sharing_a_long_start_are_served_from_cached_blocks(api):
    api.completions.create(model="tiny", prompt=PREAMBLE + "Q: do you ship abroad?", max_tokens=2)
    second = api.completions.create(model="tiny", prompt=PREAMBLE + "Q: can I return shoes?", max_tokens=2)
    shared = 1 + len((PREAMBLE + "Q: ").encode())
    assert second.usage.prompt_tokens_details.cached_tokens == shared // 16 * 16  # the full 16-token blocks


def test_a_chat_completion_uses_the_models_chat_template(api):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = api.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    # The tiny model's ChatML: each message framed by <|im_start|>role\n ... <|im_end|>\n, then the reply's header.
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert out.usage.prompt_tokens == 1 + len(rendered.encode())
    assert out.choices[0].message.role == "assistant"
    streamed = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason in ("length", "stop")


def test_a_json_schema_response_format_constrains_the_output(api):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    out = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Is it ok?"}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )  # fmt: skip
    assert isinstance(json.loads(out.choices[0].message.content)["ok"], bool)


def test_a_guided_choice_answers_one_of_the_choices(api):
    out = api.completions.create(model="tiny", prompt="Pick: ", max_tokens=8, extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].text in ("yes", "no")


def test_a_bad_option_is_a_400_that_names_it(api):
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="tiny", prompt="x", max_tokens=-3)
    assert "max_tokens" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="tiny", prompt="x", temperature=9)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        api.completions.create(model="tiny", prompt="x", n=2)


def test_a_requests_user_names_its_application_in_the_event_log(shared_server, api):
    api.completions.create(model="tiny", prompt="x", max_tokens=2, user="alice")
    api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="bob")
    api.completions.create(model="tiny", prompt="y", max_tokens=2)
    names = [e["app_name"] for e in shared_server.events() if e.get("type") == "RequestSubmitted"][-3:]
    assert names == ["openai/completion/alice", "openai/chat/bob", "openai/completion"]
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"user": 7})
    assert err.value.body["param"] == "user"


def test_an_unknown_model_is_a_404_naming_the_served_one(api):
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        api.completions.create(model="gpt-4o", prompt="x")


def test_a_body_that_is_not_json_gets_an_openai_shaped_error(shared_server):
    r = httpx.post(f"{shared_server.info.http}/v1/completions", content=b"{nope", timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and "not valid JSON" in r.json()["error"]["message"]


def test_a_prompt_longer_than_the_model_allows_is_a_400_and_in_a_stream_an_error_event(shared_server, api):
    long_prompt = "x" * 5000  # the tiny model holds 4096 tokens, one per byte
    with pytest.raises(openai.BadRequestError, match="too long"):
        api.completions.create(model="tiny", prompt=long_prompt, max_tokens=4)
    body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{shared_server.info.http}/v1/completions", json=body, timeout=60) as r:
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert "too long" in json.loads(data[0])["error"]["message"]
    assert data[-1] == "[DONE]"
    with pytest.raises(openai.APIError, match="too long"):  # the client raises on the error event
        list(api.completions.create(model="tiny", prompt=long_prompt, max_tokens=4, stream=True))


def test_a_client_that_disconnects_mid_stream_has_its_request_cancelled(shared_server, api):
    stream = api.completions.create(model="tiny", prompt="A long answer: ", max_tokens=3000, extra_body={"ignore_eos": True}, stream=True)
    first = [next(iter(stream)) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in first)
    stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cancelled = [e for e in shared_server.events() if e.get("type") == "RequestCancelled"]
        if cancelled:
            break
        time.sleep(0.1)
    assert cancelled and "its HTTP client disconnected" in cancelled[-1]["reason"]
    finished = [e for e in shared_server.events() if e.get("type") == "RequestFinished"]
    assert cancelled[-1]["request_id"] not in {e["request_id"] for e in finished}
    # The engine is free again: a short request is answered at once.
    assert api.completions.create(model="tiny", prompt="after: ", max_tokens=2).usage.completion_tokens == 2


def test_with_an_api_key_a_request_without_it_is_refused(tmp_path):
    server = ServerProcess(tmp_path, "--http-port", "0", "--api-key", "s3cret")
    try:
        wait_http_healthy(server)  # /health needs no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.info.http}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{server.info.http}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hi ", max_tokens=2).usage.completion_tokens == 2
    finally:
        server.stop()


def test_serving_http_beyond_loopback_without_a_key_is_refused_at_start():
    proc = subprocess.run(
        [sys.executable, "-m", "engine_server", "--model", "tiny", "--http-port", "0", "--http-host", "0.0.0.0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PARROT_NB_API_KEY"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "beyond loopback: give an API key" in proc.stderr
