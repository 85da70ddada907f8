"""`reelforge generate` end to end: a real bundle on disk, the real CLI dispatch, a real MP4 out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from infra.cli import main as reelforge
from model.bundle import save_bundle
from model.dit import DiT, dit_config
from infra.generate import main, resolve_model_path
from model.mp4 import write_mp4
from model.video_io import read_video


STYLE = ["A red square slides slowly across a dark blue background.", "A green circle drifts upward in soft light."]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = dit_config("tiny", in_channels=12, text_dim=384, depth=1, hidden_size=48, num_heads=4, max_text_tokens=16)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # adaLN-Zero init predicts 0; make the output depend on the input
    return save_bundle(
        tmp_path_factory.mktemp("bundle"), model, cfg, autoencoder="pixel:s=2,t=1", text_encoder="minilm",
        fps=6, num_frames=6, width=16, height=16,
        extra={"generation": {"steps": 2, "guidance": 2.0}, "prompt_style": {"source": "shards", "examples": STYLE}},
    )


def test_cli_writes_a_decodable_mp4(bundle_dir, tmp_path, capsys):
    out = tmp_path / "out" / "fox.mp4"
    code = reelforge(["generate", "--model", str(bundle_dir), "--prompt", "a red fox", "--frames", "5",
                      "--size", "24x16", "--steps", "2", "--seed", "7", "--out", str(out)])
    assert code == 0
    frames = read_video(out)
    assert tuple(frames.shape) == (5, 16, 24, 3)
    assert "5 frames 24x16 at 6 fps" in capsys.readouterr().out


def test_cli_image_mode_and_long_video(bundle_dir, tmp_path):
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "first.png")
    out = tmp_path / "anim.mp4"
    assert main(["--model", str(bundle_dir), "--image", str(tmp_path / "first.png"), "--seconds", "2.5",
                 "--out", str(out)]) == 0
    frames = read_video(out)
    assert frames.shape[0] == 15  # 2.5 s at the bundle's 6 fps, over three windows
    assert (frames[0].float() - 200).abs().mean() < 3  # the image is frame 0 (up to H.264 loss)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "{tmp}/missing.png"], "image file not found"),
        (["--image", "{tmp}/broken.png"], "cannot read image"),
        (["--size", "18x16"], "size 18x16 must be positive multiples of 4x4"),
        (["--frames", "7"], "num_frames 7 must be in \\[1, 6\\]"),
        (["--frames", "0"], "num_frames 0 must be in"),
        (["--video", "{tmp}/clip.mp4"], "--video needs --mode"),
        (["--video", "{tmp}/clip.mp4", "--mode", "extend", "--overlap", "4", "--frames", "4"], "needs more than 4 frames"),
        (["--out", "{tmp}/x.gif"], "must end in .mp4"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(bundle_dir, tmp_path, capsys, extra, message):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    write_mp4(np.zeros((6, 16, 16, 3), np.uint8), 6, tmp_path / "clip.mp4")
    argv = ["--model", str(bundle_dir), "--prompt", "a cat", "--out", str(tmp_path / "o.mp4")]
    argv += [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("reelforge generate: error: ")
    import re

    assert re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "o.mp4").exists()


def test_model_reference_errors(tmp_path):
    with pytest.raises(ValueError, match="no such bundle folder"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not an inference bundle"):
        resolve_model_path(str(tmp_path))
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o.mp4")]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse: malformed size
        main(["--model", str(tmp_path), "--size", "big", "--out", str(tmp_path / "o.mp4")])
    assert exc.value.code == 2


def test_expand_prompt_through_an_endpoint_records_both_prompts(bundle_dir, tmp_path, capsys):
    """--expand-prompt: the prompt is rewritten by an OpenAI-compatible endpoint (a real server on
    loopback; the language model behind it is faked: it cannot run here) shown the bundle's
    training captions; OUT.json keeps the original and the expanded prompt."""
    import json

    from tests.model.chat_server import ChatServer

    expanded = "A small red fox trots through deep snow under a pale morning sky."
    out = tmp_path / "fox.mp4"
    args = ["--model", str(bundle_dir), "--prompt", "a fox in snow", "--frames", "3", "--steps", "1", "--out", str(out), "--expand-prompt"]
    with ChatServer(reply=lambda body: expanded) as server:
        assert main([*args, "--expand-endpoint", server.url, "--expand-model", "rewriter"]) == 0
        [request] = [r.body for r in server.requests]
    user = request["messages"][-1]["content"]
    assert request["model"] == "rewriter" and all(example in user for example in STYLE) and "Prompt: a fox in snow" in user
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["original_prompt"], record["prompt"], record["expanded"], record["expander"]) == ("a fox in snow", expanded, True, "rewriter")
    assert f"prompt: {expanded}" in capsys.readouterr().out

    # the endpoint gone: the video is still made, from the original prompt, with a warning
    assert main([*args, "--expand-endpoint", server.url, "--expand-model", "rewriter"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompt"] == "a fox in snow" and not record["expanded"] and "prompt expansion failed" in record["warning"]
    assert "warning: prompt expansion failed" in capsys.readouterr().out


def test_expand_prompt_with_a_local_model(bundle_dir, tmp_path):
    """A tiny random causal LM saved by the test (no model hub here) loads through the real code."""
    import json

    from tests.model.tiny_vlm import save_tiny_qwen2_lm

    folder = save_tiny_qwen2_lm(tmp_path / "lm")
    out = tmp_path / "local.mp4"
    assert main(["--model", str(bundle_dir), "--prompt", "a fox", "--frames", "3", "--steps", "1", "--out", str(out),
                 "--expand-prompt", "--expand-model", str(folder)]) == 0  # fmt: skip
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["expander"].startswith(f"{folder}@sha256:")
    assert record["expanded"] or "too short to be a caption" in record["warning"], record  # random weights may say little


def test_expand_prompt_needs_a_model(bundle_dir, tmp_path, capsys):
    assert main(["--model", str(bundle_dir), "--prompt", "a fox", "--out", str(tmp_path / "x.mp4"), "--expand-prompt"]) == 2
    assert "--expand-prompt needs --expand-model" in capsys.readouterr().err
