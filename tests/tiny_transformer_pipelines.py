"""Tiny random-weight, download-free builds of four transformer pipelines from diffusers, each
assembled from its real component classes at tiny widths, for whole generations on CPU (seconds).

Nothing can be downloaded here, so every tokenizer is built in memory from a small vocabulary
(transformers 5's tokenizer classes take ``vocab`` / ``merges`` directly) and every text
encoder is a 1-layer random model over that vocabulary: the pipelines run their real text path,
prompt string to embeddings, with no ``prompt_embeds`` handed in.

============  ==========================  =================  ==================  ==============
name          pixels (frames x h x w)     image tokens       text encoder        tokenizer
============  ==========================  =================  ==================  ==============
qwen_image    128 x 192                   1 x 8 x 12         Qwen2.5-VL          byte-level BPE
wan           5 x 128 x 160               2 x 8 x 10         UMT5 encoder        T5 (Unigram)
sana          96 x 64                     1 x 12 x 8         Gemma 2             Gemma (BPE)
chroma        160 x 128                   1 x 10 x 8         T5 encoder          T5 (Unigram)
============  ==========================  =================  ==================  ==============

The grids are not square (rows != columns) so that a transposed grid shows. The VAEs of
Qwen-Image, Wan and Chroma keep their real factors (8x spatial; Wan also 4x temporal); Sana's
deep-compression autoencoder has 4 levels (8x) instead of 6 (32x), to keep its pixels small.
Classifier-free guidance is on as each pipeline does it by default: Wan and Chroma run a second
(negative) transformer call per step, Sana one batch of 2, and Qwen-Image a second call given a
negative prompt (its ``true_cfg_scale``), which the calls here pass as the model card does
(``negative_prompt=" "``). Sana keeps its default "complex human instruction" (a long preamble
the Gemma encoder reads before the prompt); the prompts of Wan, Sana and Chroma are padded to
``MAX_SEQUENCE_LENGTH`` tokens, not their 226 to 512 defaults.

Use::

    tiny = TINY_PIPELINES["wan"]
    pipe = tiny.build()
    frames = generate(pipe, tiny.call(pipe, 0))
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from dit_pipelines import flux_scheduler, tiny_vae
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

TEXT_WIDTH = 32  # hidden width of every tiny text encoder (= the transformers' text input width)
HEADS = 2
HEAD_DIM = 16
PROMPT = "a small red fox in the snow"
STEPS = 2
# prompt length (tokens) for the pipelines that pad to a fixed length: their defaults (226 to
# 512) would make the text encoders and the text side of attention the bulk of the work
MAX_SEQUENCE_LENGTH = 32

# the chat roles and the system prompt of Qwen-Image's template (prompt_template_encode), each
# starting a line: with their words as whole tokens the template's prefix is 34 tokens, as with
# the real Qwen2.5 tokenizer, so the pipeline's prompt_template_encode_start_idx (34) drops it
_QWEN_WORDS = (
    "system",
    "user",
    "assistant",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
)
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TinyPipeline:
    """One tiny pipeline: how to build it, how to call it, and the image token grid it makes.

    Attributes:
        name: "qwen_image", "wan", "sana" or "chroma".
        build: returns the pipeline (seeded weights, eval, CPU, float32, progress bar off).
        call: ``(pipeline, seed) -> kwargs`` for ``pipeline(**kwargs)``: a prompt, 2 steps, the
            tiny size, a seeded ``torch.Generator``.
        image_tokens: (frames, rows, columns) of image tokens reaching the transformer blocks.
    """

    name: str
    build: Callable[[], object]
    call: Callable[[object, int], dict]
    image_tokens: tuple[int, int, int]


def _seeded(build: Callable[[], DiffusionPipeline]) -> Callable[[], DiffusionPipeline]:
    """``build`` with its weights drawn from seed 0, leaving the global RNG as it was."""

    def seeded() -> DiffusionPipeline:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe = build()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        # a tqdm bar per call otherwise, which floods the test log
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return seeded


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- tokenizers, from in-memory vocabularies ----------------------------------------------------


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in Qwen2's format: the 256 byte symbols, the chat specials, and
    the template's words as whole tokens (each built by a chain of merges, left to right); any
    other text falls back to one token per byte."""
    alphabet = sorted(ByteLevel.alphabet())  # sorted: the alphabet comes as an unordered set
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    pieces = ByteLevel(add_prefix_space=False).pre_tokenize_str
    for word, _ in (piece for text in _QWEN_WORDS for piece in pieces(text)):
        prefix = word[0]
        for symbol in word[1:]:
            if prefix + symbol not in vocab:
                vocab[prefix + symbol] = len(vocab)
                merges.append((prefix, symbol))
            prefix += symbol
    for special in _QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS[1:])})
    return tokenizer


def _t5_tokenizer() -> T5Tokenizer:
    """A T5 (SentencePiece Unigram) tokenizer over characters: each character alone and after the
    word-start marker, so any lowercase prompt tokenizes without ``<unk>``."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [(c, -2.0) for c in chars] + [("▁" + c, -1.0) for c in chars]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + pieces
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _gemma_tokenizer() -> GemmaTokenizer:
    """A Gemma tokenizer over characters (BPE without merges; "▁" stands for a space)."""
    chars = "▁" + string.ascii_letters + string.digits + string.punctuation + "\n"
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    return GemmaTokenizer(vocab=vocab)


# --- Qwen-Image ---------------------------------------------------------------------------------


def _build_qwen_image() -> QwenImagePipeline:
    tokenizer = _qwen_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_WIDTH,
                intermediate_size=37,
                num_hidden_layers=1,
                num_attention_heads=HEADS,
                num_key_value_heads=HEADS,
                # multimodal rotary sections (time, height, width) sum to half the head dim
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
                # Qwen2.5's own ids are past the tiny vocabulary
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id,
            ),
            # never run (no images in the prompt), but the model always has one
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=16,
                num_heads=2,
                out_hidden_size=TEXT_WIDTH,
            ),  # fmt: skip
        )
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x the 2 x 2 packing
        out_channels=16,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(8, 4, 4),  # must sum to the head dim
    )
    # three temporal-downsample flags make the real 8x spatial factor (2 ** 3)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    # after Qwen-Image's scheduler config: dynamic exponential shift by image size
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    dropped = len(tokenizer(prefix).input_ids)
    assert dropped == pipe.prompt_template_encode_start_idx, f"template prefix: {dropped} tokens"
    return pipe


def _call_qwen_image(pipe: object, seed: int) -> dict:
    return dict(
        prompt=PROMPT,
        # Qwen-Image guides only given a negative prompt; the model card passes " "
        negative_prompt=" ",
        height=128,
        width=192,
        num_inference_steps=STEPS,
        generator=_generator(seed),
        output_type="pt",
    )


# --- Wan 2.1 (text to video) --------------------------------------------------------------------


def _umt5() -> UMT5EncoderModel:
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(_t5_tokenizer()),
            d_model=TEXT_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )


def _build_wan() -> WanPipeline:
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=37,
        num_layers=2,
        rope_max_seq_len=32,
    )
    # the real factors, 8x spatial and 4x temporal (two temporal downsamples)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    # Wan 2.1's own scheduler: UniPC on flow-matching sigmas
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return WanPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_umt5(),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )


def _call_wan(pipe: object, seed: int) -> dict:
    return dict(
        prompt=PROMPT,
        height=128,
        width=160,
        num_frames=5,  # 1 + 4: two latent frames
        num_inference_steps=STEPS,
        generator=_generator(seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="pt",
    )


# --- Sana ---------------------------------------------------------------------------------------


def _build_sana() -> SanaPipeline:
    tokenizer = _gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            head_dim=HEAD_DIM,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = SanaTransformer2DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=TEXT_WIDTH,
        sample_size=16,
        patch_size=1,  # Sana's own: one token per latent pixel
    )
    # a deep-compression autoencoder with four levels: 8x (Sana's has six, 32x)
    levels = 4
    vae = AutoencoderDC(
        latent_channels=8,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8,) * levels,
        decoder_block_out_channels=(8,) * levels,
        encoder_layers_per_block=(1,) * levels,
        decoder_layers_per_block=(1,) * levels,
        encoder_qkv_multiscales=((), (), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (5,), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        scaling_factor=0.41407,
    )
    # Sana's own scheduler: DPM-Solver++ on flow-matching sigmas
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def _call_sana(pipe: object, seed: int) -> dict:
    return dict(
        prompt=PROMPT,
        height=96,
        width=64,
        num_inference_steps=STEPS,
        generator=_generator(seed),
        # binning snaps the size to the aspect-ratio table of a 512 to 4096 px model
        use_resolution_binning=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="pt",
    )


# --- Chroma -------------------------------------------------------------------------------------


def _build_chroma() -> ChromaPipeline:
    tokenizer = _t5_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x FLUX's 2 x 2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),  # must sum to the head dim
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    # FLUX's VAE scaling and shift; dynamic shifting by image size as FLUX.1-dev
    scheduler = flux_scheduler()
    return ChromaPipeline(
        scheduler=scheduler,
        vae=tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _call_chroma(pipe: object, seed: int) -> dict:
    return dict(
        prompt=PROMPT,
        height=160,
        width=128,
        num_inference_steps=STEPS,
        generator=_generator(seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="pt",
    )


TINY_PIPELINES: dict[str, TinyPipeline] = {
    tiny.name: tiny
    for tiny in (
        TinyPipeline("qwen_image", _seeded(_build_qwen_image), _call_qwen_image, (1, 8, 12)),
        TinyPipeline("wan", _seeded(_build_wan), _call_wan, (2, 8, 10)),
        TinyPipeline("sana", _seeded(_build_sana), _call_sana, (1, 12, 8)),
        TinyPipeline("chroma", _seeded(_build_chroma), _call_chroma, (1, 10, 8)),
    )
}


@torch.no_grad()
def generate(pipe: object, kwargs: dict) -> torch.Tensor:
    """Run ``pipe(**kwargs)`` and return its output as one tensor: images ``(B, C, H, W)``, or
    video frames ``(B, F, C, H, W)`` for Wan (latents, with ``output_type="latent"``)."""
    output = pipe(**kwargs)
    return output.frames if hasattr(output, "frames") else output.images


def _attention_lengths(transformer: torch.nn.Module) -> tuple[dict[str, set[int]], list]:
    """Pre-hooks on every attention module of ``transformer`` that record the length of the
    ``hidden_states`` each receives, by block class and the module's name in it (``attn1``)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    lengths: dict[str, set[int]] = {}
    handles = []
    for block in transformer.modules():
        for name, module in block.named_children():
            if not isinstance(module, (Attention, AttentionModuleMixin)):
                continue
            # by block: FLUX-style single-stream blocks reuse the class and name, but see text
            # and image tokens in one sequence
            kind = f"{type(block).__name__}.{name} ({type(module).__name__})"

            def record(module, args, kwargs, kind=kind):
                states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                lengths.setdefault(kind, set()).add(states.shape[1])

            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    return lengths, handles


if __name__ == "__main__":
    import time

    for tiny in TINY_PIPELINES.values():
        start = time.perf_counter()
        pipe = tiny.build()
        built = time.perf_counter() - start
        lengths, handles = _attention_lengths(pipe.transformer)
        outputs, seconds = [], []
        for _ in range(2):
            start = time.perf_counter()
            outputs.append(generate(pipe, tiny.call(pipe, 0)))
            seconds.append(time.perf_counter() - start)
        for handle in handles:
            handle.remove()
        identical = torch.equal(outputs[0], outputs[1])
        frames, rows, columns = tiny.image_tokens
        print(
            f"{tiny.name}: output {tuple(outputs[0].shape)}, build {built:.2f} s, "
            f"generate {seconds[0]:.2f} / {seconds[1]:.2f} s, bit-identical {identical}, "
            f"image tokens {frames} x {rows} x {columns} = {frames * rows * columns}"
        )
        for kind, seen in sorted(lengths.items()):
            print(f"    {kind}: hidden_states lengths {sorted(seen)}")
        assert identical, f"{tiny.name}: two runs with the same seed differ"
        # the image-only attention sees exactly the grid (joint and single-stream ones see more)
        assert frames * rows * columns in set().union(*lengths.values()), tiny.name
