"""tokenmerge_bench.loading: local checkpoint folders of every library load with their weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tokenmerge.errors import ModelLoadError, TokenMergeError
from tokenmerge_bench.loading import LoadedModel, load_model
from tokenmerge_bench.presets import get_preset


def assert_same_weights(expected: torch.nn.Module, loaded: torch.nn.Module) -> None:
    want, got = expected.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def assert_one_line_error(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert isinstance(err.value, TokenMergeError) and isinstance(err.value, ValueError)


def corrupt_weights(folder: Path) -> None:
    weights = [f for f in folder.rglob("*") if f.suffix in (".safetensors", ".bin")]
    assert weights
    for file in weights:
        file.write_bytes(b"not a checkpoint")


# ---- tiny models, each saved with its library's own save function ----------------------------


def tiny_unet():
    return get_preset("tiny-unet").build()


def tiny_vae():
    import diffusers

    return diffusers.AutoencoderKL(
        block_out_channels=(32,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )


def tiny_timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8, num_classes=10
    )


def tiny_vit_config():
    import transformers

    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )


@pytest.fixture
def unet_folder(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path)
    return tmp_path, unet


@pytest.fixture
def timm_folder(tmp_path):
    import timm

    model = tiny_timm_vit()
    timm.models.save_for_hf(model, tmp_path)
    return tmp_path, model


@pytest.fixture
def vit_folder(tmp_path):
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(tiny_vit_config())
    model.save_pretrained(tmp_path)
    return tmp_path, model


# ---- diffusers ----------------------------------------------------------------------------------


def test_diffusers_model_folder_loads_identical_weights(unet_folder):
    folder, unet = unet_folder
    loaded = load_model(folder)
    assert isinstance(loaded, LoadedModel)
    assert type(loaded.model) is type(unet)
    assert loaded.library == "diffusers"
    assert loaded.pipeline is None
    assert loaded.description == f"UNet2DConditionModel from {folder} (diffusers model)"
    assert not loaded.model.training
    assert_same_weights(unet, loaded.model)


def test_diffusers_pipeline_with_absent_components_gives_its_unet(tmp_path):
    import diffusers

    unet = tiny_unet()
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path)
    # the absent components are stored as [null, null], which from_pretrained alone refuses
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder"] == [None, None]
    loaded = load_model(tmp_path)
    assert isinstance(loaded.pipeline, diffusers.StableDiffusionPipeline)
    assert loaded.model is loaded.pipeline.unet
    assert loaded.pipeline.text_encoder is None
    assert loaded.description == (
        f"UNet2DConditionModel from {tmp_path} "
        "(diffusers pipeline StableDiffusionPipeline, component unet)"
    )
    assert_same_weights(unet, loaded.model)


def test_diffusers_pipeline_gives_its_transformer(tmp_path):
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        norm_num_groups=8,
        num_embeds_ada_norm=10,
    )
    diffusers.DiTPipeline(
        transformer=transformer, vae=tiny_vae(), scheduler=diffusers.DDIMScheduler()
    ).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.library == "diffusers"
    assert isinstance(loaded.pipeline, diffusers.DiTPipeline)
    assert loaded.model is loaded.pipeline.transformer
    assert "component transformer" in loaded.description
    assert_same_weights(transformer, loaded.model)


def test_diffusers_pipeline_without_a_denoiser_is_an_error(tmp_path):
    import diffusers

    diffusers.DDPMPipeline(unet=None, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no unet or transformer") as err:
        load_model(tmp_path)
    assert_one_line_error(err, tmp_path)


def test_unknown_diffusers_class_name_is_named(unet_folder):
    folder, _ = unet_folder
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModelX"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'UNet2DConditionModelX'") as err:
        load_model(folder)
    assert "did you mean 'UNet2DConditionModel'" in str(err.value)
    assert_one_line_error(err, folder)


def test_diffusers_class_that_is_no_model_is_an_error(unet_folder):
    folder, _ = unet_folder
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "DDPMScheduler"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unknown diffusers model class 'DDPMScheduler'"):
        load_model(folder)


# ---- timm ---------------------------------------------------------------------------------------


def test_timm_folder_loads_the_saved_variant_with_identical_weights(timm_folder):
    folder, model = timm_folder
    config = json.loads((folder / "config.json").read_text())
    # timm 1.0.31's save_for_hf records the constructor arguments of the variant
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["depth"] == 2 and config["model_args"]["patch_size"] == 8
    loaded = load_model(folder)
    assert loaded.library == "timm"
    assert loaded.pipeline is None
    assert len(loaded.model.blocks) == 2
    assert loaded.model.num_classes == 10
    assert loaded.description == f"VisionTransformer 'vit_tiny_patch16_224' from {folder} (timm)"
    assert not loaded.model.training
    assert_same_weights(model, loaded.model)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.model(x), model.eval()(x), rtol=0, atol=0)


def test_timm_safetensors_folder_loads(tmp_path):
    import timm

    model = tiny_timm_vit()
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    assert_same_weights(model, load_model(tmp_path).model)


def test_unknown_timm_architecture_is_named(timm_folder):
    folder, _ = timm_folder
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "vit_tiny_patch16_2244"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unknown timm architecture 'vit_tiny_patch16_2244'"):
        load_model(folder)


# ---- transformers -------------------------------------------------------------------------------


def test_transformers_vit_classifier_loads_identical_weights(vit_folder):
    folder, model = vit_folder
    loaded = load_model(folder)
    assert type(loaded.model).__name__ == "ViTForImageClassification"
    assert loaded.library == "transformers"
    assert loaded.pipeline is None
    assert loaded.description == (
        f"ViTForImageClassification from {folder} (transformers, model_type vit)"
    )
    assert_same_weights(model, loaded.model)


def test_transformers_vit_model_loads_identical_weights(tmp_path):
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTModel(tiny_vit_config())
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded.model) is transformers.ViTModel
    assert_same_weights(model, loaded.model)


def test_transformers_clip_vision_model_loads_identical_weights(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    model = transformers.CLIPVisionModel(config)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded.model) is transformers.CLIPVisionModel
    assert "model_type clip_vision_model" in loaded.description
    assert_same_weights(model, loaded.model)


def test_transformers_without_architectures_falls_back_to_automodel(tmp_path):
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTModel(tiny_vit_config())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    assert type(loaded.model) is transformers.ViTModel
    assert loaded.description.endswith("(transformers, model_type vit, via AutoModel)")
    assert_same_weights(model, loaded.model)


# ---- dtype --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["diffusers", "timm", "transformers"])
def test_dtype_float16_gives_float16_parameters(kind, request):
    folder, _ = request.getfixturevalue(
        {"diffusers": "unet_folder", "timm": "timm_folder", "transformers": "vit_folder"}[kind]
    )
    loaded = load_model(folder, dtype=torch.float16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}


def test_dtype_float16_reaches_the_pipeline(tmp_path):
    import diffusers

    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(
        tmp_path
    )
    loaded = load_model(tmp_path, dtype=torch.float16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}


# ---- errors -------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(missing)
    assert_one_line_error(err, missing)


def test_a_file_is_not_a_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file, not a folder") as err:
        load_model(str(file))
    assert_one_line_error(err, file)


def test_empty_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="holds no loadable model") as err:
        load_model(tmp_path)
    assert "model_index.json" in str(err.value) and "save_for_hf" in str(err.value)
    assert_one_line_error(err, tmp_path)


def test_unrelated_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(ModelLoadError, match="none of the keys _class_name") as err:
        load_model(tmp_path)
    assert_one_line_error(err, tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_unreadable_config_json(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelLoadError, match="config.json in") as err:
        load_model(tmp_path)
    assert_one_line_error(err, tmp_path)


@pytest.mark.parametrize("kind", ["diffusers", "timm", "transformers"])
def test_corrupt_weights_are_wrapped_and_chained(kind, request):
    folder, _ = request.getfixturevalue(
        {"diffusers": "unet_folder", "timm": "timm_folder", "transformers": "vit_folder"}[kind]
    )
    corrupt_weights(folder)
    with pytest.raises(ModelLoadError, match=f"could not load the {kind} model") as err:
        load_model(folder)
    assert_one_line_error(err, folder)
    assert err.value.__cause__ is not None
    assert type(err.value.__cause__).__name__ in str(err.value)


def test_missing_weights_are_wrapped(unet_folder):
    folder, _ = unet_folder
    for file in folder.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(ModelLoadError, match="could not load the diffusers model") as err:
        load_model(folder)
    assert_one_line_error(err, folder)


def test_missing_library_names_the_extra(timm_folder, monkeypatch):
    folder, _ = timm_folder
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ModelLoadError, match=r'pip install "tokenmerge\[timm\]"') as err:
        load_model(folder)
    assert_one_line_error(err, folder)
    assert isinstance(err.value.__cause__, ImportError)


def test_loading_module_imports_no_model_library():
    import subprocess

    script = (
        "import sys, tokenmerge_bench.loading; "
        "print([m for m in ('diffusers', 'timm', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
