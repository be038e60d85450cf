"""LLM backends behind one interface, and the workbench's LLM tasks (RealignDiff's fine stage, SELMA).

    llm = get_llm("openai")                      # or "transformers", "shapes"
    score_tags(llm, "a red circle", ["circle", "red", "square"])  -> {"circle": 2.0, "red": 2.0, "square": 0.0}

Every backend has `chat(messages, *, max_tokens, temperature) -> str` over OpenAI-style messages
({"role": "system" | "user" | "assistant", "content": str}). `ask_json` turns a chat into a checked
JSON value: it extracts the JSON (also from code fences or prose), validates it, and on a bad answer
tells the model what was wrong and asks again, a bounded number of times.

Backends (`get_llm(name, **options)`; options override the environment):
* "openai": any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp server, Ollama...),
  standard library only;
* "transformers": a local causal LM from disk (hub id in the HF cache, or a folder); never downloads;
* "shapes": deterministic rules for the shapes world, no weights; it answers only the tasks below.

| variable | default |
| --- | --- |
| WORKBENCH_LLM_BASE_URL | https://api.openai.com/v1 ("openai") |
| WORKBENCH_LLM_MODEL | none for "openai" (required); Qwen/Qwen2.5-1.5B-Instruct for "transformers" |
| WORKBENCH_LLM_API_KEY | $OPENAI_API_KEY; none is fine for local servers |
| WORKBENCH_LLM_TIMEOUT | 120 (seconds per request, "openai") |
| WORKBENCH_LLM_JSON_MODE | off; "1" sends `response_format: {"type": "json_object"}` ("openai") |

The API key is sent only in the Authorization header; it is kept out of reprs and error messages.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from workbench.errors import InvalidInput, ModelNotAvailable, WorkbenchError

ROLES = ("system", "user", "assistant")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TRANSFORMERS_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_TIMEOUT = 120.0
TAG_SCORES = (2.0, 0.5, 0.0)  # RealignDiff: certain, possible, unlikely
MAX_CAPTION_CHARS = 200
MAX_WRITTEN_PROMPTS = 500


class LLMOutputError(WorkbenchError):
    """The model kept answering something unusable (no JSON, or JSON of the wrong shape)."""

    def __init__(self, message: str, reason: str = "", answer: str = "", tries: int = 0):
        super().__init__(message)
        self.reason, self.answer, self.tries = reason, answer, tries


class LLMRequestError(WorkbenchError):
    """The LLM server could not be reached or did not answer as a chat-completions server does."""


@runtime_checkable
class LLM(Protocol):
    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        """The assistant's reply to an OpenAI-style conversation."""
        ...


def check_messages(messages) -> list[dict]:
    """The conversation as plain {"role", "content"} dicts, or InvalidInput saying what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInput("an LLM conversation must be a non-empty list of {\"role\", \"content\"} messages")
    checked = []
    for k, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise InvalidInput(f"LLM message {k} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}, "
                               f"got {str(message)[:100]}")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def _label(llm) -> str:
    return getattr(llm, "label", None) or type(llm).__name__


def _normal(text: str) -> str:
    """Text compared ignoring case and spacing."""
    return " ".join(text.lower().split())


def _start(text: str, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


# --- JSON answers ---------------------------------------------------------------------------------


_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)


def extract_json(text: str):
    """The JSON value in a model's answer: the whole answer, a ```json fence, or the first JSON
    object or array inside prose. ValueError with a reason when there is none."""
    text = (text or "").strip()
    if not text:
        raise ValueError("the answer was empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        first_error = error
    for block in _FENCE.findall(text):
        try:
            return json.loads(block.strip())
        except json.JSONDecodeError:
            pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except json.JSONDecodeError:
            pass
    if not re.search(r"[\[{]", text):
        raise ValueError("the answer holds no JSON object")
    raise ValueError(f"the answer is not valid JSON ({first_error.msg} at line {first_error.lineno} "
                     f"column {first_error.colno})")


def ask_json(llm: LLM, messages: list[dict], validate: Callable[[object], object], retries: int = 2, *,
             what: str = "", max_tokens: int = 512, temperature: float = 0.0):
    """Ask for JSON and return `validate(obj)`; on a bad answer, ask again (at most `retries` more
    times) with the bad answer and the reason added to the conversation; then LLMOutputError.

    `validate` returns the cleaned value or raises ValueError with a reason the model can act on.
    `what` says what was asked ("scoring 3 tags for ..."), for the error message.
    """
    if not isinstance(retries, int) or retries < 0:
        raise InvalidInput(f"retries must be a whole number >= 0, got {retries!r}")
    conversation = check_messages(messages)
    if conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": JSON_SYSTEM})
    answer, reason = "", ""
    for _ in range(retries + 1):
        answer = llm.chat(conversation, max_tokens=max_tokens, temperature=temperature)
        answer = answer if isinstance(answer, str) else ""
        try:
            value = extract_json(answer)
            if isinstance(value, dict) and set(value) == {"error"}:  # a model (or "shapes") declining
                raise ValueError(f"the model reported an error: {value['error']}")
            return validate(value)
        except ValueError as error:
            reason = str(error)
        conversation += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": f"That answer could not be used: {reason}. "
                                                     "Answer again with only the JSON asked for, no other text."}]
    tries = retries + 1
    last = f"Its last answer began: \"{_start(answer)}\"." if answer.strip() else "Its last answer was empty."
    hint = ("" if reason.startswith("the model reported an error") else
            " An instruction-tuned model, or a larger one, follows the JSON format more reliably.")
    raise LLMOutputError(
        f"The LLM ({_label(llm)}) gave no usable answer{' for ' + what if what else ''} after {tries} "
        f"{'try' if tries == 1 else 'tries'}: {reason}. {last}{hint}", reason=reason, answer=answer, tries=tries)


# --- tasks ----------------------------------------------------------------------------------------


JSON_SYSTEM = ("You are a careful assistant for a text-to-image research workbench. You answer with one "
               "JSON object and nothing else: no prose, no code fences.")

_SCORE_TAGS = """An image was generated for a text prompt, and a tagger found the tags below in it. \
For each tag, judge how likely it is that the tag belongs in the scene the prompt describes:
- 2: certain; the prompt states it (the object, the colour, or that colour on that object).
- 0.5: possible; it fits the prompt but the prompt does not state it (e.g. "red" when the prompt says \
"a circle" with no colour).
- 0: unlikely; it contradicts the prompt (another colour than the one stated) or the prompt does not \
call for it.
Answer every tag, written exactly as given, with one of the values 2, 0.5 or 0, in this form:
{"scores": {"<tag>": <value>, ...}}

Input:
"""

_LOCAL_CAPTIONS = """For each object name below, write a short caption of that one object as the \
prompt describes it: its colour and other attributes from the prompt, one object with "a"/"an", no \
position and no other objects (prompt "two red circles left of a square", object "circle": "a red \
circle"). For an object the prompt does not mention, answer its name unchanged. Answer in this form:
{"captions": {"<object>": "<caption>", ...}}

Input:
"""

_WRITE_PROMPTS = """Write {n} different text-to-image prompts that exercise the skill "{skill}"{description}. \
Each prompt is one line of plain English describing one image, different from the others and from the \
examples. Answer in this form:
{{"prompts": ["<prompt>", ...]}}

Input:
"""


def _payload(task: str, **fields) -> str:
    return json.dumps({"task": task, **fields}, ensure_ascii=False)


def _check_names(names, kind: str) -> list[str]:
    """Names stripped and deduplicated in order; InvalidInput for non-text or empty ones."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise InvalidInput(f"{kind} must be a list of texts, got {type(names).__name__}")
    cleaned = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput(f"every entry of {kind} must be a non-empty text, got {name!r}")
        cleaned.append(name.strip())
    return list(dict.fromkeys(cleaned))


def _answers_for(obj, key: str, names: list[str]) -> dict[str, object]:
    """The answer's value for each name (from obj[key], or obj itself), keys matched ignoring case
    and spacing; ValueError naming the missing ones."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object {{\"{key}\": {{...}}}}, got {type(obj).__name__}")
    table = obj.get(key, obj)
    if not isinstance(table, dict):
        raise ValueError(f"\"{key}\" must be a JSON object with one entry per name")
    loose = {" ".join(str(k).lower().split()): v for k, v in table.items()}
    answers, missing = {}, []
    for name in names:
        if name in table:
            answers[name] = table[name]
        elif " ".join(name.lower().split()) in loose:
            answers[name] = loose[" ".join(name.lower().split())]
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"no answer for {', '.join(repr(m) for m in missing)}; answer every one")
    return answers


def score_tags(llm: LLM, prompt: str, tags: list[str], retries: int = 2) -> dict[str, float]:
    """RealignDiff's fine stage: for each tag found in an image, 2 (the prompt states it), 0.5
    (compatible, unstated) or 0 (contradicts the prompt or unrelated). Every tag gets a score."""
    from workbench.prompt_parser import check_prompt

    prompt, tags = check_prompt(prompt), _check_names(tags, "tags")
    if not tags:
        return {}

    def validate(obj) -> dict[str, float]:
        scores = {}
        for tag, value in _answers_for(obj, "scores", tags).items():
            try:
                number = float(value) if not isinstance(value, bool) else None
            except (TypeError, ValueError):
                number = None
            if number not in TAG_SCORES:
                raise ValueError(f"the score of {tag!r} is {json.dumps(value)}; use 2, 0.5 or 0")
            scores[tag] = number
        return scores

    messages = [{"role": "system", "content": JSON_SYSTEM},
                {"role": "user", "content": _SCORE_TAGS + _payload("score_tags", prompt=prompt, tags=tags)}]
    return ask_json(llm, messages, validate, retries, max_tokens=64 + 24 * len(tags),
                    what=f"scoring {len(tags)} tags for the prompt \"{_start(prompt, 80)}\"")


def local_captions(llm: LLM, prompt: str, objects: list[str], retries: int = 2) -> dict[str, str]:
    """A short caption of each object as the prompt describes it ("circle" -> "a red circle")."""
    from workbench.prompt_parser import check_prompt

    prompt, objects = check_prompt(prompt), _check_names(objects, "objects")
    if not objects:
        return {}

    def validate(obj) -> dict[str, str]:
        captions = {}
        for name, caption in _answers_for(obj, "captions", objects).items():
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"the caption of {name!r} must be a non-empty text")
            if len(caption) > MAX_CAPTION_CHARS:
                raise ValueError(f"the caption of {name!r} is {len(caption)} characters; "
                                 f"keep it under {MAX_CAPTION_CHARS}")
            captions[name] = " ".join(caption.split())
        return captions

    messages = [{"role": "system", "content": JSON_SYSTEM},
                {"role": "user",
                 "content": _LOCAL_CAPTIONS + _payload("local_captions", prompt=prompt, objects=objects)}]
    return ask_json(llm, messages, validate, retries, what=f"captioning {len(objects)} objects of the prompt "
                    f"\"{_start(prompt, 80)}\"", max_tokens=64 + 32 * len(objects))


def write_prompts(llm: LLM, skill: str, description: str, examples: list[str], n: int, retries: int = 2, *,
                  temperature: float = 0.0, at_least: int | None = None) -> list[str]:
    """n different prompts for a skill (SELMA's skill-specific prompt sets), none equal to an example.

    `temperature` > 0 samples (SELMA's prompt generation asks at 1.0 with fresh in-context examples
    each request, so repeated requests give new prompts). `at_least` (default n) accepts an answer with
    fewer new prompts, so a loop that asks again keeps the good ones of an answer that copied an example."""
    from workbench.prompt_parser import MAX_PROMPT_CHARS

    if not isinstance(skill, str) or not skill.strip():
        raise InvalidInput("the skill must be a non-empty text, such as \"counting\"")
    if not isinstance(description, str):
        raise InvalidInput(f"the skill's description must be text, got {type(description).__name__}")
    examples = _check_names(examples, "examples")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_WRITTEN_PROMPTS:
        raise InvalidInput(f"the number of prompts must be a whole number from 1 to {MAX_WRITTEN_PROMPTS}, got {n!r}")
    skill, description = skill.strip(), description.strip()
    taken = {_normal(e) for e in examples}

    def validate(obj) -> list[str]:
        prompts = obj.get("prompts") if isinstance(obj, dict) else obj
        if not isinstance(prompts, list):
            raise ValueError("expected a JSON object {\"prompts\": [...]} with a list of texts")
        kept, seen = [], set(taken)
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"every prompt must be a non-empty text, got {json.dumps(prompt)[:60]}")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"a prompt is {len(prompt)} characters long; keep each under {MAX_PROMPT_CHARS}")
            key = _normal(prompt)
            if key not in seen:
                seen.add(key)
                kept.append(" ".join(prompt.split()))
        if len(kept) < (n if at_least is None else max(1, min(at_least, n))):
            raise ValueError(f"the answer holds {len(kept)} new different prompts (not counting repeats and "
                             f"copied examples), {n} were asked")
        return kept[:n]

    header = _WRITE_PROMPTS.format(n=n, skill=skill, description=f" ({description})" if description else "")
    messages = [{"role": "system", "content": JSON_SYSTEM},
                {"role": "user", "content": header + _payload("write_prompts", skill=skill, description=description,
                                                              examples=examples, n=n)}]
    return ask_json(llm, messages, validate, retries, what=f"writing {n} \"{_start(skill, 40)}\" prompts",
                    max_tokens=64 + 48 * n, temperature=temperature)


# --- "openai": any chat-completions server ---------------------------------------------------------


def openai_settings() -> dict:
    timeout = os.environ.get("WORKBENCH_LLM_TIMEOUT") or DEFAULT_TIMEOUT
    return {"base_url": os.environ.get("WORKBENCH_LLM_BASE_URL") or DEFAULT_BASE_URL,
            "model": os.environ.get("WORKBENCH_LLM_MODEL") or None,
            "api_key": os.environ.get("WORKBENCH_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or None,
            "timeout": timeout,
            "json_mode": (os.environ.get("WORKBENCH_LLM_JSON_MODE") or "").lower() in ("1", "true", "yes", "on")}


class OpenAIChat:
    """POST {base_url}/chat/completions. The key is held privately and shown nowhere but the
    Authorization header; every message this class writes is scrubbed of it besides."""

    def __init__(self, model: str | None = None, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, json_mode: bool = False):
        if not model:
            raise InvalidInput("The OpenAI-compatible LLM backend needs a model name: set WORKBENCH_LLM_MODEL "
                               "(e.g. gpt-4o-mini, or the name your vLLM, llama.cpp or Ollama server serves).")
        base_url = str(base_url).strip().rstrip("/")
        if re.match(r"https?://[^/]*@", base_url):  # never echoed: the part before @ may be a secret
            raise InvalidInput("WORKBENCH_LLM_BASE_URL holds credentials (user:password@...): give the address "
                               "alone and the key in WORKBENCH_LLM_API_KEY.")
        if not re.match(r"https?://[^/]+", base_url):
            raise InvalidInput(f"WORKBENCH_LLM_BASE_URL must be an http(s) address such as "
                               f"http://localhost:8000/v1, got '{base_url}'")
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            timeout = -1.0
        if not timeout > 0:
            raise InvalidInput("WORKBENCH_LLM_TIMEOUT must be a number of seconds above 0")
        self.model, self.base_url, self.timeout, self.json_mode = str(model), base_url, timeout, bool(json_mode)
        self.url = f"{base_url}/chat/completions"
        api_key = (api_key or "").strip() or None
        # A key an HTTP header cannot carry (a line break from a CRLF .env file, a pasted non-ASCII
        # character) would fail inside http.client, whose message quotes the header, key and all.
        if api_key is not None and not all("!" <= char <= "~" for char in api_key):
            raise InvalidInput("The LLM API key (WORKBENCH_LLM_API_KEY or OPENAI_API_KEY) holds a space, a line "
                               "break or a non-ASCII character, which an HTTP header cannot carry: set it again "
                               "without them.")
        self._api_key = api_key

    @property
    def label(self) -> str:
        return f"model '{self.model}' at {self.url}"

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return (f"OpenAIChat(model={self.model!r}, base_url={self.base_url!r}, timeout={self.timeout:g}, "
                f"api_key=<{key}>)")

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "<api key>") if self._api_key else text

    def _excerpt(self, text, limit: int = 200) -> str:
        """The start of what the server sent, key masked first: cut first, a key split at the cut would
        no longer match and half of it would be shown."""
        return _start(self._redact(str(text)), limit)

    def _fail(self, what: str) -> LLMRequestError:
        return LLMRequestError(self._redact(f"The LLM server at {self.url} (model '{self.model}') {what}"))

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        body = {"model": self.model, "messages": check_messages(messages), "max_tokens": int(max_tokens),
                "temperature": float(temperature)}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "align-workbench"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # `from None` everywhere: the chained urllib error would add nothing the message lacks.
        try:
            # Inside the try: Request itself refuses some malformed addresses ("http://[::1/v1").
            request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                             method="POST")
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise self._http_error(error) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise self._timeout() from None
            raise self._unreachable(error.reason) from None
        except (TimeoutError, socket.timeout):
            raise self._timeout() from None
        except (OSError, http.client.HTTPException) as error:  # reset mid-answer, not HTTP at all...
            raise self._unreachable(error) from None
        except ValueError as error:  # urllib's word for a malformed address (the key was checked above)
            raise InvalidInput(self._redact(f"WORKBENCH_LLM_BASE_URL '{self.base_url}' is not a usable address: "
                                            f"{error}")) from None
        # A server may echo the request (headers included) in its answer; the answer reaches messages and logs.
        return self._redact(self._content(raw))

    def _timeout(self) -> LLMRequestError:
        return self._fail(f"did not answer within {self.timeout:g} s. Raise WORKBENCH_LLM_TIMEOUT or check the server.")

    def _unreachable(self, reason) -> LLMRequestError:
        if isinstance(reason, ConnectionRefusedError):
            said = "connection refused"
        else:
            said = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        return self._fail(f"could not be reached: {said}. Is the server running? Set WORKBENCH_LLM_BASE_URL to its "
                          f"address (e.g. http://localhost:8000/v1 for vLLM, http://localhost:11434/v1 for Ollama).")

    def _http_error(self, error: urllib.error.HTTPError) -> LLMRequestError:
        try:
            text = error.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        detail = text
        try:  # OpenAI-style {"error": {"message": ...}}
            parsed = json.loads(text)
            detail = parsed["error"]["message"] if isinstance(parsed.get("error"), dict) else parsed.get("error", text)
        except (ValueError, AttributeError, KeyError, TypeError):
            pass
        hint = {401: " Check WORKBENCH_LLM_API_KEY.", 403: " Check WORKBENCH_LLM_API_KEY.",
                404: " Check WORKBENCH_LLM_BASE_URL (it usually ends in /v1) and WORKBENCH_LLM_MODEL.",
                }.get(error.code, "")
        detail = f": {self._excerpt(detail)}" if str(detail).strip() else ""
        return self._fail(f"refused the request with HTTP {error.code} {error.reason}{detail}.{hint}")

    def _content(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        try:
            message = json.loads(text)["choices"][0]["message"]
            content = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise self._fail(f"answered with something that is not a chat-completions response (no "
                             f"choices[0].message); it began: \"{self._excerpt(text)}\"") from None
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise self._fail(f"answered without text (message: \"{self._excerpt(json.dumps(message))}\")")
        return content


# --- "transformers": a local causal LM -------------------------------------------------------------


def transformers_settings() -> dict:
    return {"model": os.environ.get("WORKBENCH_LLM_MODEL") or DEFAULT_TRANSFORMERS_MODEL}


def _looks_like_path(name: str) -> bool:
    return (Path(name).is_absolute() or name.startswith((".", "~")) or "\\" in name
            or name.count("/") > 1)


class TransformersChat:
    """A causal LM loaded from disk only; greedy decoding at temperature 0."""

    def __init__(self, model: str = DEFAULT_TRANSFORMERS_MODEL, device: str | None = None, dtype: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workbench.devices import pick_device, pick_dtype

        self.name = str(model)
        self.label = f"transformers model '{self.name}'"
        self.device = pick_device(device)
        folder = Path(self.name).expanduser()
        if folder.exists():
            source, missing = str(folder), None
        elif _looks_like_path(self.name):
            source, missing = None, (f"The LLM folder '{self.name}' does not exist. Set WORKBENCH_LLM_MODEL to a "
                                     f"folder holding a causal LM and its tokenizer (saved with save_pretrained), "
                                     f"or to a hub id in the Hugging Face cache.")
        else:
            source, missing = self.name, None
        if missing:
            raise ModelNotAvailable(missing)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True,
                                                              dtype=pick_dtype(self.device, dtype))
        except (OSError, ValueError) as error:
            if folder.exists():
                raise ModelNotAvailable(f"The LLM folder '{self.name}' holds no loadable causal LM and tokenizer "
                                        f"({_start(str(error), 160)}).") from None
            raise ModelNotAvailable(
                f"The LLM '{self.name}' is not on this machine (nothing is downloaded). Download it once with "
                f"`hf download {self.name}` (older clients: `huggingface-cli download {self.name}`), which puts "
                f"it in the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME), or set "
                f"WORKBENCH_LLM_MODEL to a local folder that holds it.") from None
        self.model.to(self.device).eval()

    def __repr__(self) -> str:
        return f"TransformersChat(model={self.name!r}, device='{self.device}')"

    def format_prompt(self, messages: list[dict]) -> str:
        """What the model reads: the tokenizer's chat template when it has one, else a
        "role: content" transcript ending in "assistant:"."""
        messages = check_messages(messages)
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # some templates reject a system role: fold it into the first user turn
                if messages[0]["role"] != "system" or len(messages) < 2:
                    raise
                first = messages[0]["content"] + "\n\n" + messages[1]["content"]
                merged = [{"role": messages[1]["role"], "content": first}]
                return self.tokenizer.apply_chat_template(merged + messages[2:], tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        import torch

        text = self.format_prompt(messages)
        # A chat template writes its own special tokens; a transcript gets the tokenizer's usual ones.
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(self.device)
        length = inputs["input_ids"].shape[1]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and length >= limit:
            raise InvalidInput(f"the conversation is {length} tokens long; {self.label} reads at most {limit}")
        new_tokens = max(1, min(int(max_tokens), limit - length if limit else int(max_tokens)))
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        sampling = {"do_sample": True, "temperature": float(temperature)} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=new_tokens, pad_token_id=pad, **sampling)
        return self.tokenizer.decode(output[0, length:], skip_special_tokens=True).strip()


# --- "shapes": rules, no weights ------------------------------------------------------------------


SHAPES_SKILLS = ("counting", "spatial", "color_binding", "multiple_objects", "long_description")


def _find_task(messages: list[dict]) -> dict | None:
    """The latest user message's {"task": ...} payload (a correction turn holds none, so a retry
    finds the original request)."""
    decoder = json.JSONDecoder()
    for message in reversed(messages):
        if message["role"] != "user":
            continue
        for match in re.finditer(r"\{", message["content"]):
            try:
                value = decoder.raw_decode(message["content"], match.start())[0]
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and "task" in value:
                return value
    return None


class ShapesLLM:
    """Answers the workbench's tasks by rules over `prompt_parser` (shapes world and COCO classes).

    score_tags: a tag is read as an object ("circle", "red circle", counts ignored) or a colour
    ("red"); a tag the vocabulary cannot read scores 0. An object tag whose class the prompt does not
    name: 0 (a prompt lists the whole scene). Named: 2 with no colour or a colour stated for that
    class; 0.5 with a colour when some clause of that class has none; else 0 (another colour was
    stated). A colour tag: 2 if stated for some object, 0.5 if some object has no stated colour, else 0.
    A tag naming several objects takes the lowest of their scores.
    local_captions: "a <colour> <class>" from the prompt's clauses of that class (the colour only when
    every such clause states the same one); an object the prompt does not mention keeps its name.
    write_prompts: shapes-world prompts for SHAPES_SKILLS from an RNG seeded by `seed` and the skill
    (the same call gives the same prompts; the first k of n+1 are the n); description is not read. At a
    temperature above 0 the RNG is also seeded by the in-context examples, so SELMA's repeated
    requests with other examples get other prompts.
    Anything else gets {"error": ...}.
    """

    label = "shapes (rules, no weights)"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"ShapesLLM(seed={self.seed})"

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        payload = _find_task(check_messages(messages))
        tasks = {"score_tags": self._score_tags, "local_captions": self._local_captions,
                 "write_prompts": lambda payload: self._write_prompts(payload, sampled=temperature > 0)}
        if payload is None or payload.get("task") not in tasks:
            said = "no task payload found" if payload is None else f"unknown task {payload.get('task')!r}"
            return json.dumps({"error": f"the shapes backend answers only the workbench's tasks "
                                        f"({', '.join(tasks)}); {said}"})
        try:
            return json.dumps(tasks[payload["task"]](payload))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            return json.dumps({"error": f"malformed {payload['task']} payload ({type(error).__name__}: {error})"})

    def _score_tags(self, payload: dict) -> dict:
        from workbench.prompt_parser import default_vocabulary, parse_prompt

        include = parse_prompt(payload["prompt"])["include"]
        colors = set(default_vocabulary().colors)
        return {"scores": {tag: _tag_score(tag, include, colors) for tag in payload["tags"]}}

    def _local_captions(self, payload: dict) -> dict:
        from workbench.prompt_parser import describe, parse_prompt

        include = parse_prompt(payload["prompt"])["include"]
        captions = {}
        for name in payload["objects"]:
            named = parse_prompt(name)["include"] if name.strip() else []
            clauses = [c for c in include if named and c["class"] == named[0]["class"]]
            if not clauses:
                captions[name] = name
                continue
            stated = {c.get("color") for c in clauses}
            clause = {"class": clauses[0]["class"], "count": 1}
            if len(stated) == 1 and None not in stated:
                clause["color"] = stated.pop()
            captions[name] = describe({"include": [clause]})
        return {"captions": captions}

    def _write_prompts(self, payload: dict, sampled: bool = False) -> dict:
        import numpy as np

        skill, n = str(payload["skill"]).strip(), int(payload["n"])
        if skill not in SHAPES_SKILLS:
            raise InvalidInput(f"The shapes LLM backend writes prompts only for the skills {', '.join(SHAPES_SKILLS)}; "
                               f"got '{skill}'. Use an \"openai\" or \"transformers\" LLM for other skills.")
        key = [self.seed, zlib.crc32(skill.encode())]
        if sampled:  # temperature > 0: other in-context examples, other prompts (as sampling an LLM would)
            key.append(zlib.crc32(json.dumps(payload.get("examples", [])).encode()))
        rng = np.random.default_rng(key)
        seen = {_normal(e) for e in payload.get("examples", [])}
        prompts = []
        for _ in range(200 * n):
            if len(prompts) == n:
                break
            prompt = _SKILL_WRITERS[skill](rng)
            if _normal(prompt) not in seen:
                seen.add(_normal(prompt))
                prompts.append(prompt)
        if len(prompts) < n:
            raise InvalidInput(f"The shapes world holds only about {len(prompts)} different {skill} prompts; "
                               f"ask for at most that many.")
        return {"prompts": prompts}


def _tag_score(tag: str, include: list[dict], colors: set[str]) -> float:
    from workbench.prompt_parser import parse_prompt, tokenize

    words = " ".join(tokenize(tag))
    if words in colors:  # before parsing: alone, "orange" would read as the fruit
        stated = {c.get("color") for c in include}
        return 2.0 if words in stated else 0.5 if None in stated else 0.0
    named = parse_prompt(tag)["include"] if words else []
    if not named:
        return 0.0
    scores = []
    for object_tag in named:
        clauses = [c for c in include if c["class"] == object_tag["class"]]
        stated = {c.get("color") for c in clauses}
        color = object_tag.get("color")
        if not clauses:
            scores.append(0.0)
        elif color is None or color in stated:
            scores.append(2.0)
        else:
            scores.append(0.5 if None in stated else 0.0)
    return min(scores)


# Skill prompt writers for the shapes world: each draws one prompt from the RNG.


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _maybe_color(rng, rate: float = 0.6):
    from workbench.shapes.world import COLORS

    return _pick(rng, COLORS) if rng.random() < rate else None


def _counting(rng) -> str:
    from workbench.shapes.captions import object_phrase
    from workbench.shapes.world import MAX_OBJECTS, SHAPES

    said = object_phrase(_pick(rng, SHAPES), _maybe_color(rng), int(rng.integers(2, MAX_OBJECTS + 1)))
    return _pick(rng, ("{x}", "exactly {x}", "a photo of {x}", "{x} on a plain background")).format(x=said)


def _two_items(rng, colored: bool) -> list[tuple[str, str | None]]:
    from workbench.shapes.world import COLORS, SHAPES

    a, b = rng.choice(len(SHAPES), size=2, replace=False)
    if not colored:
        return [(SHAPES[a], _maybe_color(rng)), (SHAPES[b], _maybe_color(rng))]
    ca, cb = rng.choice(len(COLORS), size=2, replace=False)
    return [(SHAPES[a], COLORS[ca]), (SHAPES[b], COLORS[cb])]


def _spatial(rng) -> str:
    from workbench.shapes.bench_prompts import CLAUSE_POSITION_SHARE
    from workbench.shapes.captions import clause_caption, object_phrase
    from workbench.shapes.world import RELATION_PHRASES, RELATIONS

    (a, ca), (b, cb) = _two_items(rng, colored=False)
    relation = _pick(rng, RELATIONS)
    # Some prompts say the relation as a clause after the list, the way the shapes model's captions
    # do: the base model draws both shapes for that form but mostly one, or none, for the inline one,
    # so without it the spatial expert's images hold hardly any pair to learn (or relabel) a relation
    # from. IPR's training prompts mix the two forms for the same reason.
    if rng.random() < CLAUSE_POSITION_SHARE:
        return clause_caption([(b, cb), (a, ca)], [(1, relation, 0)])
    return f"{object_phrase(a, ca)} {_pick(rng, RELATION_PHRASES[relation])} {object_phrase(b, cb)}"


def _color_binding(rng) -> str:
    from workbench.shapes.captions import object_phrase

    (a, ca), (b, cb) = _two_items(rng, colored=True)
    return f"{object_phrase(a, ca)} {_pick(rng, ('and', 'with', 'next to'))} {object_phrase(b, cb)}"


def _multiple_objects(rng) -> str:
    from workbench.shapes.captions import join_list, object_phrase
    from workbench.shapes.world import MAX_OBJECTS, SHAPES

    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))][: int(rng.integers(2, len(SHAPES) + 1))]
    counts = [1] * len(shapes)
    while sum(counts) < MAX_OBJECTS and rng.random() < 0.4:  # sometimes a group: "two circles and a square"
        counts[int(rng.integers(len(counts)))] += 1
    return join_list([object_phrase(s, _maybe_color(rng, 0.5), c) for s, c in zip(shapes, counts)])


def _long_description(rng) -> str:
    from workbench.shapes.captions import long_caption
    from workbench.shapes.scene import sample_scene

    while True:  # a scene whose caption says where things are
        caption = long_caption(sample_scene(rng, 3))
        if ";" in caption:
            return caption


_SKILL_WRITERS: dict[str, Callable] = {"counting": _counting, "spatial": _spatial, "color_binding": _color_binding,
                                       "multiple_objects": _multiple_objects, "long_description": _long_description}


# --- by name --------------------------------------------------------------------------------------


def _given(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def _openai(**options) -> OpenAIChat:
    return OpenAIChat(**{**openai_settings(), **_given(options)})


def _transformers(**options) -> TransformersChat:
    return TransformersChat(**{**transformers_settings(), **_given(options)})


def _shapes(**options) -> ShapesLLM:
    return ShapesLLM(**options)


LLMS: dict[str, Callable[..., LLM]] = {"openai": _openai, "transformers": _transformers, "shapes": _shapes}


def get_llm(name: str, **options) -> LLM:
    """An LLM backend by name; keyword options override its environment settings."""
    if name not in LLMS:
        raise InvalidInput(f"Unknown LLM backend '{name}'. Available: {', '.join(LLMS)}.")
    return LLMS[name](**options)


def check_llm(name: str) -> None:
    """Raise what get_llm(name) would for settings that cannot work (the "openai" backend's environment),
    without loading weights or calling a server: the UI refuses a job at once instead of failing it later."""
    if name == "openai" or name not in LLMS:
        get_llm(name)  # "openai" checks its settings only (nothing is sent); an unknown name is refused
