"""One side of a chat: a loaded model, its chat template and stop ids, and its own message history.

Answers are greedy (the same conversation always gives the same answers) and stream token by
token; the conversation is re-rendered with the chat template for each turn.
"""

from __future__ import annotations

from pathlib import Path


class Speaker:
    """One model in the conversation: its tokenizer, stop ids and its own message history."""

    def __init__(self, label: str, path: Path, dtype: str, device: str, chat_template: str, system_prompt: str):
        from abliterate.model.generation import stop_ids
        from abliterate.model.modelio import load_model, load_tokenizer
        from abliterate.model.prompts import resolve_template

        self.label = label
        self.tokenizer = load_tokenizer(path)
        self.template = resolve_template(self.tokenizer, chat_template)
        from abliterate.model.modelio import pick_device
        from abliterate.model.streaming import resolve_dtype

        self.model = load_model(path, resolve_dtype(dtype, pick_device(device), Path(path)), device)
        self.device = device
        self.eos = stop_ids(self.model, self.tokenizer)
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.history: list[dict] = []
        self.ids: list[int] = []
        self.text = ""

    def start(self, message: str, max_new_tokens: int):
        """Begin an answer to ``message``; return the token stream (an iterator of steps)."""
        from abliterate.model.generation import iter_greedy

        self.history.append({"role": "user", "content": message})
        rendered = self.tokenizer.apply_chat_template(self.system + self.history, chat_template=self.template,
                                                      add_generation_prompt=True, tokenize=False)
        prompt = list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        self.ids, self.text = [], ""
        return iter_greedy(self.model, [prompt], max_new_tokens=max_new_tokens, eos_ids=self.eos,
                           pad_id=int(self.tokenizer.pad_token_id), device=self.device)

    def add(self, token: int) -> str:
        """Append a generated token; return the text it completes (may be "" inside a multi-byte character)."""
        if token in self.eos:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def finish(self) -> None:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": self.text})
