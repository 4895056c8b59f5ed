"""Requests -> prompt token ids, with the model's own chat template, and the context check."""

from __future__ import annotations

from pathlib import Path

from app.errors import BadRequest
from app.protocol import ChatMessage


class PromptBuilder:
    def __init__(self, model_dir: Path, max_model_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_model_len = max_model_len

    def chat(self, messages: list[ChatMessage]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.text()} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        # The template already wrote the special tokens (as vLLM's chat path does).
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise BadRequest(
                f"prompt token ids must lie in [0, {vocab})",
                param="prompt",
                code="invalid_token_id",
            )
        return list(prompt)

    def max_tokens(self, prompt_ids: list[int], requested: int | None) -> int:
        """Tokens left for the answer; a prompt that does not fit is a 400, as in OpenAI."""
        room = self.max_model_len - len(prompt_ids)
        if room <= 0 or (requested is not None and requested > room):
            wanted = len(prompt_ids) + (requested or 0)
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"request needs {wanted} ({len(prompt_ids)} in the prompt, "
                f"{requested or 0} to generate).",
                param="messages" if requested is None else "max_tokens",
                code="context_length_exceeded",
            )
        return requested if requested is not None else room
