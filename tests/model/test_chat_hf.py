"""model/chat_hf.py: tiny random Qwen2-VL, LLaVA and Qwen2 models (tests/model/tiny_vlm.py),
saved to disk and loaded through HFChat's real from_pretrained code; real JPEG frames.

torchvision cannot be installed beside our CPU torch, so Qwen2-VL's AutoProcessor does not load
here and HFChat builds its inputs itself (the "fallback" path). Those inputs are checked token for
token against the real processor classes, and the model's own forward checks that the image
token count matches the vision features (it raises otherwise, which HFChat reports as
BackendUnavailable, so every caption test below is that check too).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model.chat import BackendUnavailable, ChatRequest, Sampling
from model.chat_backends import BackendSpec, make_backend
from model.chat_hf import FAMILIES, HFChat, chat_messages, load_fallback_processor, resolve_device, resolve_dtype
from tests.model.tiny_vlm import save_tiny_llava, save_tiny_qwen2_lm, save_tiny_qwen2_vl

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
SHORT = Sampling(max_new_tokens=6)


def jpeg(seed: int, height: int = 48, width: int = 64) -> bytes:
    """A frame of noise with a coloured gradient, as JPEG bytes (a different frame per seed)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    pixels[..., seed % 3] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# 1 to 4 frames of different sizes, a text-only request and a system prompt, in one batch.
REQUESTS = [
    ChatRequest("describe this video in one sentence", images=(jpeg(1), jpeg(2))),
    ChatRequest("what happens in these frames", images=(jpeg(3), jpeg(4, 64, 48), jpeg(5), jpeg(6))),
    ChatRequest("rewrite the prompt: a red fox runs through the snow"),
    ChatRequest("write a short caption", images=(jpeg(7, 40, 40),), system="You describe video clips."),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {
        "qwen2_vl": save_tiny_qwen2_vl(root / "qwen2_vl"),
        "llava": save_tiny_llava(root / "llava"),
        "qwen2_lm": save_tiny_qwen2_lm(root / "qwen2_lm"),
    }


@pytest.fixture(scope="module")
def backends(folders) -> dict[str, HFChat]:
    """One backend per VLM, batch_size 4: REQUESTS in a single generate() call."""
    made = {name: HFChat(str(folders[name]), sampling=SHORT, batch_size=4) for name in ("qwen2_vl", "llava")}
    yield made
    for backend in made.values():
        backend.close()


def test_each_family_loads_on_cpu_through_the_expected_path(backends, folders):
    # Qwen2-VL's AutoProcessor needs torchvision; LLaVA's does not, so it loads its own processor.
    assert backends["qwen2_vl"].processor_path == ("processor" if HAS_TORCHVISION else "fallback")
    assert backends["llava"].processor_path == "processor"
    for name, backend in backends.items():
        assert backend.model_id == str(folders[name])
        assert (backend.device, backend.dtype, backend.takes_images) == ("cpu", torch.float32, True)
        assert backend.revision.startswith("sha256:") and len(backend.revision) == len("sha256:") + 16
    # model/chat_backends.py passes BackendSpec's fields by the names HFChat takes.
    spec = BackendSpec(kind="hf", model=str(folders["qwen2_vl"]), sampling=SHORT, dtype="float32", batch_size=2)
    made = make_backend(spec)
    assert isinstance(made, HFChat) and made.batch_size == 2 and made.revision == backends["qwen2_vl"].revision
    made.close()


def test_device_and_dtype(folders):
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1"
    assert (resolve_dtype("auto", "cuda:0"), resolve_dtype("auto", "cpu")) == (torch.bfloat16, torch.float32)
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be auto, float16, bfloat16, float32; got 'fp8'"):
        resolve_dtype("fp8", "cpu")
    # bfloat16 as on a GPU: pixel values are cast to the model's dtype, token ids are not.
    for name in ("qwen2_vl", "llava"):
        backend = HFChat(str(folders[name]), sampling=SHORT, dtype="bfloat16")
        assert backend.dtype == torch.bfloat16
        assert all(isinstance(reply.text, str) for reply in backend.chat(REQUESTS[:2]))
        backend.close()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_captions_come_from_generate(backends, family):
    replies = backends[family].chat(REQUESTS)
    assert len(replies) == len(REQUESTS)
    for reply in replies:
        assert isinstance(reply.text, str) and reply.error is None
        assert reply.finish_reason in ("stop", "length") and 1 <= reply.output_tokens <= SHORT.max_new_tokens
        assert reply.seconds > 0
    # Four prompts with different frames: a model that looked at none of them would repeat itself.
    assert len({reply.text for reply in replies}) > 1


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_greedy_is_deterministic_and_batching_does_not_change_it(backends, folders, family):
    batched = backends[family].chat(REQUESTS)
    assert [r.text for r in backends[family].chat(REQUESTS)] == [r.text for r in batched]
    # One request per generate(): no padding at all. Left padding with the attention mask and,
    # for Qwen2-VL, M-RoPE positions computed on the unpadded tokens, must give the same tokens.
    alone = HFChat(str(folders[family]), sampling=SHORT, batch_size=1)
    replies = alone.chat(REQUESTS)
    assert [(r.text, r.output_tokens) for r in replies] == [(r.text, r.output_tokens) for r in batched]
    alone.close()


def real_qwen2_vl_processor(folder):
    """The real Qwen2VLProcessor minus its video processor, which needs torchvision: its
    constructor insists on one, so the attributes its __init__ would set are set here. Images go
    through the real __call__, placeholder expansion and mm_token_type_ids included."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    processor = object.__new__(Qwen2VLProcessor)
    processor.chat_template = tokenizer.chat_template
    processor.tokenizer = tokenizer
    processor.image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)
    return processor


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_fallback_inputs_equal_the_real_processor(folders, family):
    from transformers import AutoConfig, AutoProcessor

    folder = str(folders[family])
    if family == "qwen2_vl":
        real = real_qwen2_vl_processor(folder)
    else:
        real = AutoProcessor.from_pretrained(folder)
        real.tokenizer.padding_side = "left"
    fallback = load_fallback_processor(folder, None, AutoConfig.from_pretrained(folder), FAMILIES[family])
    fallback.tokenizer.padding_side = "left"
    messages = [chat_messages(request, takes_images=True) for request in REQUESTS]
    prompts = [fallback.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    assert prompts == [real.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    frames = [Image.open(io.BytesIO(frame)).convert("RGB") for request in REQUESTS for frame in request.images]
    expected = real(text=prompts, images=frames, padding=True, return_tensors="pt")
    got = fallback(text=prompts, images=frames, padding=True, return_tensors="pt")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # Image tokens per request, by hand. Qwen2-VL resizes 48x64 and 64x48 frames to 24x32 / 32x24
    # (at most 1024 pixels, multiples of 8): 6x8 patches of 4 pixels, merged 2x2 -> 12 tokens; a 40x40
    # frame to 32x32 -> 16 tokens. LLaVA crops every frame to 16x16: 4x4 patches -> 16 tokens.
    image_tokens = (got["input_ids"] == fallback.image_token_id).sum(dim=1).tolist()
    assert image_tokens == {"qwen2_vl": [24, 48, 0, 16], "llava": [32, 64, 0, 16]}[family]


def test_text_only_requests(backends, folders):
    for backend in backends.values():
        (reply,) = backend.chat([ChatRequest("rewrite the prompt: waves crash on a rocky beach")])
        assert isinstance(reply.text, str) and reply.output_tokens >= 1
    # A text-only causal LM (prompt expansion) loads too, with its tokenizer alone.
    lm = HFChat(str(folders["qwen2_lm"]), sampling=SHORT)
    assert (lm.processor_path, lm.takes_images) == ("tokenizer", False)
    replies = lm.chat([ChatRequest("a red fox", system="Rewrite the prompt."), ChatRequest("a city street at night")])
    assert all(isinstance(reply.text, str) and reply.finish_reason for reply in replies)
    with pytest.raises(BackendUnavailable, match="text-only"):
        lm.chat([ChatRequest("describe", images=(jpeg(1),))])
    lm.close()


def test_bad_frames_fail_only_their_request(backends):
    good = REQUESTS[0]
    truncated = jpeg(8)[:200]
    sliver = jpeg(9, height=2, width=600)  # Qwen2-VL refuses an aspect ratio over 200:1
    requests = [
        good,
        ChatRequest("describe", images=(jpeg(1), b"not a jpeg at all")),
        ChatRequest("describe", images=(truncated,)),
        ChatRequest("describe", images=(sliver,)),
        REQUESTS[2],
    ]
    replies = backends["qwen2_vl"].chat(requests)
    assert [reply.text is None for reply in replies] == [False, True, True, True, False]
    assert replies[1].error == "frame 1 cannot be decoded: not an image format PIL reads"
    assert replies[2].error.startswith("frame 0 cannot be decoded:")
    assert "aspect ratio" in replies[3].error
    assert all("\n" not in reply.error for reply in replies[1:4])
    # The requests around them answer as they would alone.
    assert [r.text for r in (replies[0], replies[4])] == [r.text for r in backends["qwen2_vl"].chat([good, REQUESTS[2]])]


def test_models_that_cannot_load_are_backend_unavailable(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackendUnavailable) as caught:
        HFChat(str(missing))
    assert str(caught.value) == f"chat model folder {missing} does not exist"
    # A folder holding a model that neither reads images into text nor writes text: a ViT.
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "vit"
    )
    not_a_chat_model = "is a 'vit' model, not an image-text-to-text or causal language model"
    with pytest.raises(BackendUnavailable, match=not_a_chat_model) as caught:
        HFChat(str(tmp_path / "vit"))
    assert "\n" not in str(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendUnavailable, match=f"cannot load chat model {tmp_path / 'empty'}") as caught:
        HFChat(str(tmp_path / "empty"))
    assert "\n" not in str(caught.value)


def test_revision_is_a_content_hash_of_a_local_folder(tmp_path, folders, backends):
    folder = shutil.copytree(folders["qwen2_vl"], tmp_path / "copy")
    first = HFChat(str(folder)).revision
    assert first == HFChat(str(folder)).revision == backends["qwen2_vl"].revision  # another load, another path
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    assert HFChat(str(folder)).revision != first
    # A folder in the HF cache layout is named after its hub commit: that is the revision.
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = shutil.copytree(folders["llava"], tmp_path / "models--tiny--llava" / "snapshots" / commit)
    assert HFChat(str(snapshot)).revision == commit


def test_a_hub_id_loads_offline_from_the_hf_cache(tmp_path, folders):
    """A hub id, no network: from_pretrained finds the files in the HF cache, and the revision is
    the commit the cache holds. In a fresh interpreter, since the cache location is read at import."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--tiny--qwen2-vl"
    shutil.copytree(folders["qwen2_vl"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "from model.chat import ChatRequest, Sampling\n"
        "from model.chat_hf import HFChat\n"
        "backend = HFChat('tiny/qwen2-vl', sampling=Sampling(max_new_tokens=2))\n"
        "(reply,) = backend.chat([ChatRequest('describe', images=(JPEG,))])\n"
        "print(backend.model_id, backend.revision, reply.output_tokens)\n"
    ).replace("JPEG", repr(jpeg(1)))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["tiny/qwen2-vl", commit, "2"]


def test_max_new_tokens_and_finish_reasons(tmp_path, folders):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    request = REQUESTS[2]  # text only: its input ids are the tokenizer's alone
    (reply,) = HFChat(str(folders["qwen2_vl"]), sampling=Sampling(max_new_tokens=5)).chat([request])
    assert (reply.output_tokens, reply.finish_reason) == (5, "length")
    # Make the third token greedy decoding picks a stop token (as Qwen lists two eos ids): the
    # reply stops there, counts it, and its text is what came before it.
    folder = str(folders["qwen2_vl"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "text", "text": request.prompt}]}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    stop_at = greedy.index(greedy[2])  # its first appearance
    stopping = shutil.copytree(folder, tmp_path / "stopping")
    generation = json.loads((stopping / "generation_config.json").read_text())
    generation["eos_token_id"] = [generation["eos_token_id"], greedy[2]]
    (stopping / "generation_config.json").write_text(json.dumps(generation))
    (reply,) = HFChat(str(stopping), sampling=Sampling(max_new_tokens=5)).chat([request])
    assert (reply.output_tokens, reply.finish_reason) == (stop_at + 1, "stop")
    assert reply.text == tokenizer.decode(greedy[:stop_at], skip_special_tokens=True).strip()


def test_sampling_follows_its_seed(folders):
    def sample(seed: int) -> list[str | None]:
        backend = HFChat(str(folders["llava"]), sampling=Sampling(max_new_tokens=8, temperature=1.0, seed=seed))
        return [reply.text for reply in backend.chat(REQUESTS)]

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_close_frees_the_model(folders):
    backend = HFChat(str(folders["llava"]), sampling=SHORT)
    backend.close()
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.chat([ChatRequest("hello")])
