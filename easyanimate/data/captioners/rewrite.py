"""Caption rewrite: an optional second captioning step that turns the captioner's caption (VLM or sidecar) into
the training caption with a causal language model from a local folder (``weights.caption_rewriter``).

``curate.caption.rewrite``: ``enabled``, ``prompt`` (a template with ``{caption}``; a tokenizer with a chat
template gets it as the user message), ``batch_size``, ``max_new_tokens``. Greedy decoding, left padding,
batched; the first non-empty line of the answer is the new caption, and an empty answer keeps the original.
The manifest then holds both: ``caption_raw`` (the captioner's) and ``caption`` (the rewrite, what training
reads).
"""

from __future__ import annotations

import threading
from pathlib import Path

from easyanimate.config import resolve_weight_path


class CaptionRewriter:
    uses_device = True

    def __init__(self, model_dir: str | Path, cfg):
        self.model_dir, self.cfg = Path(model_dir), cfg
        self.model = self.tokenizer = None
        self.lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> "CaptionRewriter | None":
        cfg = settings.curate.caption.rewrite
        if not cfg.enabled:
            return None
        return cls(resolve_weight_path(settings.weights.caption_rewriter, "weights.caption_rewriter"), cfg)

    def setup(self, device: str) -> None:
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True).eval()
        self.model.to(self.device)

    def prompt(self, caption: str) -> str:
        text = self.cfg.prompt.format(caption=caption)
        if getattr(self.tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": text}]
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return text

    def rewrite(self, captions: list[str]) -> list[str]:
        """One training caption per caption, in order (empty captions stay empty)."""
        if self.model is None:
            raise RuntimeError("CaptionRewriter.setup(device) must run before rewriting")
        out = list(captions)
        todo = [i for i, c in enumerate(captions) if c]
        bs = self.cfg.batch_size
        with self.lock, self._torch.inference_mode():
            for lo in range(0, len(todo), bs):
                idx = todo[lo : lo + bs]
                enc = self.tokenizer([self.prompt(captions[i]) for i in idx], return_tensors="pt", padding=True)
                enc.pop("token_type_ids", None)
                enc = enc.to(self.device)
                ids = self.model.generate(
                    **enc,
                    max_new_tokens=self.cfg.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                texts = self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(idx, texts):
                    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
                    out[i] = line or captions[i]
        return out
