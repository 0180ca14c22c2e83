"""A zoo of tiny random-weight diffusers transformers, each with a matching forward call.

Every entry builds a seeded model in eval mode (heads 2 x head dim 8..16, one or two blocks of
each kind) and makes seeded, batch-sized keyword arguments for ``model(**kwargs)``; nothing is
downloaded.  Images come to 8 x 8 tokens after patch embedding, videos to 3 frames of 8 x 8;
``grid`` is that post-patch token grid, (frames, rows, cols).  Models that take packed tokens
(Flux, Chroma, Qwen-Image, LTX) get them packed here, with ids / shapes matching ``grid``.

``attention_lengths`` records the sequence length each attention module is called with, so tests
can tell image-only attention from text + image concatenations.  Run this file for a self-check.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import (
    get_2d_rotary_pos_embed,
    get_2d_rotary_pos_embed_lumina,
    get_3d_rotary_pos_embed,
    get_3d_rotary_pos_embed_allegro,
)
from diffusers.models.transformers import (
    AllegroTransformer3DModel,
    AuraFlowTransformer2DModel,
    ChromaTransformer2DModel,
    CogVideoXTransformer3DModel,
    CogView3PlusTransformer2DModel,
    CogView4Transformer2DModel,
    FluxTransformer2DModel,
    HiDreamImageTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    Lumina2Transformer2DModel,
    LuminaNextDiT2DModel,
    MochiTransformer3DModel,
    OmniGenTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from torch import Tensor, nn

ROWS = COLS = 8  # image tokens per side after patch embedding
FRAMES = 3  # latent frames of the video models (one token frame each: no temporal patching)
TEXT = 6  # text tokens


@dataclass(frozen=True)
class ZooModel:
    name: str  # zoo key, e.g. "wan"
    cls_name: str  # the diffusers class, e.g. "WanTransformer3DModel"
    build: Callable[[], nn.Module]  # tiny, seeded, eval()
    inputs: Callable[[int], dict[str, Any]]  # batch size -> kwargs of model(**kwargs), seeded
    grid: tuple[int, int, int]  # (frames, rows, cols) of image tokens after patch embedding
    video: bool


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    # fork_rng: seeding must not disturb the caller's global random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make().eval()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g)


def _image_ids(rows: int, cols: int, frame: int = 0) -> Tensor:
    """Flux-style (frame, row, col) position ids of a packed ``rows x cols`` token grid."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.full_like(r, frame), r, c], -1).reshape(-1, 3).float()


def _pack(latents: Tensor) -> Tensor:
    """(B, C, 2H, 2W) latents -> (B, H*W, 4C) tokens, the 2 x 2 packing of the Flux pipelines."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


# --- images ---------------------------------------------------------------------------------


def _build_sana() -> nn.Module:
    # patch 1 as in the real model (its DC-AE latents are already 32x compressed)
    return _seeded(
        lambda: SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
            cross_attention_dim=16, caption_channels=12, sample_size=ROWS, patch_size=1,
        )
    )  # fmt: skip


def _inputs_sana(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, ROWS, COLS),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "timestep": torch.full((batch,), 500.0),
    }


def _build_auraflow() -> nn.Module:
    return _seeded(
        lambda: AuraFlowTransformer2DModel(
            sample_size=2 * ROWS, patch_size=2, in_channels=4, out_channels=4,
            num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
            pos_embed_max_size=256,
        )
    )  # fmt: skip


def _inputs_auraflow(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, 2 * ROWS, 2 * COLS),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "timestep": torch.full((batch,), 0.5),
    }


def _build_hunyuan_dit() -> nn.Module:
    # four blocks: the long skips join block 0 to block 3, fewer blocks have none
    return _seeded(
        lambda: HunyuanDiT2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2,
            sample_size=2 * ROWS, hidden_size=32, num_layers=4, cross_attention_dim=16,
            cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=5, text_len_t5=TEXT,
        )
    )  # fmt: skip


def _inputs_hunyuan_dit(batch: int) -> dict[str, Any]:
    g = _gen()
    # the pipeline's rotary table: a square 8 x 8 grid cropped at base size 512 / 8 / 2 = 32
    cos, sin = get_2d_rotary_pos_embed(16, ((0, 0), (32, 32)), (ROWS, COLS), output_type="pt")
    return {
        "hidden_states": _randn(g, batch, 4, 2 * ROWS, 2 * COLS),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": _randn(g, batch, 5, 16),
        "text_embedding_mask": torch.ones(batch, 5),
        "encoder_hidden_states_t5": _randn(g, batch, TEXT, 16),
        "text_embedding_mask_t5": torch.ones(batch, TEXT),
        "image_meta_size": torch.tensor([[1024.0, 1024, 128, 128, 0, 0]]).repeat(batch, 1),
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": (cos, sin),
    }


def _build_lumina_next() -> nn.Module:
    return _seeded(
        lambda: LuminaNextDiT2DModel(
            sample_size=2 * ROWS, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
            num_attention_heads=2, num_kv_heads=1, multiple_of=16, learn_sigma=False,
            cross_attention_dim=16,
        )
    )  # fmt: skip


def _inputs_lumina_next(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, 2 * ROWS, 2 * COLS),
        "timestep": torch.full((batch,), 0.5),
        "encoder_hidden_states": _randn(g, batch, TEXT, 16),
        "encoder_mask": torch.ones(batch, TEXT),
        # complex (rows, cols, head_dim / 2) table; the model crops it to the token grid
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(16, ROWS, COLS),
        "cross_attention_kwargs": {},  # the blocks unpack it with **
    }


def _build_lumina2() -> nn.Module:
    return _seeded(
        lambda: Lumina2Transformer2DModel(
            sample_size=2 * ROWS, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
            axes_dim_rope=(8, 4, 4), axes_lens=(32, 32, 32), cap_feat_dim=16,
        )
    )  # fmt: skip


def _inputs_lumina2(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, 2 * ROWS, 2 * COLS),
        "timestep": torch.full((batch,), 0.5),
        "encoder_hidden_states": _randn(g, batch, TEXT, 16),
        # all text tokens valid: every sample has the same joint length, so no padding mask
        "encoder_attention_mask": torch.ones(batch, TEXT, dtype=torch.bool),
    }


def _build_cogview3plus() -> nn.Module:
    return _seeded(
        lambda: CogView3PlusTransformer2DModel(
            patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, out_channels=4, text_embed_dim=12, time_embed_dim=8,
            condition_dim=4, pos_embed_max_size=16, sample_size=2 * ROWS,
        )
    )  # fmt: skip


def _cogview_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    size = torch.tensor([[16.0 * ROWS, 16.0 * COLS]]).repeat(batch, 1)  # pixels: 8x VAE, patch 2
    return {
        "hidden_states": _randn(g, batch, 4, 2 * ROWS, 2 * COLS),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "original_size": size,
        "target_size": size,
        "crop_coords": torch.zeros(batch, 2),
    }


def _build_cogview4() -> nn.Module:
    return _seeded(
        lambda: CogView4Transformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, text_embed_dim=12, time_embed_dim=8, condition_dim=4,
            pos_embed_max_size=16, sample_size=2 * ROWS,
        )
    )  # fmt: skip


def _build_hidream() -> nn.Module:
    # one llama layer per block: len(llama_layers) == num_layers + num_single_layers
    return _seeded(
        lambda: HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, caption_channels=[12, 8],
            text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
            axes_dims_rope=(8, 4, 4), max_resolution=(2 * ROWS, 2 * COLS), llama_layers=[0, 1],
        )
    )  # fmt: skip


def _inputs_hidream(batch: int) -> dict[str, Any]:
    g = _gen()
    # square latents: the model patchifies them itself and makes img_ids (no padding mask)
    return {
        "hidden_states": _randn(g, batch, 4, 2 * ROWS, 2 * COLS),
        "timesteps": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states_t5": _randn(g, batch, TEXT, 12),
        # (llama layers, batch, tokens, dim): the first axis indexes hidden layers, not samples
        "encoder_hidden_states_llama3": _randn(g, 2, batch, 5, 8),
        "pooled_embeds": _randn(g, batch, 8),
    }


def _build_qwen_image() -> nn.Module:
    return _seeded(
        lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(8, 4, 4),
        )
    )  # fmt: skip


def _inputs_qwen_image(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _pack(_randn(g, batch, 4, 2 * ROWS, 2 * COLS)),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "encoder_hidden_states_mask": torch.ones(batch, TEXT, dtype=torch.long),
        "timestep": torch.full((batch,), 0.5),
        "img_shapes": [(1, ROWS, COLS)] * batch,
    }


def _build_chroma() -> nn.Module:
    return _seeded(
        lambda: ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
            axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
            approximator_layers=1,
        )
    )  # fmt: skip


def _inputs_chroma(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _pack(_randn(g, batch, 4, 2 * ROWS, 2 * COLS)),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": _image_ids(ROWS, COLS),
        "txt_ids": torch.zeros(TEXT, 3),
    }


def _build_omnigen() -> nn.Module:
    # Phi-3 style rope: su-scaling factors, one per frequency (head_dim / 2)
    return _seeded(
        lambda: OmniGenTransformer2DModel(
            in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=32, num_layers=2, pad_token_id=0,
            vocab_size=100, pos_embed_max_size=16, time_step_dim=8,
            rope_scaling={"long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
        )
    )  # fmt: skip


def _inputs_omnigen(batch: int) -> dict[str, Any]:
    g = _gen()
    image = ROWS * COLS
    seq = TEXT + 1 + image  # prompt tokens, the time token, the image tokens (in that order)
    # the pipeline's mask: causal over the prompt, the time + image tokens see each other
    mask = torch.ones(seq, seq).tril()
    mask[-(image + 1) :, -(image + 1) :] = 1
    return {
        "hidden_states": _randn(g, batch, 4, 2 * ROWS, 2 * COLS),
        "timestep": torch.full((batch,), 0.5),
        "input_ids": torch.randint(1, 100, (batch, TEXT), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": mask.expand(batch, seq, seq).clone(),
        "position_ids": torch.arange(seq).expand(batch, seq).clone(),
    }


def _build_flux() -> nn.Module:
    return _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
            pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
        )
    )  # fmt: skip


def _inputs_flux(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _pack(_randn(g, batch, 4, 2 * ROWS, 2 * COLS)),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "pooled_projections": _randn(g, batch, 8),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": _image_ids(ROWS, COLS),
        "txt_ids": torch.zeros(TEXT, 3),
    }


def _build_sd3() -> nn.Module:
    # SD 3.5 layout: block 0 also runs an image-only self-attention (dual attention)
    return _seeded(
        lambda: SD3Transformer2DModel(
            sample_size=2 * ROWS, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
            caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16,
            dual_attention_layers=(0,), qk_norm="rms_norm",
        )
    )  # fmt: skip


def _inputs_sd3(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, 2 * ROWS, 2 * COLS),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "pooled_projections": _randn(g, batch, 8),
        "timestep": torch.full((batch,), 500.0),
    }


# --- videos ---------------------------------------------------------------------------------


def _build_wan() -> nn.Module:
    return _seeded(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2,
            rope_max_seq_len=32,
        )
    )  # fmt: skip


def _inputs_wan(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, FRAMES, 2 * ROWS, 2 * COLS),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
    }


def _build_hunyuan_video() -> nn.Module:
    return _seeded(
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
            patch_size_t=1, text_embed_dim=12, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
        )
    )  # fmt: skip


def _inputs_hunyuan_video(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, FRAMES, 2 * ROWS, 2 * COLS),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "encoder_attention_mask": torch.ones(batch, TEXT),
        "pooled_projections": _randn(g, batch, 8),
        "guidance": torch.full((batch,), 6000.0),  # guidance-distilled: scale x 1000
    }


def _build_ltx() -> nn.Module:
    # patch 1 in space and time, as in the real model: latents are packed tokens already
    return _seeded(
        lambda: LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=12,
        )
    )  # fmt: skip


def _inputs_ltx(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        # packed (B, frames * rows * cols, C), frame-major then row-major
        "hidden_states": _randn(g, batch, FRAMES * ROWS * COLS, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "timestep": torch.full((batch,), 500.0),
        "encoder_attention_mask": torch.ones(batch, TEXT),
        "num_frames": FRAMES,
        "height": ROWS,
        "width": COLS,
        # the pipeline's: (temporal compression / frame rate, spatial compression x 2)
        "rope_interpolation_scale": (8 / 25, 32, 32),
    }


def _build_cogvideox() -> nn.Module:
    # CogVideoX-5b layout: 3D rotary embeddings instead of sincos position embeddings
    return _seeded(
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            time_embed_dim=8, text_embed_dim=12, num_layers=2, sample_width=2 * COLS,
            sample_height=2 * ROWS, sample_frames=4 * (FRAMES - 1) + 1, patch_size=2,
            max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
        )
    )  # fmt: skip


def _inputs_cogvideox(batch: int) -> dict[str, Any]:
    g = _gen()
    # the pipeline's table; the grid fills the base size, so the crop is the whole grid
    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (ROWS, COLS)), (ROWS, COLS), FRAMES)
    return {
        "hidden_states": _randn(g, batch, FRAMES, 4, 2 * ROWS, 2 * COLS),  # frames before channels
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "image_rotary_emb": (cos, sin),
    }


def _build_mochi() -> nn.Module:
    return _seeded(
        lambda: MochiTransformer3DModel(
            patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
            max_sequence_length=TEXT,
        )
    )  # fmt: skip


def _inputs_mochi(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, FRAMES, 2 * ROWS, 2 * COLS),
        # 16 wide: the caption pooler has 8 heads
        "encoder_hidden_states": _randn(g, batch, TEXT, 16),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_attention_mask": torch.ones(batch, TEXT),
    }


def _build_allegro() -> nn.Module:
    return _seeded(
        lambda: AllegroTransformer3DModel(
            patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
            in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=24,
            sample_height=2 * ROWS, sample_width=2 * COLS, sample_frames=FRAMES,
            caption_channels=12,
        )
    )  # fmt: skip


def _inputs_allegro(batch: int) -> dict[str, Any]:
    g = _gen()
    # the pipeline's rotary: per-axis frequency tables and the (t, h, w) index of every token
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        12, ((0, 0), (ROWS, COLS)), (ROWS, COLS), FRAMES, interpolation_scale=(2.2, 2.0, 2.0)
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    grid = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return {
        "hidden_states": _randn(g, batch, 4, FRAMES, 2 * ROWS, 2 * COLS),
        "encoder_hidden_states": _randn(g, batch, TEXT, 12),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "image_rotary_emb": ((freqs_t, freqs_h, freqs_w), tuple(grid)),
    }


# --- the zoo --------------------------------------------------------------------------------

_IMAGE = (1, ROWS, COLS)
_VIDEO = (FRAMES, ROWS, COLS)

ZOO: dict[str, ZooModel] = {
    z.name: z
    for z in [
        ZooModel("sana", "SanaTransformer2DModel", _build_sana, _inputs_sana, _IMAGE, False),
        ZooModel("auraflow", "AuraFlowTransformer2DModel", _build_auraflow, _inputs_auraflow,
                 _IMAGE, False),
        ZooModel("hunyuan_dit", "HunyuanDiT2DModel", _build_hunyuan_dit, _inputs_hunyuan_dit,
                 _IMAGE, False),
        ZooModel("lumina_next", "LuminaNextDiT2DModel", _build_lumina_next, _inputs_lumina_next,
                 _IMAGE, False),
        ZooModel("lumina2", "Lumina2Transformer2DModel", _build_lumina2, _inputs_lumina2,
                 _IMAGE, False),
        ZooModel("cogview3plus", "CogView3PlusTransformer2DModel", _build_cogview3plus,
                 _cogview_inputs, _IMAGE, False),
        ZooModel("cogview4", "CogView4Transformer2DModel", _build_cogview4, _cogview_inputs,
                 _IMAGE, False),
        ZooModel("hidream", "HiDreamImageTransformer2DModel", _build_hidream, _inputs_hidream,
                 _IMAGE, False),
        ZooModel("qwen_image", "QwenImageTransformer2DModel", _build_qwen_image,
                 _inputs_qwen_image, _IMAGE, False),
        ZooModel("chroma", "ChromaTransformer2DModel", _build_chroma, _inputs_chroma, _IMAGE,
                 False),
        ZooModel("omnigen", "OmniGenTransformer2DModel", _build_omnigen, _inputs_omnigen,
                 _IMAGE, False),
        ZooModel("flux", "FluxTransformer2DModel", _build_flux, _inputs_flux, _IMAGE, False),
        ZooModel("sd3", "SD3Transformer2DModel", _build_sd3, _inputs_sd3, _IMAGE, False),
        ZooModel("wan", "WanTransformer3DModel", _build_wan, _inputs_wan, _VIDEO, True),
        ZooModel("hunyuan_video", "HunyuanVideoTransformer3DModel", _build_hunyuan_video,
                 _inputs_hunyuan_video, _VIDEO, True),
        ZooModel("ltx", "LTXVideoTransformer3DModel", _build_ltx, _inputs_ltx, _VIDEO, True),
        ZooModel("cogvideox", "CogVideoXTransformer3DModel", _build_cogvideox,
                 _inputs_cogvideox, _VIDEO, True),
        ZooModel("mochi", "MochiTransformer3DModel", _build_mochi, _inputs_mochi, _VIDEO, True),
        ZooModel("allegro", "AllegroTransformer3DModel", _build_allegro, _inputs_allegro,
                 _VIDEO, True),
    ]
}  # fmt: skip

# Classes of the brief that are not in the zoo, with the reason.
LEFT_OUT: dict[str, str] = {}


def output_of(model: nn.Module, kwargs: dict[str, Any]) -> Tensor:
    """The main output tensor of ``model(**kwargs)`` (no grad)."""
    with torch.no_grad():
        out = model(**kwargs)
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _is_attention(module: nn.Module) -> bool:
    if isinstance(module, (Attention, AttentionModuleMixin)):
        return True
    return "Attention" in type(module).__name__ and hasattr(module, "to_q")


def _attention_calls(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, list[tuple]]:
    """Module name -> (query length, context length or None) of each call in one forward."""
    calls: dict[str, list[tuple]] = {}

    def hook(name: str):
        def pre(module: nn.Module, args: tuple, kw: dict) -> None:
            # bind to the parameter names: HiDream says norm_hidden_states, others hidden_states
            bound = inspect.signature(module.forward).bind_partial(*args, **kw).arguments
            values = list(bound.values())
            x = bound.get("hidden_states", bound.get("norm_hidden_states", values[0]))
            ctx = next((v for k, v in bound.items() if k.endswith("encoder_hidden_states")), None)
            n_ctx = ctx.shape[1] if isinstance(ctx, Tensor) and ctx.ndim == 3 else None
            calls.setdefault(name, []).append((x.shape[1], n_ctx))

        return pre

    handles = [
        m.register_forward_pre_hook(hook(n), with_kwargs=True)
        for n, m in model.named_modules()
        if _is_attention(m)
    ]
    try:
        output_of(model, kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def attention_lengths(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, set[int]]:
    """Module name -> the sequence lengths (``hidden_states.shape[1]``) its attention saw."""
    return {n: {q for q, _ in c} for n, c in _attention_calls(model, kwargs).items()}


# The self-check's expected joint lengths for models whose attention never sees image tokens
# alone: OmniGen runs one causal-LM-style sequence of prompt, time token and image.
_JOINT_ONLY = {"omnigen": TEXT + 1 + ROWS * COLS}

if __name__ == "__main__":
    for z in ZOO.values():
        t0 = time.perf_counter()
        model = z.build()
        t_build = time.perf_counter() - t0
        for batch in (1, 2):
            t0 = time.perf_counter()
            out = output_of(model, z.inputs(batch))
            t_run = time.perf_counter() - t0
            assert out.shape[0] == batch, (z.name, out.shape)
            print(f"{z.name:14s} {z.cls_name:32s} batch={batch} out={tuple(out.shape)} "
                  f"build={t_build:.3f}s forward={t_run:.3f}s")  # fmt: skip
        # seeded: a second build and the same inputs give the same output
        assert torch.equal(output_of(z.build(), z.inputs(2)), output_of(model, z.inputs(2)))
        tokens = z.grid[0] * z.grid[1] * z.grid[2]
        lengths = attention_lengths(model, z.inputs(2))
        seen = set().union(*lengths.values())
        assert tokens in seen or _JOINT_ONLY.get(z.name) in seen, (z.name, tokens, seen)
        print(f"    grid={z.grid} image tokens={tokens} attention lengths={sorted(seen)}")
        groups: dict[tuple, list[str]] = {}
        for name, calls in _attention_calls(model, z.inputs(2)).items():
            groups.setdefault(tuple(sorted(set(calls), key=str)), []).append(name)
        for kind, names in groups.items():
            print(f"    (query, context) {kind}: {len(names)} x, e.g. {names[0]}")
    for name, reason in LEFT_OUT.items():
        print(f"{name:14s} left out: {reason}")
