"""A chat LLM behind one interface: a local model directory or an OpenAI-compatible endpoint.

`ChatClient.complete(conversations, params)` turns chat messages into one `Completion` per
conversation, in order. A failed item comes back with `text=None` and `error` set (the caller counts
it), never as an exception, so one bad request does not lose a batch. Two backends:

- `OpenAIChatClient`: `POST {base_url}/chat/completions` (vLLM, llama.cpp's server, TGI, SGLang,
  OpenAI), requests sent `concurrency` at a time, each retried on 5xx / 429 / network errors. Item i
  of a call is sent with `seed = params.seed + i`, so servers that honour seeds (vLLM, OpenAI) give
  varied but repeatable samples. With no `model` name the first model of `GET {base_url}/models`
  is used (what a single-model vLLM server serves).
- `LocalChatModel`: a Hugging Face Llama directory (safetensors + config.json + tokenizer.json),
  loaded as our `Transformer` and sampled in batches on the KV cache by `training.rollout`. Prompts
  are rendered with our chat template when the tokenizer has its role tokens, else with the
  `chat_template` of the directory's `tokenizer_config.json` (a Llama 3 / Qwen instruct export),
  rendered in a sandboxed Jinja environment as `transformers` does. Generation stops at the
  template's end-of-turn token and the config's `eos_token_id`(s).

`training/rewards/judge.py`'s HTTP judge is this client with greedy sampling parameters.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from training.sampling import SamplingParams

Message = dict[str, str]
FINISH_STOP, FINISH_LENGTH, FINISH_ERROR = "stop", "length", "error"


class LLMClientError(ValueError):
    """A generator that cannot be used as given (bad URL, not an instruct model, no model served)."""


def _one_reply(params: SamplingParams) -> None:
    """A chat client returns one completion per conversation: more samples are more conversations."""
    if params.n != 1:
        raise ValueError(f"chat clients sample one reply per conversation (n=1), got n={params.n}; "
                         "repeat the conversation instead")


@dataclass(frozen=True)
class Completion:
    """One reply: `text` (None when the request failed), why it ended, and the failure if any."""

    text: str | None
    finish_reason: str = FINISH_STOP
    error: str | None = None


class ChatClient(ABC):
    """Chat messages in, one completion per conversation out (same order)."""

    @abstractmethod
    def complete(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]:
        """Sample one reply to each conversation."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What produced the text (backend, model, location): recorded beside what it generated."""


def make_client(generator: str, *, model: str | None = None, api_key: str | None = None,
                concurrency: int = 8, retries: int = 2, timeout_s: float = 120.0,
                device: str = "auto", max_batch: int = 16) -> ChatClient:
    """`generator` is an http(s):// base URL (OpenAI-compatible, e.g. http://host:8000/v1) or a local
    model directory."""
    if generator.startswith(("http://", "https://")):
        return OpenAIChatClient(generator, model=model, api_key=api_key, concurrency=concurrency,
                                retries=retries, timeout_s=timeout_s)
    if "://" in generator:
        raise LLMClientError(f"generator {generator!r}: only http:// and https:// endpoints or a local model "
                             "directory are supported")
    return LocalChatModel(generator, device=device, max_batch=max_batch)


# ----------------------------------------------------------------------------- HTTP
class OpenAIChatClient(ChatClient):
    """An OpenAI-compatible chat-completions endpoint; `base_url` like `http://host:8000/v1`."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, retries: int = 2, timeout_s: float = 120.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise LLMClientError(f"endpoint must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or retries < 0:
            raise ValueError(f"concurrency must be >= 1 and retries >= 0, got {concurrency}, {retries}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.concurrency, self.retries, self.timeout_s = concurrency, retries, timeout_s
        self.model = model or self._first_model()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _first_model(self) -> str:
        request = urllib.request.Request(self.base_url + "/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                models = json.loads(response.read())["data"]
            return str(models[0]["id"])
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise LLMClientError(f"cannot list the models served at {self.base_url}/models ({type(e).__name__}: "
                                 f"{e}); check the URL (it ends in /v1) or name the model with --model") from e

    def _one(self, item: tuple[list[Message], SamplingParams]) -> Completion:
        messages, params = item
        request_body: dict[str, Any] = {"model": self.model, "messages": messages,
                                        "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                                        "top_p": params.top_p, "seed": params.seed}
        if params.stop:
            request_body["stop"] = list(params.stop)
        if params.top_k:  # not in OpenAI's API; vLLM, SGLang and llama.cpp's server accept it
            request_body["top_k"] = params.top_k
        body = json.dumps(request_body).encode()
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            request = urllib.request.Request(self.base_url + "/chat/completions", data=body,
                                             headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read())
                choice = payload["choices"][0]
                content = choice["message"].get("content")
                if content is not None and not isinstance(content, str):
                    raise TypeError(f"message content is {type(content).__name__}")
                finish = FINISH_LENGTH if choice.get("finish_reason") == "length" else FINISH_STOP
                return Completion(content or "", finish)  # a null content is an empty reply
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:  # a client error will not heal by retrying
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                error = f"malformed response: {type(e).__name__}: {e}"
                break
        return Completion(None, FINISH_ERROR, error)

    def complete(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]:
        if not conversations:
            return []
        _one_reply(params)
        items = [(list(m), replace(params, seed=params.seed + i)) for i, m in enumerate(conversations)]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(self._one, items))

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai-http", "endpoint": self.base_url, "model": self.model}


# ----------------------------------------------------------------------------- local model
class LocalChatModel(ChatClient):
    """A local Hugging Face Llama directory, sampled with our KV-cache rollout engine."""

    def __init__(self, model_dir: str | Path, device: str = "auto", max_batch: int = 16) -> None:
        import torch
        from tokenizers import Tokenizer

        from training.chat import ChatTemplate, ChatTemplateError
        from training.export import import_hf
        from training.rollout import LocalRollout

        self.path = Path(model_dir)
        if not (self.path / "config.json").is_file():
            raise LLMClientError(f"generator {self.path} is neither an http(s):// URL nor a model directory "
                                 "(no config.json); export one with `refinery export`")
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise LLMClientError(f"model directory {self.path} has no tokenizer.json")
        hf_cfg = json.loads((self.path / "config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        eos = hf_cfg.get("eos_token_id")
        stop = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}
        self._template: ChatTemplate | None = None
        self._jinja: Any = None
        try:
            self._template = ChatTemplate(self.tokenizer, source=str(tok_file))
            stop.update(self._template.stop_ids)
            self.template_name = "refinery.chat/1"
        except ChatTemplateError:
            self._jinja, self._jinja_vars = _jinja_template(self.path)
            self.template_name = "tokenizer_config.json chat_template"
        if not stop:
            raise LLMClientError(f"{self.path}: no end-of-turn token (config.json has no eos_token_id); "
                                 "generation would never stop")
        self.stop_ids = tuple(sorted(stop))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = import_hf(self.path).to(device).eval()
        self.engine = LocalRollout(self.model, self.tokenizer, max_batch=max_batch)

    def render(self, messages: list[Message]) -> list[int]:
        """Prompt ids ending where the assistant's reply starts."""
        if self._template is not None:
            return self._template.render_prompt(messages)
        text = self._jinja.render(messages=messages, add_generation_prompt=True, **self._jinja_vars)
        # The rendered text spells the special tokens (BOS, role headers): encode them as such.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def complete(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]:
        from training.rollout import FINISH_LENGTH as ROLLOUT_LENGTH

        limit = self.model.cfg.max_seq_len
        out: list[Completion | None] = [None] * len(conversations)
        prompts, where = [], []
        for i, messages in enumerate(conversations):
            ids = self.render(list(messages))
            if len(ids) + params.max_new_tokens > limit:
                out[i] = Completion(None, FINISH_ERROR, f"prompt of {len(ids)} tokens + max_new_tokens "
                                    f"{params.max_new_tokens} exceeds the model's max_seq_len {limit}")
                continue
            prompts.append(ids)
            where.append(i)
        if prompts:
            _one_reply(params)
            sampling = replace(params, stop_token_ids=tuple(sorted({*params.stop_token_ids, *self.stop_ids})))
            for i, rollout in zip(where, self.engine.generate(prompts, sampling), strict=True):
                body = rollout.token_ids
                if body and body[-1] in self.stop_ids:
                    body = body[:-1]
                text = self.tokenizer.decode(body, skip_special_tokens=True)
                finish = FINISH_LENGTH if rollout.finish_reason == ROLLOUT_LENGTH else FINISH_STOP
                out[i] = Completion(text, finish)
        return [c for c in out if c is not None]

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "model_dir": str(self.path.resolve()), "device": self.device,
                "template": self.template_name, "stop_ids": list(self.stop_ids),
                "max_seq_len": self.model.cfg.max_seq_len}


def _jinja_template(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The directory's Hugging Face chat template, compiled in a sandbox, and its token variables."""
    cfg_file = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    source = cfg.get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str) or not source:
        raise LLMClientError(f"{model_dir} is not a chat model: its tokenizer has neither the refinery chat "
                             "role tokens nor a chat_template in tokenizer_config.json; use an instruct model")
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception

    def token(name: str) -> str:
        value = cfg.get(name)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    return env.from_string(source), {"bos_token": token("bos_token"), "eos_token": token("eos_token")}

