"""LLM backends (workbench/llm.py): a real local chat-completions server, a tiny random causal LM
built here, and the rule-based shapes backend."""

import json
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workbench.errors import InvalidInput, ModelNotAvailable, WorkbenchError
from workbench.llm import (
    LLM,
    SHAPES_SKILLS,
    LLMOutputError,
    LLMRequestError,
    ask_json,
    extract_json,
    get_llm,
    local_captions,
    score_tags,
    write_prompts,
)
from workbench.prompt_parser import parse_prompt

KEY = "sk-test-0123456789-SECRET"
MESSAGES = [{"role": "user", "content": "Say hello as JSON."}]


@pytest.fixture(autouse=True)
def clean_llm_env(monkeypatch):
    for name in ("WORKBENCH_LLM_BASE_URL", "WORKBENCH_LLM_MODEL", "WORKBENCH_LLM_API_KEY", "OPENAI_API_KEY",
                 "WORKBENCH_LLM_TIMEOUT", "WORKBENCH_LLM_JSON_MODE"):
        monkeypatch.delenv(name, raising=False)


# --- a chat-completions server ------------------------------------------------------------------


def completion(content) -> tuple[int, str]:
    return 200, json.dumps({"id": "x", "object": "chat.completion",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}]})


class ChatServer:
    """Records each request (path, headers, JSON body) and plays scripted replies in order; the last
    reply repeats. A reply is (status, body) or (status, body, seconds to wait first)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.replies: list[tuple] = [completion("{}")]
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                reply = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                status, text, delay = (reply + (0,))[:3]
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(text.encode())
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    chat_server = ChatServer()
    monkeypatch.setenv("WORKBENCH_LLM_BASE_URL", chat_server.url)
    monkeypatch.setenv("WORKBENCH_LLM_MODEL", "test-model")
    monkeypatch.setenv("WORKBENCH_LLM_API_KEY", KEY)
    yield chat_server
    chat_server.close()


def no_key_anywhere(error: BaseException) -> bool:
    text = str(error) + repr(error) + "".join(traceback.format_exception(error))
    return KEY not in text


def test_openai_request_carries_model_messages_and_bearer_key(server):
    server.replies = [completion("hello there")]
    llm = get_llm("openai")
    assert isinstance(llm, LLM)
    assert llm.chat(MESSAGES, max_tokens=77, temperature=0.3) == "hello there"
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == {"model": "test-model", "messages": MESSAGES, "max_tokens": 77, "temperature": 0.3}
    assert KEY not in repr(llm) and KEY not in str(llm)


def test_openai_options_override_env_and_json_mode_is_sent_only_when_asked(server, monkeypatch):
    monkeypatch.delenv("WORKBENCH_LLM_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    get_llm("openai", model="other-model").chat(MESSAGES)
    get_llm("openai", api_key="sk-option", json_mode=True).chat(MESSAGES)
    first, second = server.requests
    assert first["body"]["model"] == "other-model" and "response_format" not in first["body"]
    assert first["headers"]["Authorization"] == "Bearer sk-fallback"
    assert second["body"]["model"] == "test-model"
    assert second["body"]["response_format"] == {"type": "json_object"}
    assert second["headers"]["Authorization"] == "Bearer sk-option"


def test_openai_without_key_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv("WORKBENCH_LLM_API_KEY")
    get_llm("openai").chat(MESSAGES)
    assert "Authorization" not in server.requests[0]["headers"]


def test_openai_needs_a_model_name(server, monkeypatch):
    monkeypatch.delenv("WORKBENCH_LLM_MODEL")
    with pytest.raises(InvalidInput, match="WORKBENCH_LLM_MODEL"):
        get_llm("openai")


def test_score_tags_reads_json_from_a_fenced_answer_with_prose(server):
    server.replies = [completion('Here you go:\n```json\n{"scores": {"red circle": 2, "Square": 0.5, "dog": 0}}\n```\nDone.')]
    scores = score_tags(get_llm("openai"), "a red circle", ["red circle", "square", "dog"])
    assert scores == {"red circle": 2.0, "square": 0.5, "dog": 0.0}
    [request] = server.requests
    payload = request["body"]["messages"][-1]["content"]
    assert '"task": "score_tags"' in payload and '"prompt": "a red circle"' in payload


def test_malformed_answer_is_corrected_on_retry(server):
    server.replies = [completion("I think red is 2 and circle is 2."), completion('{"scores": {"red": 2, "circle": 2}}')]
    assert score_tags(get_llm("openai"), "a red circle", ["red", "circle"]) == {"red": 2.0, "circle": 2.0}
    first, second = server.requests
    asked = first["body"]["messages"]
    assert second["body"]["messages"][: len(asked)] == asked
    bad, correction = second["body"]["messages"][len(asked):]
    assert bad == {"role": "assistant", "content": "I think red is 2 and circle is 2."}
    assert correction["role"] == "user" and "holds no JSON" in correction["content"]


def test_wrong_shape_is_explained_to_the_model(server):
    server.replies = [completion('{"scores": {"red": 1}}'), completion('{"scores": {"red": 0.5}}')]
    assert score_tags(get_llm("openai"), "a circle", ["red"]) == {"red": 0.5}
    correction = server.requests[1]["body"]["messages"][-1]["content"]
    assert "the score of 'red' is 1; use 2, 0.5 or 0" in correction


def test_always_malformed_raises_after_retries_plus_one_requests(server):
    server.replies = [completion("Sorry, I cannot do that.")]
    with pytest.raises(LLMOutputError) as caught:
        score_tags(get_llm("openai"), "a red circle", ["red", "circle"])
    assert len(server.requests) == 3
    message = str(caught.value)
    assert "scoring 2 tags for the prompt \"a red circle\"" in message
    assert "after 3 tries" in message and "holds no JSON" in message
    assert 'began: "Sorry, I cannot do that."' in message
    assert isinstance(caught.value, WorkbenchError) and no_key_anywhere(caught.value)

    server.requests.clear()
    with pytest.raises(LLMOutputError, match="after 1 try"):
        ask_json(get_llm("openai"), MESSAGES, lambda obj: obj, retries=0)
    assert len(server.requests) == 1


def test_server_down_gives_one_clear_message_without_the_key(monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    llm = get_llm("openai", base_url=url, model="test-model", api_key=KEY)
    with pytest.raises(LLMRequestError) as caught:
        llm.chat(MESSAGES)
    message = str(caught.value)
    assert f"{url}/chat/completions" in message and "test-model" in message and "connection refused" in message
    assert no_key_anywhere(caught.value)


@pytest.mark.parametrize("ending", ["\n", "\r\n", " "])
def test_a_key_read_with_its_line_ending_is_sent_without_it(server, monkeypatch, ending):
    monkeypatch.setenv("WORKBENCH_LLM_API_KEY", KEY + ending)  # as a CRLF .env file sets it
    server.replies = [completion("hello there")]
    assert get_llm("openai").chat(MESSAGES) == "hello there"
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("key", [KEY.replace("-", "\u2011"), KEY[:4] + " " + KEY[4:], KEY[:4] + "\n" + KEY[4:]])
def test_a_key_a_header_cannot_carry_is_named_without_showing_it(key):
    with pytest.raises(InvalidInput) as caught:
        get_llm("openai", base_url="http://127.0.0.1:9/v1", model="test-model", api_key=key).chat(MESSAGES)
    message = str(caught.value)
    assert "WORKBENCH_LLM_API_KEY" in message and "BASE_URL" not in message
    assert KEY[4:12] not in message and no_key_anywhere(caught.value)


def test_credentials_in_the_address_are_refused_without_echoing_them():
    with pytest.raises(InvalidInput) as caught:
        get_llm("openai", base_url=f"http://user:{KEY}@127.0.0.1:9/v1", model="test-model")
    assert "WORKBENCH_LLM_API_KEY" in str(caught.value) and no_key_anywhere(caught.value)


def test_http_error_names_status_and_never_echoes_the_key(server):
    server.replies = [(401, json.dumps({"error": {"message": f"Invalid key Bearer {KEY}"}}))]
    with pytest.raises(LLMRequestError) as caught:
        get_llm("openai").chat(MESSAGES)
    message = str(caught.value)
    assert "HTTP 401" in message and server.url in message and "test-model" in message
    assert "Invalid key" in message and "WORKBENCH_LLM_API_KEY" in message
    assert no_key_anywhere(caught.value)


@pytest.mark.parametrize("reply", [
    (401, "x" * 180 + f" got Bearer {KEY}"),  # an error page that echoes the header, the key across the cut
    (200, json.dumps({"echo": "y" * 175 + f"Bearer {KEY}"})),  # no chat-completions answer, quoted
])
def test_a_key_echoed_where_the_message_is_cut_short_shows_no_part_of_it(server, reply):
    server.replies = [reply]
    with pytest.raises(LLMRequestError) as caught:
        get_llm("openai").chat(MESSAGES)
    assert "..." in str(caught.value)  # the excerpt was cut
    assert KEY[:7] not in str(caught.value) + "".join(traceback.format_exception(caught.value))


def test_an_answer_that_echoes_the_key_never_shows_it(server):
    server.replies = [completion(f"no json here, you sent Bearer {KEY}")]
    llm = get_llm("openai")
    assert KEY not in llm.chat(MESSAGES)
    with pytest.raises(LLMOutputError) as caught:
        ask_json(llm, MESSAGES, lambda obj: obj, retries=1)
    assert "you sent Bearer <api key>" in str(caught.value)
    assert no_key_anywhere(caught.value) and KEY not in caught.value.answer


def test_a_malformed_address_is_one_clear_message(server, monkeypatch):
    monkeypatch.setenv("WORKBENCH_LLM_BASE_URL", "http://[::1/v1")
    with pytest.raises(InvalidInput, match="WORKBENCH_LLM_BASE_URL .* is not a usable address"):
        get_llm("openai").chat(MESSAGES)


def test_non_json_body_and_timeout_are_clear_errors(server):
    server.replies = [(200, "<html>gateway says hi</html>")]
    with pytest.raises(LLMRequestError, match="not a chat-completions response.*gateway says hi"):
        get_llm("openai").chat(MESSAGES)

    server.replies = [completion("late") + (1.0,)]
    start = time.monotonic()
    with pytest.raises(LLMRequestError, match=r"did not answer within 0.2 s") as caught:
        get_llm("openai", timeout=0.2).chat(MESSAGES)
    assert time.monotonic() - start < 0.9
    assert server.url in str(caught.value) and no_key_anywhere(caught.value)


def test_unknown_backend_lists_the_names():
    with pytest.raises(InvalidInput, match="Unknown LLM backend 'gpt'. Available: openai, transformers, shapes"):
        get_llm("gpt")


@pytest.mark.parametrize("answer, value", [
    ('{"a": 1}', {"a": 1}),
    ('```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}),
    ('Sure. {"a": "b"} Hope that helps {', {"a": "b"}),
    ("The list: [1, 2, 3].", [1, 2, 3]),
])
def test_extract_json(answer, value):
    assert extract_json(answer) == value


@pytest.mark.parametrize("answer, reason", [("", "empty"), ("no braces here", "no JSON"),
                                            ('{"a": 1,', "not valid JSON")])
def test_extract_json_reasons(answer, reason):
    with pytest.raises(ValueError, match=reason):
        extract_json(answer)


# --- a tiny local causal LM ------------------------------------------------------------------------


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def build_tiny_lm(folder, chat_template=None):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]"] + list('{}[]":,.<>') + [f"w{i}" for i in range(300)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="[EOS]")
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=2, eos_token_id=2, pad_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


class Counting:
    """Counts the calls to a backend's chat."""

    def __init__(self, llm):
        self.llm, self.calls, self.label = llm, 0, llm.label

    def chat(self, messages, **options):
        self.calls += 1
        return self.llm.chat(messages, **options)


def test_transformers_backend_returns_greedy_text_from_a_local_folder(tiny_lm, monkeypatch):
    monkeypatch.setenv("WORKBENCH_LLM_MODEL", str(tiny_lm))
    llm = get_llm("transformers")
    assert isinstance(llm, LLM)
    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]
    assert llm.format_prompt(messages) == "system: w1 w2\nuser: w3 w4 w5\nassistant:"
    text = llm.chat(messages, max_tokens=6)
    assert isinstance(text, str) and text.strip()
    assert len(llm.tokenizer(text)["input_ids"]) <= 6
    assert "assistant" not in text and "w3 w4 w5" not in text  # only the new tokens come back
    assert llm.chat(messages, max_tokens=6) == text  # temperature 0: greedy, the same every time
    assert isinstance(llm.chat(messages, max_tokens=4, temperature=1.0), str)


def test_transformers_backend_uses_the_saved_chat_template(tmp_path):
    llm = get_llm("transformers", model=str(build_tiny_lm(tmp_path / "chat", TEMPLATE)))
    assert llm.format_prompt(MESSAGES) == "<user> Say hello as JSON.\n<assistant>"
    assert isinstance(llm.chat(MESSAGES, max_tokens=3), str)


def test_ask_json_on_random_weights_fails_clearly(tiny_lm):
    llm = Counting(get_llm("transformers", model=str(tiny_lm)))
    with pytest.raises(LLMOutputError) as caught:
        ask_json(llm, MESSAGES, lambda obj: obj, retries=1, what="saying hello", max_tokens=12)
    assert llm.calls == 2
    message = str(caught.value)
    assert f"transformers model '{tiny_lm}'" in message and "saying hello after 2 tries" in message
    assert "JSON" in caught.value.reason and "Traceback" not in message


def test_missing_transformers_model_says_what_to_download(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ModelNotAvailable, match=f"The LLM folder '{missing}' does not exist"):
        get_llm("transformers", model=str(missing))
    with pytest.raises(ModelNotAvailable, match="`hf download nobody/no-such-llm`.*WORKBENCH_LLM_MODEL"):
        get_llm("transformers", model="nobody/no-such-llm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="holds no loadable causal LM"):
        get_llm("transformers", model=str(tmp_path / "empty"))


# --- the shapes backend ----------------------------------------------------------------------------


@pytest.fixture
def shapes():
    return get_llm("shapes")


def test_shapes_scores_tags_by_the_prompt(shapes):
    tags = ["circle", "red", "red circle", "blue circle", "square", "blue", "blue square", "triangle",
            "grass", "two circles"]
    assert score_tags(shapes, "a red circle to the left of a square", tags) == {
        "circle": 2.0, "red": 2.0, "red circle": 2.0,  # stated
        "blue circle": 0.0,  # the circle is said to be red
        "square": 2.0, "blue": 0.5, "blue square": 0.5,  # the square has no stated colour
        "triangle": 0.0, "grass": 0.0,  # not in the prompt
        "two circles": 2.0,  # counts are not judged
    }
    assert score_tags(shapes, "two red circles and a blue triangle", ["green", "blue", "triangle", "red triangle"]) == {
        "green": 0.0, "blue": 2.0, "triangle": 2.0, "red triangle": 0.0}
    assert score_tags(shapes, "a photo of a dog", ["dog", "brown dog", "cat"]) == {"dog": 2.0, "brown dog": 0.5, "cat": 0.0}
    # "orange" alone is the colour here, not COCO's fruit
    assert score_tags(shapes, "an orange square and a red circle", ["orange", "red", "purple"]) == {
        "orange": 2.0, "red": 2.0, "purple": 0.0}


def test_shapes_local_captions(shapes):
    assert local_captions(shapes, "two red circles to the left of a square", ["circle", "square", "triangle"]) == {
        "circle": "a red circle", "square": "a square", "triangle": "triangle"}
    assert local_captions(shapes, "an orange car above a red circle and a blue circle", ["car", "circle"]) == {
        "car": "an orange car", "circle": "a circle"}  # two circles of different colours: no colour


@pytest.mark.parametrize("skill", SHAPES_SKILLS)
def test_shapes_writes_prompts_for_each_skill(shapes, skill):
    prompts = write_prompts(shapes, skill, "", [], 6)
    assert len(prompts) == 6 == len(set(prompts))
    assert write_prompts(shapes, skill, "ignored", [], 6) == prompts  # seeded: same call, same prompts
    assert write_prompts(get_llm("shapes", seed=1), skill, "", [], 6) != prompts
    assert write_prompts(shapes, skill, "", [prompts[0]], 5)[0] != prompts[0]  # never an example
    for prompt in prompts:
        include = parse_prompt(prompt)["include"]
        if skill == "counting":
            assert len(include) == 1 and include[0]["count"] >= 2, prompt
        elif skill == "spatial":
            assert len(include) == 2 and "position" in include[1], prompt
        elif skill == "color_binding":
            assert len(include) == 2 and include[0]["color"] != include[1]["color"], prompt
        elif skill == "multiple_objects":
            assert len({c["class"] for c in include}) >= 2, prompt
        else:
            objects = sum(c["count"] for c in parse_prompt(prompt.split(";")[0])["include"])
            assert objects >= 3 and "; the " in prompt, prompt  # objects, then where they are


def test_shapes_spatial_prompts_mix_the_inline_and_the_caption_form(shapes):
    # The base shapes model draws both shapes only for the caption form, so the spatial expert needs
    # some of those; the inline form is what users (and GenEval) write.
    prompts = write_prompts(shapes, "spatial", "", [], 60)
    clause = [p for p in prompts if "; the " in p]
    assert 15 <= len(clause) <= 45
    for prompt in clause:  # the placed shape is the one the clause names first
        said = prompt.split("; ")[1]
        include = parse_prompt(prompt)["include"]
        placed = said.split(" is ")[0].split()[-1]
        assert include[1]["class"] == placed and include[1]["position"][0] in said.replace("to the ", ""), prompt


def test_shapes_refuses_unknown_skills_and_requests(shapes):
    with pytest.raises(InvalidInput, match="only for the skills counting, spatial"):
        write_prompts(shapes, "humour", "jokes", [], 3)
    with pytest.raises(LLMOutputError, match="shapes backend answers only the workbench's tasks"):
        ask_json(shapes, MESSAGES, lambda obj: obj)


def test_task_inputs_are_checked_before_any_request(shapes):
    with pytest.raises(InvalidInput, match="prompt is empty"):
        score_tags(shapes, " ", ["red"])
    with pytest.raises(InvalidInput, match="tags must be a list"):
        score_tags(shapes, "a circle", "red")
    with pytest.raises(InvalidInput, match="from 1 to"):
        write_prompts(shapes, "counting", "", [], 0)
    assert score_tags(shapes, "a circle", []) == {}
