import copy
import json
import time

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdxl_fast import ModelNotFoundError, ModelSources, load, resolve_sources
from sdxl_fast import loading, models


def test_sources_resolve_argument_then_env_then_preset(monkeypatch):
    monkeypatch.setattr(loading, "demo_models_available", lambda: False)
    monkeypatch.setattr(loading, "sdxl_cached", lambda: False)
    assert resolve_sources() == loading.PRESETS["sdxl"]
    monkeypatch.setenv("SDXL_FAST_BASE", "/env/base")
    monkeypatch.setenv("SDXL_FAST_REFINER", "none")
    sources = resolve_sources(fast="/arg/fast")
    assert sources == ModelSources(base="/env/base", refiner=None, fast="/arg/fast")
    assert resolve_sources(base="/arg/base").base == "/arg/base"
    assert resolve_sources(preset="sdxl-no-refiner", base=None).base == "/env/base"


def test_shipped_demo_models_stand_in_only_where_sdxl_is_absent(monkeypatch):
    monkeypatch.setattr(loading, "demo_models_available", lambda: True)
    monkeypatch.setattr(loading, "sdxl_cached", lambda: False)
    assert resolve_sources() == loading.PRESETS["demo"]
    assert resolve_sources(preset="sdxl") == loading.PRESETS["sdxl"]
    monkeypatch.setattr(loading, "sdxl_cached", lambda: True)
    assert resolve_sources() == loading.PRESETS["sdxl"]
    assert resolve_sources(preset="demo") == loading.PRESETS["demo"]
    monkeypatch.setenv("SDXL_FAST_PRESET", "demo")  # a Space sets this instead of passing --preset
    assert resolve_sources() == loading.PRESETS["demo"]
    assert resolve_sources(preset="sdxl-no-refiner") == loading.PRESETS["sdxl-no-refiner"]


def test_sdxl_counts_as_cached_only_with_all_three_pipelines(tmp_path):
    def cache(repo: str) -> None:  # the Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>}
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "snapshots" / "abc123").mkdir(parents=True)
        (folder / "snapshots" / "abc123" / "model_index.json").write_text("{}")
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text("abc123")

    sdxl = loading.PRESETS["sdxl"]
    cache(sdxl.base)
    cache(sdxl.refiner)
    assert not loading.sdxl_cached(cache_dir=tmp_path)  # no sdxl-turbo
    cache(sdxl.fast)
    assert loading.sdxl_cached(cache_dir=tmp_path)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown preset 'sdxl-ultra'.*sdxl, sdxl-no-refiner, demo"):
        resolve_sources(preset="sdxl-ultra")


def test_refiner_and_student_share_the_base_encoders_and_vae(tiny_models):
    q, f = tiny_models.quality, tiny_models.fast
    assert f.vae is q.vae
    assert f.encoders.text_encoder is q.encoders.text_encoder
    assert f.encoders.text_encoder_2 is q.encoders.text_encoder_2
    assert q.refiner is not q.base and f.student is not q.base
    assert q.refiner.config.cross_attention_dim == q.encoders.text_encoder_2.config.hidden_size
    assert not any(p.requires_grad for p in q.base.parameters())


def test_a_full_few_step_pipeline_loads_as_the_fast_model(tiny_family):
    sources = ModelSources(base="/nonexistent/base", refiner=None, fast=str(tiny_family["turbo"]))
    models = load(modes=("fast",), sources=sources, device="cpu")
    assert models.quality is None
    assert isinstance(models.fast.student, UNet2DConditionModel)
    assert models.fast.names == {"fast": "turbo"}
    assert models.dtype == torch.float32
    assert models.fast.sampler == "Euler a"  # diffusers' SDXL-Turbo recipe, as its users get from diffusers


def test_a_student_runs_the_sampler_its_folder_records(tiny_family, tmp_path):
    import shutil

    from sdxl_fast.distill.export import export_student

    def sampler_of(student: str) -> str:
        sources = ModelSources(base=str(tiny_family["base"]), refiner=None, fast=student)
        return load(modes=("fast",), sources=sources, device="cpu").fast.sampler

    assert sampler_of(str(tiny_family["student"])) == "ADD"  # a student folder without sdxl_fast.json
    unet = UNet2DConditionModel.from_pretrained(tiny_family["student"])
    exported = export_student(unet, tmp_path / "exported", {"teacher": "t", "student_timesteps": [999]}, 1, False)
    assert (exported / loading.STUDENT_CONFIG).is_file() and sampler_of(str(exported)) == "ADD"
    assert "_name_or_path" not in json.loads((exported / "config.json").read_text())  # no path of this machine
    other = tmp_path / "other"
    shutil.copytree(tiny_family["student"], other)
    loading.write_student_config(other, sampler="Euler a")
    assert sampler_of(str(other)) == "Euler a"
    # The same file records how the student's output is read (tests/test_distill_continuation.py samples with it).
    exported = export_student(unet, tmp_path / "v", {"teacher": "t", "student_timesteps": [999]}, 1, False,
                              prediction_type="v_prediction")
    assert json.loads((exported / loading.STUDENT_CONFIG).read_text()) == {"sampler": "ADD",
                                                                          "prediction_type": "v_prediction"}
    sources = ModelSources(base=str(tiny_family["base"]), refiner=None, fast=str(exported))
    fast = load(modes=("fast",), sources=sources, device="cpu").fast
    assert (fast.sampler, fast.scheduler.config.prediction_type) == ("ADD", "v_prediction")
    loading.write_student_config(other, prediction_type="x0")
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        sampler_of(str(other))


def test_missing_weights_offline_fail_fast_with_a_clear_message(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # An unroutable endpoint: without our reachability check huggingface_hub would retry for a minute.
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    sources = ModelSources(base="someone/no-such-sdxl", refiner=None, fast="someone/no-such-turbo")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        load(modes=("quality",), sources=sources, device="cpu")
    assert time.monotonic() - start < 20
    message = str(err.value)
    assert "someone/no-such-sdxl" in message and "unreachable" in message
    assert "--base" in message and "SDXL_FAST_BASE" in message


def test_missing_weights_message_offers_the_demo_preset_only_when_it_is_there(monkeypatch, tmp_path):
    from sdxl_fast import loading

    def message() -> str:
        with pytest.raises(ModelNotFoundError) as err:
            load(modes=("quality",), sources=ModelSources(str(tmp_path / "nope"), None, ""), device="cpu")
        return str(err.value)

    monkeypatch.setattr(loading, "DEMO_MODELS_DIR", tmp_path / "demo_models")
    assert "--preset demo" not in message() and "no demo models" in message()
    (tmp_path / "demo_models" / "base").mkdir(parents=True)
    (tmp_path / "demo_models" / "base" / "model_index.json").write_text("{}")
    assert "`--preset demo` uses the small demo models" in message()


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such local folder"):
        load(modes=("quality",), sources=ModelSources(str(tmp_path / "nope/x/y"), None, ""), device="cpu")


def test_pickle_weights_are_refused(tiny_family, tmp_path):
    """safetensors only: a UNet folder with nothing but a pickled .bin must not load."""
    unet = UNet2DConditionModel.from_pretrained(tiny_family["student"])
    unet.save_pretrained(tmp_path / "student", safe_serialization=False)
    assert not list((tmp_path / "student").glob("*.safetensors"))
    sources = ModelSources(str(tiny_family["base"]), None, str(tmp_path / "student"))
    with pytest.raises(ModelNotFoundError, match="only pickled weights .*diffusion_pytorch_model.bin.*safetensors"):
        load(modes=("fast",), sources=sources, device="cpu")


def test_bad_mode_and_dtype_are_rejected(tiny_sources):
    with pytest.raises(ValueError, match="modes"):
        load(modes=("turbo",), sources=tiny_sources, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        load(sources=tiny_sources, device="cpu", dtype="fp8")


def test_device_and_dtype_defaults():
    assert models.default_dtype(torch.device("cpu")) == torch.float32
    assert models.default_dtype(torch.device("cuda")) == torch.float16


def test_cpu_offload_on_a_cpu_only_machine_still_generates(tiny_sources):
    from sdxl_fast import GenerationParams, generate

    models = load(modes=("fast",), sources=tiny_sources, device="cpu", cpu_offload=True)
    assert models.offload_hooks == []  # nothing to offload to
    image = generate(models, GenerationParams("a cat", mode="fast", seed=1, width=64, height=64))[0]
    assert image.size == (64, 64)


def test_weight_dtype_is_diffusers_module_dtype_without_the_walk(tiny_models):
    from sdxl_fast.models import weight_dtype

    vae = copy.deepcopy(tiny_models.fast.vae)
    for dtype in (torch.float32, torch.bfloat16):
        vae.to(dtype)
        assert weight_dtype(vae) == vae.dtype == dtype


def test_a_later_load_shares_the_components_loaded_before_and_refuses_another_dtype(tiny_sources):
    fast = load(modes=("fast",), sources=tiny_sources, device="cpu", dtype=torch.float32)
    quality = load(modes=("quality",), sources=tiny_sources, device="cpu", dtype=torch.float32, share=fast)
    assert quality.quality.vae is fast.fast.vae
    assert quality.quality.encoders.text_encoder is fast.fast.encoders.text_encoder
    assert quality.quality.base is not fast.fast.student
    with pytest.raises(ValueError, match="cannot be shared"):
        load(modes=("quality",), sources=tiny_sources, device="cpu", dtype=torch.bfloat16, share=fast)


def test_read_ahead_reads_the_files_from_pretrained_reads_and_not_the_variants(tmp_path):
    from sdxl_fast.loading import read_ahead

    (tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"a" * 100)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"b" * 50)
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"c" * 70)
    (tmp_path / "config.json").write_text("{}")
    assert read_ahead(tmp_path) == 150


def test_a_load_beside_requests_reads_each_weight_folder_ahead_before_parsing_it(tiny_sources, monkeypatch):
    import sdxl_fast.loading as loading

    events = []
    monkeypatch.setattr(loading, "read_ahead", lambda folder: events.append(("read", folder.name)) or 0)
    parse = loading.UNet2DConditionModel.from_pretrained.__func__

    def from_pretrained(cls, folder, **kwargs):
        events.append(("parse", kwargs.get("subfolder")))
        return parse(cls, folder, **kwargs)

    monkeypatch.setattr(loading.UNet2DConditionModel, "from_pretrained", classmethod(from_pretrained))
    fast = load(modes=("fast",), sources=tiny_sources, device="cpu", dtype=torch.float32)
    assert not [e for e in events if e[0] == "read"]  # nothing served yet: parsed straight away
    events.clear()
    load(modes=("quality",), sources=tiny_sources, device="cpu", dtype=torch.float32, share=fast,
         beside_requests=True)
    unets = [e for e in events if e in (("read", "unet"), ("parse", "unet"))]
    assert unets == [("read", "unet"), ("parse", "unet")] * 2  # the base's UNet, then the refiner's
