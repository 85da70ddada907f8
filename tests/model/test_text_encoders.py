"""model/text_encoders.py: the real offline MiniLM, and T5 / CLIP at toy size.

No model hub here: T5 and CLIP are tiny random-initialised models with a tiny word-level
tokenizer trained on a few sentences, saved to tmp_path and loaded back through
`load_text_encoder` (the same code that loads a downloaded folder).
"""

from __future__ import annotations

import pytest
import torch

from model.text_encoders import load_text_encoder

SENTENCES = [
    "a red fox runs through the snow",
    "waves crash on a rocky beach at sunset",
    "a city street at night with neon lights",
]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_minilm_offline_embeddings_and_mask(minilm):
    assert minilm.dim == 384 and minilm.max_length == 256 and minilm.spec == "minilm"
    prompts = ["a cat", "a slow aerial shot over a green forest with a river winding below", "a dog"]
    emb, mask = minilm.encode(prompts)
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert emb.shape[:2] == mask.shape and emb.shape[0] == 3 and emb.shape[2] == 384
    lengths = mask.sum(1)
    # [CLS] a cat [SEP] = 4 tokens; the long prompt sets the padded length.
    assert lengths[0] == 4 and lengths[1] == mask.shape[1] and lengths[2] == 4
    # Real tokens are a prefix; padding rows are zero.
    assert mask[0, :4].all() and not mask[0, 4:].any()
    assert emb[0, 4:].abs().sum() == 0 and emb[0, :4].abs().sum() > 0
    # Different prompts give different embeddings; the same prompt the same, whatever the batch.
    assert not torch.allclose(emb[0, :4], emb[2, :4])
    alone, _ = minilm.encode(["a cat"])
    torch.testing.assert_close(alone[0], emb[0, :4], atol=1e-5, rtol=1e-5)


def test_minilm_truncates_long_prompts():
    encoder = load_text_encoder("minilm", max_length=8)
    emb, mask = encoder.encode(["one two three four five six seven eight nine ten eleven"])
    assert emb.shape == (1, 8, 384) and mask.all()


def test_bad_specs_are_one_line_errors(tmp_path, minilm):
    with pytest.raises(ValueError, match="unknown text encoder 'bert:x'"):
        load_text_encoder("bert:x")
    with pytest.raises(ValueError, match="needs a location"):
        load_text_encoder("t5")
    with pytest.raises(ValueError, match="cannot load t5 text encoder from .*empty"):
        (tmp_path / "empty").mkdir()
        load_text_encoder(f"t5:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        minilm.encode("a bare string")


def _tiny_tokenizer(folder, bos_eos: bool):
    """A word-level tokenizer trained offline on SENTENCES, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    if bos_eos:  # CLIP style: <s> prompt </s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
        )
    else:  # T5 style: prompt </s>
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.save_pretrained(folder)
    return wrapped


def test_t5_from_local_pipeline_folder(tmp_path):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    # A diffusers-pipeline layout: text_encoder/ and tokenizer/ side by side.
    tokenizer = _tiny_tokenizer(tmp_path / "tokenizer", bos_eos=False)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(tmp_path / "text_encoder")
    encoder = load_text_encoder(f"t5:{tmp_path}")
    assert encoder.dim == 16 and encoder.max_length == 512
    emb, mask = encoder.encode(["a red fox", "waves crash on a rocky beach", "a red fox"])
    assert emb.shape == (3, 7, 16)  # 6 words + </s>
    assert mask.sum(1).tolist() == [4, 7, 4]
    assert emb[0, 4:].abs().sum() == 0
    torch.testing.assert_close(emb[0], emb[2])
    assert not torch.allclose(emb[0, :4], emb[1, :4])


def test_clip_from_local_folder(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(tmp_path / "clip", bos_eos=True)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    CLIPTextModel(config).save_pretrained(tmp_path / "clip")
    encoder = load_text_encoder(f"clip:{tmp_path / 'clip'}", max_length=5)
    assert encoder.dim == 24 and encoder.max_length == 5
    emb, mask = encoder.encode(["a city street", "a city street at night with neon lights"])
    assert emb.shape == (2, 5, 24)  # truncated to max_length
    assert mask.sum(1).tolist() == [5, 5]
    emb_short, mask_short = encoder.encode(["a fox"])
    assert mask_short.tolist() == [[True, True, True, True]]  # <s> a fox </s>
