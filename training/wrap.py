"""THE one place where the plain single-device DiT becomes a distributed training engine.

`model/dit.py` knows nothing of checkpointing, compilation, devices or ZeRO. Here they are applied,
always in this order (torchtitan's `parallelize` order, for the same reasons):

1. Activation checkpointing, per DiT block: each block's activations are recomputed in backward,
   trading ~30% more compute for memory linear in depth instead of depth x tokens. It goes first
   because compile must see the checkpointed region as one unit to fuse the recomputation.
2. `torch.compile`, per block (not the whole model): blocks are identical, so one compiled graph
   serves all of them, and a whole-model graph would break on the data-dependent RoPE grid.
   Compile before ZeRO: DeepSpeed's ZeRO-3 hooks fetch parameters around module calls, and they must
   wrap the compiled block, not be traced into it.
3. Device placement and DeepSpeed (`deepspeed.initialize`): ZeRO partitions optimizer states (1),
   gradients (2) and parameters (3) across the data-parallel workers; bf16 and clipping come from
   the DeepSpeed config (training/deepspeed_config.py).

For ZeRO-3 the model should be built inside `zero3_init(...)` so no rank ever holds the full fp32
weights (a 7B model is 28 GB in fp32): `build_context` returns that context, or a null one.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from training.config import DeepSpeedSection

logger = logging.getLogger(__name__)


class TrainingModule(nn.Module):
    """The DiT plus text dropout inside forward, so DeepSpeed sees one module call per step.

    Classifier-free guidance training swaps some captions for the DiT's learned null text. That
    parameter must be read inside a module's forward: under ZeRO-3 a parameter only holds its data
    while DeepSpeed's hooks have gathered it for the forward that uses it (registered below)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        cond_mask: torch.Tensor | None,
        drop_text: torch.Tensor,
    ) -> torch.Tensor:
        """As DiT.forward; drop_text (B,) bool replaces those rows' text with the null text."""
        null_text, null_mask = self.dit.null_text(x.shape[0], text.shape[1])  # (B, L, Dt), (B, L)
        text = torch.where(drop_text[:, None, None], null_text.to(text.dtype), text)
        text_mask = torch.where(drop_text[:, None], null_mask, text_mask)
        return self.dit(x, t, text, text_mask, cond_mask)  # (B, C, T, H, W)


class CheckpointedBlock(nn.Module):
    """A DiT block whose forward is recomputed during backward (non-reentrant checkpoint)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, *args, use_reentrant=False)


def build_context(deepspeed_section: DeepSpeedSection, ds_config: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Where to construct the model: `deepspeed.zero.Init` under ZeRO-3 (parameters are partitioned
    as each module is created), otherwise nothing special."""
    if deepspeed_section.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()


def wrap_model(
    model: TrainingModule,
    deepspeed_section: DeepSpeedSection,
    ds_config: dict[str, Any],
    lr_scheduler: Any,
) -> tuple[Any, Any, Any]:
    """Apply checkpointing, compile and DeepSpeed, in that order; returns (engine, optimizer, scheduler).

    `model.dit.blocks` (an nn.ModuleList) is rewritten in place; parameter names gain `.block` under
    checkpointing, which `export_name` removes again for export."""
    import deepspeed

    blocks = model.dit.blocks
    if deepspeed_section.activation_checkpointing:
        for i, block in enumerate(blocks):
            blocks[i] = CheckpointedBlock(block)
    if deepspeed_section.compile:
        for block in blocks:
            block.compile()  # in place: the module keeps its parameters, forward goes through Dynamo
    if deepspeed_section.zero_stage == 3:
        # null_text_embedding belongs to the DiT but is read in TrainingModule.forward first
        deepspeed.zero.register_external_parameter(model, model.dit.null_text_embedding)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lr_scheduler,
    )
    logger.info(
        "model wrapped: activation checkpointing %s, compile %s, ZeRO stage %d, bf16 %s",
        deepspeed_section.activation_checkpointing,
        deepspeed_section.compile,
        deepspeed_section.zero_stage,
        ds_config["bf16"]["enabled"],
    )
    return engine, optimizer, scheduler


def export_name(name: str) -> str:
    """Parameter name as `model/` knows it: `dit.blocks.0.block.attn...` -> `blocks.0.attn...`
    (drops TrainingModule's `dit.` and CheckpointedBlock's `.block`)."""
    return name.removeprefix("dit.").replace(".block.", ".")
