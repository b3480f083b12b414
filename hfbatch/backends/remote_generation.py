"""RemoteGenerator: `hfbatch generate --backend api` through the Hugging Face Inference API.

Two real routes, as huggingface_hub's hf-inference provider builds them:
- plain prompts: the text-generation task, POST {router}/hf-inference/models/{model} with
  {"inputs": prompt, "parameters": {max_new_tokens, do_sample, temperature, top_p, seed,
  return_full_text: false, details: true}}; the answer is [{"generated_text", "details":
  {"finish_reason": "length" | "eos_token" | "stop_sequence", "generated_tokens"}}] (TGI, and
  dedicated endpoints, answer the object without the list);
- `--chat`: the OpenAI-compatible chat completion, POST {router}/hf-inference/models/{model}/v1/chat/completions
  with {"model", "messages", "max_tokens", "temperature", "top_p", "seed"}; the answer has
  choices[0].message.content, choices[0].finish_reason and usage.{prompt,completion}_tokens.
`--endpoint URL` sends the same bodies to a TGI server or Inference Endpoint (chat at URL/v1/chat/completions).
One prompt per request (both routes take one), `concurrency` requests in flight; retries,
credentials and error rules are HttpClient's, as for remote embeddings. Prompts are truncated
from the left by the model's own tokenizer before they are sent, like the local generator.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Sequence
from urllib.parse import urlparse

from ..errors import InputError, ModelLoadError, RemoteError
from .generation import GenerationParams, LocalGenerator, Prepared
from .http import HttpClient, RetryPolicy, hf_router, public_url, resolve_token, short_json
from .hub import hub_sha

_FIXES = {422: "the server could not process the prompt; check that --model is a text-generation model",
          400: "the server rejected the request; check --model (is it served for text generation?) and the parameters"}


class RemoteGenerator:
    """Completions over HTTP. Nothing connects until the first `generate`; `fingerprint()` never does."""

    name = "hf-api"
    remote = True

    def __init__(self, model: str, *, params: GenerationParams = GenerationParams(), endpoint: str | None = None,
                 token: str | None = None, concurrency: int = 4, timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), tokenizer: str | None = None):
        if endpoint is not None and urlparse(endpoint).scheme not in ("http", "https"):
            raise InputError(f"--endpoint {public_url(endpoint)!r} is not an http(s) URL; give it like http://tgi-box:8080.")
        if concurrency < 1:
            raise InputError("--api-concurrency must be at least 1.")
        self.model_id, self.params, self.endpoint, self.concurrency = model, params, endpoint, concurrency
        # the tokenizer (and context length) come from the model's files: hub, cache or --tokenizer
        # (without --chat: the server applies the template, the local tokenizer need not have one)
        self._local = LocalGenerator(tokenizer or model, params=replace(params, chat=False))
        self._tokenizer_source = tokenizer or model
        self._http = HttpClient(self.name, concurrency=concurrency, timeout=timeout, retry=retry, token=token,
                                fixes=_FIXES)
        self._revision: str | None = None
        self.load_seconds = 0.0

    # --- identity ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.endpoint:
            base = self.endpoint.rstrip("/")
            return _chat_url(base) if self.params.chat else base
        base = f"{hf_router()}/hf-inference/models/{self.model_id}"
        return _chat_url(base) if self.params.chat else base

    def fingerprint(self) -> str:
        """Model, URL and parameters: answers of another server, model or setting never share a
        cache namespace. The configuration alone (the model is named in every request), so a fully
        cached rerun makes no request; the hub revision is looked up on the first `generate` and
        recorded in `describe()`."""
        h = hashlib.blake2b(digest_size=16)
        # the URL without user:password@: credentials are not identity, and never hashed into a key
        h.update(f"{self.model_id}|{public_url(self.url)}|{self.params.key()}".encode())
        return f"generate-api:{h.hexdigest()}"

    def _identify(self) -> None:
        """Once, on the first `generate`: the model's commit on the hub (None offline), for the provenance."""
        if self._revision is None:
            self._revision = (hub_sha(self.model_id, resolve_token(None)) or "") if "/" in self.model_id else ""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model_id": self.model_id, "endpoint": public_url(self.url),
                "revision": f"hub:{self.model_id}@{self._revision}" if self._revision else None,
                "route": "chat-completion" if self.params.chat else "text-generation",
                "tokenizer": self._tokenizer_source, "api_concurrency": self.concurrency,
                **self._http.summary(), "model_loaded": self._http.connected, "load_seconds": 0.0,
                "params": self.params.key()}

    # --- prompts -------------------------------------------------------------------------------

    def prepare(self, prompts: Sequence[str]) -> list[Prepared]:
        """Left-truncate each prompt (without a template: the server applies it) to the context
        minus the generation budget and, with --chat, minus what the template adds; a truncated
        prompt is sent as the decoded kept tokens."""
        try:
            _ = self._local.model_dir
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"prompt truncation needs the tokenizer of {self._tokenizer_source}, which cannot be found ({exc}); "
                "pass --tokenizer with a hub id or local directory that has it."
            ) from None
        tok = self._local.tokenizer
        reserve = 0
        if self.params.chat and getattr(tok, "chat_template", None):  # what the server's template adds
            reserve = len(tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
        prepared = self._local.prepare(prompts, reserve=reserve)
        return [replace(p, text=tok.decode(p.ids) if p.truncated else prompt, n_prompt_tokens=p.n_prompt_tokens + reserve)
                for p, prompt in zip(prepared, prompts)]

    # --- generation ----------------------------------------------------------------------------

    def generate(self, prepared: Sequence[Prepared]) -> list[tuple[str, int, str]]:
        """(text, tokens generated, 'stop' | 'length') per prompt, in order; requests in parallel."""
        self._identify()
        if len(prepared) == 1 or self.concurrency == 1:
            return [self._one(p) for p in prepared]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prepared))) as pool:
            return list(pool.map(self._one, prepared))  # map keeps input order

    def _one(self, item: Prepared) -> tuple[str, int, str]:
        p = self.params
        url = self.url
        if p.chat:
            body: dict[str, Any] = {"model": self.model_id,
                                    "messages": [{"role": "user", "content": item.text}],
                                    "max_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                                    "stream": False}
            if p.seed is not None:
                body["seed"] = p.seed
            return self._chat_answer(self._http.post_json(url, body), public_url(url))
        parameters: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "do_sample": p.temperature > 0,
                                      "return_full_text": False, "details": True}
        if p.temperature > 0:  # TGI refuses temperature 0; greedy is do_sample false
            parameters.update(temperature=p.temperature, top_p=p.top_p if p.top_p < 1 else None)
        if p.seed is not None:
            parameters["seed"] = p.seed
        body = {"inputs": item.text, "parameters": {k: v for k, v in parameters.items() if v is not None}}
        return self._text_answer(self._http.post_json(url, body), public_url(url))

    def _chat_answer(self, payload: Any, url: str) -> tuple[str, int, str]:
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError) as exc:
            raise RemoteError(f"hf-api: {url} answered without choices[0].message.content ({exc}: "
                              f"{short_json(payload)}); nothing was written.") from None
        usage = payload.get("usage") or {}
        n_new = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return text, self._count(text, n_new), "length" if choice.get("finish_reason") == "length" else "stop"

    def _text_answer(self, payload: Any, url: str) -> tuple[str, int, str]:
        item = payload[0] if isinstance(payload, list) and payload else payload
        if not isinstance(item, dict) or not isinstance(item.get("generated_text"), str):
            raise RemoteError(f"hf-api: {url} answered without generated_text ({short_json(payload)}); "
                              "nothing was written.")
        text = item["generated_text"]
        details = item.get("details") if isinstance(item.get("details"), dict) else {}
        n_new = self._count(text, details.get("generated_tokens"))
        reason = details.get("finish_reason")
        if reason is None:  # a server without TGI's details: a full budget means it was cut
            reason = "length" if n_new >= self.params.max_new_tokens else "stop"
        return text, n_new, "length" if reason == "length" else "stop"

    def _count(self, text: str, reported: Any) -> int:
        """The server's own count when it sends one, else the model's tokenizer on the text."""
        if isinstance(reported, int) and reported >= 0:
            return reported
        return len(self._local.tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_url(base: str) -> str:
    path = urlparse(base).path.rstrip("/")
    if path.endswith("/chat/completions"):
        return base
    return base.rstrip("/") + ("/chat/completions" if path.endswith("/v1") else "/v1/chat/completions")
