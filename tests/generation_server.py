"""A real HTTP server on 127.0.0.1 that generates text with a real (tiny) causal LM, speaking the
Hugging Face Inference API / TGI protocols:

- text generation: POST /hf-inference/models/<model>  {"inputs": str, "parameters": {...}}
                   -> [{"generated_text", "details": {"finish_reason", "generated_tokens"}}]
                   POST /  (a TGI server or Inference Endpoint) -> the same object without the list
- chat completion: POST .../v1/chat/completions {"model", "messages", "max_tokens", "temperature", ...}
                   -> {"choices": [{"message": {"role", "content"}, "finish_reason"}], "usage": {...}}

`script` plays faults first (a Reply per POST), as in embedding_server.py.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from embedding_server import JsonHandler, LocalServer, Reply


class GenerationServer(LocalServer):
    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        self.torch = torch
        self.script: deque[Reply] = deque()
        self.requests: list[dict[str, Any]] = []  # (path, body, authorization) of every POST
        self.details = True  # False plays a server that ignores details=true
        self._lock = threading.Lock()
        self._serve(self._handler())

    def complete(self, ids: list[int], max_new: int, temperature: float, top_p: float, seed: int | None) -> tuple[list[int], bool]:
        """New token ids and whether generation stopped at EOS, one prompt at a time."""
        torch, tok = self.torch, self.tokenizer
        with self._lock, torch.inference_mode():  # one generate at a time: seeds stay meaningful
            if seed is not None:
                torch.manual_seed(seed)
            sampling = temperature > 0
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new, do_sample=sampling,
                                      temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, len(ids):].tolist()
        if tok.eos_token_id in new:
            return new[: new.index(tok.eos_token_id)], True
        return new, False

    def _handler(server) -> type[BaseHTTPRequestHandler]:  # noqa: N805 - closes over the server
        class Handler(JsonHandler):

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                with server._lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "authorization": self.headers.get("Authorization")})
                    scripted = server.script.popleft() if server.script else None
                if scripted is not None:
                    return self._send(scripted)
                if self.path.endswith("/v1/chat/completions"):
                    answer = self._chat(body)
                    return self._send(answer if isinstance(answer, Reply) else Reply(200, answer))
                if self.path == "/" or self.path.startswith("/hf-inference/models/"):
                    answer = self._text(body)
                    if isinstance(answer, Reply):
                        return self._send(answer)
                    return self._send(Reply(200, answer if self.path == "/" else [answer]))
                self._send(Reply(404, {"error": f"no route {self.path}"}))

            def _too_long(self, ids: list[int], max_new: int) -> Reply | None:
                limit = server.model.config.n_positions
                if len(ids) + max_new > limit:  # TGI's validation error, word for word in spirit
                    return Reply(422, {"error": f"Input validation error: `inputs` tokens + `max_new_tokens` must be "
                                                f"<= {limit}. Given: {len(ids)} `inputs` tokens and {max_new} "
                                                "`max_new_tokens`", "error_type": "validation"})
                return None

            def _chat(self, body: dict[str, Any]) -> Any:
                tok = server.tokenizer
                text = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                refused = self._too_long(ids, int(body.get("max_tokens") or 16))
                if refused:
                    return refused
                new, eos = server.complete(ids, int(body.get("max_tokens") or 16), float(body.get("temperature") or 0),
                                           float(body.get("top_p") or 1), body.get("seed"))
                return {"object": "chat.completion", "model": body.get("model"), "created": 0, "id": "x",
                        "choices": [{"index": 0, "finish_reason": "stop" if eos else "length",
                                     "message": {"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)}}],
                        "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new) + eos,
                                  "total_tokens": len(ids) + len(new) + eos}}

            def _text(self, body: dict[str, Any]) -> Any:
                tok, p = server.tokenizer, body.get("parameters") or {}
                ids = tok(body["inputs"])["input_ids"]
                refused = self._too_long(ids, int(p.get("max_new_tokens") or 16))
                if refused:
                    return refused
                sampling = bool(p.get("do_sample"))
                new, eos = server.complete(ids, int(p.get("max_new_tokens") or 16),
                                           float(p.get("temperature") or 1.0) if sampling else 0.0,
                                           float(p.get("top_p") or 1.0), p.get("seed"))
                answer: dict[str, Any] = {"generated_text": tok.decode(new, skip_special_tokens=True)}
                if server.details and p.get("details"):
                    answer["details"] = {"finish_reason": "eos_token" if eos else "length",
                                         "generated_tokens": len(new) + eos, "seed": p.get("seed"), "prefill": [],
                                         "tokens": []}
                return answer

        return Handler
