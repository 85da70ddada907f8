"""Tiny randomly initialised vision-language models, saved the way a hub folder is laid out.

No model hub here, so the chat backend's tests (and the recaption stage's) load these through the
same `from_pretrained` code that loads a downloaded Qwen2-VL or LLaVA: a byte-level BPE tokenizer
trained offline on CAPTION_TEXT with the family's special tokens and chat template,
the family's image processor config, and the weights as safetensors. Each folder is a few hundred
KB and builds in well under a second (after `transformers` is imported).

    save_tiny_qwen2_vl(tmp_path / "qwen")  -> the folder (Qwen2VLForConditionalGeneration)
    save_tiny_llava(tmp_path / "llava")    -> the folder (LlavaForConditionalGeneration)
    save_tiny_qwen2_lm(tmp_path / "lm")    -> the folder (Qwen2ForCausalLM: text only, prompt expansion)

The weights are random, so what the models say is noise; what the tests check is how it is said
(token counts, determinism, batching, errors).
"""

from __future__ import annotations

from pathlib import Path

# A few hundred words of caption-like text: the tokenizers' whole training corpus.
CAPTION_TEXT = """
a red fox runs through deep snow at dawn while the camera follows from a low angle
waves crash on a rocky beach at sunset and the sky turns orange then purple
a busy city street at night with neon lights reflected in wet asphalt and people walking
the camera pans slowly over a green forest with a river winding below in the valley
a man in a blue jacket rides a bicycle along a quiet road lined with tall trees
close up of hands kneading dough on a wooden table dusted with flour in a warm kitchen
aerial shot of a small village surrounded by fields of yellow flowers in spring
a cat sleeps on a sunny windowsill and slowly opens one eye as a bird flies past
time lapse of clouds moving over snowy mountains as the light changes from day to night
a woman reads a book in a cafe while rain runs down the glass beside her
two dogs chase a ball across a park lawn and tumble over each other
the train leaves the station and the platform empties as the doors close
fireworks burst above a harbour full of boats and their colours shimmer on the water
a chef slices vegetables quickly on a cutting board with a large steel knife
children build a sandcastle near the shore while gulls circle overhead
a drone flies low over a desert road where a single car drives toward the horizon
steam rises from a cup of coffee on a table next to an open laptop
a skateboarder jumps down a set of concrete stairs in an empty plaza
leaves fall from an old oak tree in autumn and cover the path in red and gold
a lighthouse stands on a cliff as fog rolls in from the sea at dusk
describe this video in one sentence what happens in these frames write a short caption
the scene shows a slow dolly shot a handheld shot a static wide shot a tracking shot
rewrite the prompt with more detail about lighting colour motion and camera movement
"""

# Qwen2-VL's own chat template (Qwen/Qwen2-VL-2B-Instruct): one <|vision_start|><|image_pad|><|vision_end|>
# per image entry, a default system prompt when the conversation has none.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's template, less its {% generation %} markers: images first, then text.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2.5-Instruct's template reduced to what a prompt rewriter sends: string contents.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Weights at std 0.2 rather than the usual 0.02: at 0.02 a model this small answers nearly the same
# whatever its input, so a wrong position id or a dropped image would go unseen by the tests.
INIT_STD = 0.2


def train_tokenizer(special_tokens: list[str], vocab_size: int = 480):
    """A byte-level BPE `tokenizers.Tokenizer` trained on CAPTION_TEXT; the special tokens get
    the first ids, in the order given, and are never split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    lines = [line for line in CAPTION_TEXT.splitlines() if line]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def save_tiny_qwen2_vl(path: Path, seed: int = 0) -> Path:
    """A Qwen2-VL at toy size in `path`: 2 text layers of width 32, a 1-block vision tower with
    4-pixel patches, and an image processor that resizes frames to at most 32x32 pixels, so a
    frame costs at most (32/4)^2 / 2^2 = 16 image tokens."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = train_tokenizer(QWEN2_VL_SPECIAL_TOKENS)
    ids = {token: bpe.token_to_id(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(path)
    # The real processor's layout: patch_size * merge_size = 8 is the resize factor; 64..1024 pixels.
    Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32}
    ).save_pretrained(path)

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": bpe.get_vocab_size(),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "initializer_range": INIT_STD,
            # head_dim 8 -> 4 rotary frequencies, split over (time, height, width) positions
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,  # the merger's output width: the text model's hidden_size
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "initializer_range": INIT_STD,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(path)
    return path


def save_tiny_llava(path: Path, seed: int = 0) -> Path:
    """A LLaVA-1.5 at toy size in `path`: a 1-layer CLIP tower on 16x16 crops with 4-pixel patches
    (16 patches + CLS; the "default" strategy drops CLS, so 16 image tokens per frame) and a
    2-layer Llama of width 32. The tokenizer prepends <s> like Llama's."""
    import torch
    from tokenizers import processors
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = train_tokenizer(LLAVA_SPECIAL_TOKENS)
    ids = {token: bpe.token_to_id(token) for token in LLAVA_SPECIAL_TOKENS}
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    # processor_config.json carries what the processor needs to count image tokens, as on the hub.
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(path)

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            initializer_range=INIT_STD,
        ),
        text_config=LlamaConfig(
            vocab_size=bpe.get_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            initializer_range=INIT_STD,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"],
        initializer_range=INIT_STD,
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]
    )
    model.save_pretrained(path)
    return path


def save_tiny_qwen2_lm(path: Path, seed: int = 0) -> Path:
    """A text-only Qwen2 causal LM at toy size in `path` (2 layers of width 32), with the Qwen
    tokenizer above and a string-content chat template: the prompt expansion kind of model."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = train_tokenizer(QWEN2_VL_SPECIAL_TOKENS)
    ids = {token: bpe.token_to_id(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN2_CHAT_TEMPLATE
    ).save_pretrained(path)
    config = Qwen2Config(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=INIT_STD,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(path)
    return path
