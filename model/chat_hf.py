"""A `ChatBackend` that runs a transformers image-text-to-text model in this process: a local
folder or a hub id (offline, the HF cache), on one device, batched, greedy unless told otherwise.

    backend = HFChat("Qwen/Qwen2-VL-2B-Instruct", batch_size=8)
    backend.chat([ChatRequest("Describe the clip.", images=(jpeg, jpeg)), ...]) -> [ChatReply, ...]

Inputs are built the way the model's own processor builds them: the chat template writes one
image placeholder per frame, and each placeholder is expanded into as many image tokens as the
vision tower makes features for that frame. Two paths, recorded in `processor_path`:

* "processor": `AutoProcessor` loaded, and does all of it. Used whenever it loads.
* "fallback": `AutoProcessor` did not load. Qwen2-VL's does not without torchvision (its video
  processor and fast image processor need it), and torchvision cannot sit beside our CPU torch
  build. For a family in FAMILIES we then load the parts that need no torchvision (the tokenizer,
  the PIL image processor, processor_config.json) and expand the placeholders here, with the same
  arithmetic as the family's processor class (each counting function names the method it copies).
* "tokenizer": a text-only causal LM (prompt expansion): no images, the tokenizer is all it needs.

What fails how (see model/chat.py): a frame that cannot be decoded, or that the image processor
refuses, fails its own request (`ChatReply.error`) and the rest of the batch runs. A model or
processor that cannot be loaded, and any error inside generate() (CUDA out of memory, a token
count the model rejects), is our environment: `BackendUnavailable`, one line.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from model.chat import BackendUnavailable, ChatReply, ChatRequest, Sampling

logger = logging.getLogger(__name__)

DTYPES = ("float16", "bfloat16", "float32")
MESSAGE_CHARS = 300  # an exception's message is cut to this many characters in our one-line errors
# A local folder's revision hashes these files whole (config, tokenizer, templates, processor
# settings: what decides the model's answer) and only the names and sizes of the weights: reading
# gigabytes at every load would cost minutes, and a retrained checkpoint of the same size and name
# with an unchanged config is not a case we meet.
HASHED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


# --- the fallback processor: placeholder expansion per family -----------------------------------


def qwen2_vl_image_tokens(image_inputs: Mapping[str, Any], index: int, processor: FallbackProcessor) -> int:
    """Qwen2VLProcessor.replace_image_token: one token per merge_size x merge_size block of patches,
    image_grid_thw being (t, h, w) in patches: (1, H/14, W/14) for a frame at patch size 14."""
    return int(image_inputs["image_grid_thw"][index].prod()) // processor.image_processor.merge_size**2


def llava_image_tokens(image_inputs: Mapping[str, Any], index: int, processor: FallbackProcessor) -> int:
    """LlavaProcessor.replace_image_token: one token per patch of the processed frame, plus the
    tower's extra tokens (CLIP's class token), less the class token under the "default" strategy."""
    height, width = image_inputs["pixel_values"][index].shape[-2:]  # (C, H, W) per frame
    patch_size = processor.settings["patch_size"]
    count = (height // patch_size) * (width // patch_size) + processor.settings.get("num_additional_image_tokens", 0)
    return count - 1 if processor.settings.get("vision_feature_select_strategy") == "default" else count


@dataclass(frozen=True)
class Family:
    image_token: str  # the placeholder the chat template writes once per image, unless the tokenizer names another
    count_image_tokens: Callable[[Mapping[str, Any], int, FallbackProcessor], int]
    mm_token_type_ids: bool  # the model wants each token's modality: Qwen's M-RoPE gives image tokens 3D positions
    needs_settings: tuple[str, ...] = ()  # processor_config.json keys the count needs


# model_type -> family. Qwen2.5-VL's processor is Qwen2-VL's, token for token.
FAMILIES = {
    "qwen2_vl": Family("<|image_pad|>", qwen2_vl_image_tokens, mm_token_type_ids=True),
    "qwen2_5_vl": Family("<|image_pad|>", qwen2_vl_image_tokens, mm_token_type_ids=True),
    "llava": Family("<image>", llava_image_tokens, mm_token_type_ids=False, needs_settings=("patch_size",)),
}


class FallbackProcessor:
    """The part of a family's processor that we use, from parts that load without torchvision.
    Called like the real one: `processor(text=[...], images=[...])` -> tensors for generate()."""

    def __init__(self, family: Family, tokenizer, image_processor, chat_template: str, settings: dict[str, Any]):
        self.family = family
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.settings = settings  # processor_config.json, as the real processor's constructor gets it
        # The real processors prefer a token the tokenizer names, then their own setting.
        self.image_token = getattr(tokenizer, "image_token", None) or settings.get("image_token") or family.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool, tokenize: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=tokenize
        )

    def __call__(self, text: list[str], images: list | None = None, **tokenizer_kwargs) -> dict[str, Any]:
        image_inputs = dict(self.image_processor(images, return_tensors="pt")) if images else {}
        placeholders = sum(sample.count(self.image_token) for sample in text)
        if placeholders != len(images or []):
            raise ValueError(f"{placeholders} {self.image_token} placeholders in the prompts for {len(images or [])} images")
        # The i-th placeholder across the batch becomes the i-th image's tokens
        # (ProcessorMixin.get_text_with_replacements).
        counts = iter([self.family.count_image_tokens(image_inputs, i, self) for i in range(len(images or []))])
        pattern = re.escape(self.image_token)
        text = [re.sub(pattern, lambda _: self.image_token * next(counts), sample) for sample in text]
        inputs = dict(self.tokenizer(text, **tokenizer_kwargs))  # input_ids, attention_mask: (B, N)
        if self.family.mm_token_type_ids:  # ProcessorMixin.create_mm_token_type_ids: 1 image, 0 text
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).long()
        return {**inputs, **image_inputs}


# --- loading ---------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return getattr(torch, dtype)


def local_folder(model: str) -> Path | None:
    """The folder `model` names, or None for a hub id. Anything that looks like a path (absolute,
    ./, ../, ~) must exist: it is never looked up on the hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith(("/", "./", "../", "~")):
        raise BackendUnavailable(f"chat model folder {model} does not exist")
    return None


def folder_revision(folder: Path) -> str:
    """A short content hash of a model folder (see HASHED_SUFFIXES): the same folder gives the same
    revision on every machine, and editing its config or tokenizer changes it."""
    digest = hashlib.sha256()
    for path in sorted([*folder.glob("*"), *folder.glob("chat_templates/*")]):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and path.name.endswith(HASHED_SUFFIXES):
            digest.update(f"{name}\0{path.stat().st_size}\0".encode() + path.read_bytes())
        elif path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def model_revision(model: str, folder: Path | None, requested: str | None) -> str:
    """The hub commit when we know it, else the content hash of a local folder, else what was
    asked for. A hub id's files sit in the HF cache under snapshots/<commit>/, and so does a folder
    given as a path into that cache."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    if folder is not None:
        resolved = folder.resolve()
        if resolved.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", resolved.name):
            return resolved.name
        return folder_revision(folder)
    # from_pretrained has just fetched config.json: this finds it in the cache.
    config_file = cached_file(model, "config.json", revision=requested, _raise_exceptions_for_missing_entries=False)
    return extract_commit_hash(config_file, None) or requested or ""


def resolve_revision(model: str, revision: str | None = None) -> str:
    """What `HFChat(model, revision=revision).revision` will be, without loading the weights (a
    job's driver records it before its workers load the model); `revision` or "" when a hub id's
    files are not on this machine. BackendUnavailable for a folder path that does not exist."""
    folder = local_folder(model)
    try:
        return model_revision(model, folder, revision)
    except OSError:  # a hub id this machine cannot reach: the workers will resolve it
        return revision or ""


def is_resolved(revision: str) -> bool:
    """Whether a revision names content (a folder hash or a hub commit), not just a branch or tag."""
    return revision.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def load_model(model: str, revision: str | None, device: str, dtype):
    """(model, config, takes_images): the model on `device` in eval mode, an image-text-to-text
    model or else a causal LM (a text-only model, for prompt expansion)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except Exception as exc:  # a folder without config.json, an unknown model_type, an id not in the cache
        raise BackendUnavailable(f"cannot load chat model {model}: {one_line(exc)}") from exc
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto_class._model_mapping:
            break
    else:
        raise BackendUnavailable(
            f"chat model {model} is a {config.model_type!r} model, not an image-text-to-text or causal language model"
        )
    try:
        loaded = auto_class.from_pretrained(model, revision=revision, dtype=dtype).to(device).eval()
    except Exception as exc:  # missing weights, a missing dependency, out of memory
        why = f"{type(exc).__name__}: {one_line(exc)}"
        raise BackendUnavailable(f"cannot load chat model {model} on {device}: {why}") from exc
    return loaded, config, auto_class is AutoModelForImageTextToText


def load_processor(model: str, revision: str | None, config, takes_images: bool):
    """(processor, path): see the module docstring for the three paths. Whatever comes back renders
    a chat template (`apply_chat_template`) and makes generate()'s inputs when called."""
    from transformers import AutoProcessor, AutoTokenizer

    if not takes_images:
        try:
            return AutoTokenizer.from_pretrained(model, revision=revision), "tokenizer"
        except Exception as exc:
            raise BackendUnavailable(f"cannot load the tokenizer of chat model {model}: {one_line(exc)}") from exc
    try:
        processor = AutoProcessor.from_pretrained(model, revision=revision)
    except Exception as exc:  # ImportError without torchvision, and whatever else stops it: try the fallback
        why = one_line(exc)
    else:
        if hasattr(processor, "image_processor"):
            return processor, "processor"
        why = "it has no image processor"
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise BackendUnavailable(
            f"cannot load the processor of chat model {model} ({why}), and {config.model_type!r} has no fallback "
            f"(families with one: {', '.join(FAMILIES)})"
        )
    logger.info("chat model %s: AutoProcessor did not load (%s); using the tokenizer and PIL image processor", model, why)
    return load_fallback_processor(model, revision, config, family), "fallback"


def load_fallback_processor(model: str, revision: str | None, config, family: Family) -> FallbackProcessor:
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file

    def optional_json(filename: str) -> dict[str, Any]:
        found = cached_file(model, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
        return json.loads(Path(found).read_text()) if found else {}

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        image_processor = AutoImageProcessor.from_pretrained(model, revision=revision, backend="pil")
        settings = {k: v for k, v in optional_json("processor_config.json").items() if k != "image_processor"}
        # Templates live with the tokenizer (tokenizer_config.json, chat_template.jinja) or, in older
        # repos, only in the processor's chat_template.json.
        chat_template = tokenizer.chat_template or optional_json("chat_template.json").get("chat_template")
        if isinstance(chat_template, dict):  # named templates: the processor renders "default"
            chat_template = chat_template.get("default")
    except Exception as exc:
        why = one_line(exc)
        raise BackendUnavailable(f"cannot load the tokenizer or PIL image processor of chat model {model}: {why}") from exc
    if not chat_template:
        raise BackendUnavailable(f"chat model {model} has no chat template (tokenizer_config.json, chat_template.*)")
    missing = [key for key in family.needs_settings if settings.get(key) is None]
    if missing:
        raise BackendUnavailable(f"chat model {model}: processor_config.json lacks {', '.join(missing)}")
    processor = FallbackProcessor(family, tokenizer, image_processor, chat_template, settings)
    if processor.image_token_id != config.image_token_id:
        raise BackendUnavailable(
            f"chat model {model}: the tokenizer's {processor.image_token} is id {processor.image_token_id}, "
            f"the model's image_token_id is {config.image_token_id}"
        )
    return processor


# --- the backend -----------------------------------------------------------------------------------


class FrameError(ValueError):
    """A frame that cannot be decoded, or that the image processor refuses: its request fails."""


class HFChat:
    """A transformers model as a `ChatBackend`. See the module docstring.

    Attributes: `model_id` (as given), `revision` (hub commit or folder hash), `device`, `dtype`
    (a torch dtype), `batch_size`, `sampling`, `processor_path` ("processor" | "fallback" |
    "tokenizer"), `takes_images`.
    """

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        sampling: Sampling = Sampling(),
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_id = model
        self.sampling = sampling
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        folder = local_folder(model)
        self._model, config, self.takes_images = load_model(str(folder or model), revision, self.device, self.dtype)
        self.revision = model_revision(model, folder, revision)
        self._processor, self.processor_path = load_processor(str(folder or model), revision, config, self.takes_images)
        self._tokenizer = getattr(self._processor, "tokenizer", self._processor)
        if not self._processor.chat_template:
            raise BackendUnavailable(f"chat model {model} has no chat template")
        # Batches are padded on the left, so every row's new tokens start at the same column.
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token is None:  # Llama-style tokenizers have none; padding is masked anyway
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._generation_config = generation_config(self._model.generation_config, sampling, self._tokenizer)
        eos = self._generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        logger.info(
            "chat model %s (revision %s) on %s as %s, inputs by %s",
            model, self.revision, self.device, self.dtype, self.processor_path,
        )

    def __repr__(self) -> str:
        return (
            f"HFChat(model={self.model_id!r}, revision={self.revision!r}, device={self.device!r}, "
            f"processor_path={self.processor_path!r})"
        )

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        """One reply per request, in order; `batch_size` requests per generate() call. Frames are
        decoded batch by batch, so a long list of requests never holds all its frames at once."""
        if self._model is None:
            raise RuntimeError("this HFChat is closed")
        for request in requests:
            if request.video is not None and not request.images:
                raise ValueError("a request carries a video but no frames, and HFChat takes frames")
            if request.images and not self.takes_images:
                raise BackendUnavailable(f"chat model {self.model_id} is text-only and cannot take a request's frames")
        replies: list[ChatReply | None] = [None] * len(requests)
        batch = []  # (index in requests, request, its frames as PIL images)
        for index, request in enumerate(requests):
            try:
                batch.append((index, request, self._frames(request.images)))
            except FrameError as exc:
                replies[index] = ChatReply(text=None, error=str(exc))
            if batch and (len(batch) == self.batch_size or index == len(requests) - 1):
                for (answered, _, _), reply in zip(batch, self._chat_batch(batch)):
                    replies[answered] = reply
                batch = []
        return replies

    def close(self) -> None:
        """Free the model (and the CUDA cache it held). Safe to call twice."""
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _frames(self, images: Sequence[bytes]) -> list:
        """JPEG bytes -> RGB PIL images, checked by the image processor: a frame it refuses (Qwen2-VL:
        an aspect ratio over 200:1) fails this request alone, not the whole batch. The check costs
        milliseconds next to generate()."""
        from PIL import Image, UnidentifiedImageError

        frames = []
        for number, payload in enumerate(images):
            try:
                with Image.open(io.BytesIO(payload)) as image:
                    frames.append(image.convert("RGB"))  # convert() decodes the whole frame
            except UnidentifiedImageError as exc:  # its message would show a BytesIO's address
                raise FrameError(f"frame {number} cannot be decoded: not an image format PIL reads") from exc
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise FrameError(f"frame {number} cannot be decoded: {one_line(exc)}") from exc
        if frames:
            try:
                self._processor.image_processor(frames)
            except (ValueError, TypeError) as exc:
                raise FrameError(f"the image processor refuses a frame: {one_line(exc)}") from exc
        return frames

    def _prompt(self, request: ChatRequest) -> str:
        messages = chat_messages(request, self.takes_images)
        return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _chat_batch(self, batch: list[tuple[int, ChatRequest, list]]) -> list[ChatReply]:
        import torch

        started = time.perf_counter()
        frames = [frame for _, _, request_frames in batch for frame in request_frames]
        try:
            prompts = [self._prompt(request) for _, request, _ in batch]
            # A template that writes the BOS token itself must not get a second one from the
            # tokenizer (ProcessorMixin.apply_chat_template's rule).
            bos = self._tokenizer.bos_token
            kwargs = {"padding": True, "return_tensors": "pt", "add_special_tokens": not (bos and prompts[0].startswith(bos))}
            if self.processor_path == "tokenizer":
                inputs = self._processor(prompts, **kwargs)
            else:
                inputs = self._processor(text=prompts, images=frames or None, **kwargs)
            inputs = {
                name: value.to(self.device, dtype=self.dtype if value.is_floating_point() else None)
                for name, value in dict(inputs).items()
            }
            with torch.inference_mode():
                torch.manual_seed(self.sampling.seed)
                output = self._model.generate(**inputs, generation_config=self._generation_config)
        except Exception as exc:  # OOM, a template error, a token count the model rejects: never the request's
            why = f"{type(exc).__name__}: {one_line(exc)}"
            raise BackendUnavailable(f"chat model {self.model_id} failed to generate: {why}") from exc
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()  # (B, N_new), left padding: same start
        replies = [self._reply(row) for row in new_tokens]
        seconds = (time.perf_counter() - started) / len(batch)
        for reply in replies:
            reply.seconds = seconds
        return replies

    def _reply(self, tokens: list[int]) -> ChatReply:
        """A row of new tokens up to its first stop token (what follows is padding). The stop token
        counts as output but is not text, as an OpenAI-style endpoint answers."""
        stop = next((i for i, token in enumerate(tokens) if token in self._eos_ids), None)
        text = self._tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
        return ChatReply(
            text=text,
            output_tokens=len(tokens) if stop is None else stop + 1,
            finish_reason="length" if stop is None else "stop",
        )


def chat_messages(request: ChatRequest, takes_images: bool) -> list[dict[str, Any]]:
    """The conversation a chat template renders: vision-language templates take content as typed
    parts (one image part per frame, in time order, then the prompt), text-only ones a string."""
    if takes_images:
        user = [*({"type": "image"} for _ in request.images), {"type": "text", "text": request.prompt}]
        system = [{"type": "text", "text": request.system}] if request.system is not None else None
    else:
        user, system = request.prompt, request.system
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": user}]


def generation_config(base, sampling: Sampling, tokenizer):
    """The model's generation config (its stop tokens, repetition penalty) with our sampling on top:
    greedy at temperature 0, else temperature and top-p alone (top_k=0 turns off the top-k
    transformers would add), as an OpenAI-style endpoint samples."""
    config = copy.deepcopy(base)
    greedy = sampling.temperature == 0
    config.update(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else 0,
        num_beams=1,
    )
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config
