"""Model sources -> loaded components.

A source is a hub id or a local diffusers folder. Which sources are used is decided in one place,
`resolve_sources`, in this order: explicit arguments (CLI flags), environment variables, a named preset,
the demo models shipped with the project, and finally the SDXL hub ids.

Every component is loaded with `from_pretrained(..., use_safetensors=True)`, never remote code or pickles,
and through one cache keyed by (folder, subfolder): the refiner reuses the base's `text_encoder_2` and VAE,
and a UNet-only student reuses the base's encoders and VAE, with one copy of each in memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .models import FastModels, Models, QualityModels, TextEncoders, pick_device_dtype

log = logging.getLogger(__name__)

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
SDXL_TURBO = "stabilityai/sdxl-turbo"

# Where the demo models trained by `distill` are shipped (see README "Demo models").
DEMO_MODELS_DIR = Path(__file__).resolve().parent.parent / "demo_models"

ENV_VARS = {"base": "SDXL_FAST_BASE", "refiner": "SDXL_FAST_REFINER", "fast": "SDXL_FAST_FAST"}
PRESET_ENV_VAR = "SDXL_FAST_PRESET"  # for deployments that cannot pass --preset, e.g. a Hugging Face Space
NO_REFINER = ("", "none", "off")


class ModelNotFoundError(RuntimeError):
    """Weights are neither in a local folder, nor in the Hugging Face cache, nor reachable on the hub."""


@dataclass(frozen=True)
class ModelSources:
    """Where each model comes from: a hub id or a local diffusers folder.

    `fast` is either a UNet-only student folder (as written by `distill`), which borrows the base's text
    encoders and VAE, or a complete few-step pipeline such as `stabilityai/sdxl-turbo`.
    """

    base: str
    refiner: str | None
    fast: str


PRESETS = {
    "sdxl": ModelSources(base=SDXL_BASE, refiner=SDXL_REFINER, fast=SDXL_TURBO),
    "sdxl-no-refiner": ModelSources(base=SDXL_BASE, refiner=None, fast=SDXL_TURBO),
    "demo": ModelSources(
        base=str(DEMO_MODELS_DIR / "base"), refiner=str(DEMO_MODELS_DIR / "refiner"),
        fast=str(DEMO_MODELS_DIR / "student"),
    ),
}


def demo_models_available() -> bool:
    return (DEMO_MODELS_DIR / "base" / "model_index.json").is_file()


def sdxl_cached(cache_dir: str | Path | None = None) -> bool:
    """Whether the SDXL preset's three pipelines are all in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    sdxl = PRESETS["sdxl"]
    return all(isinstance(try_to_load_from_cache(repo, "model_index.json", cache_dir=cache_dir), str)
               for repo in (sdxl.base, sdxl.refiner, sdxl.fast))


def resolve_sources(preset: str | None = None, base: str | None = None, refiner: str | None = None,
                    fast: str | None = None) -> ModelSources:
    """Pick every source: argument > env var > preset (argument, else SDXL_FAST_PRESET) > SDXL if cached >
    shipped demo models > SDXL hub ids.

    `refiner` may be "none" (or empty) to run the Quality path on the base alone.
    """
    preset = preset or os.environ.get(PRESET_ENV_VAR) or None
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    if preset is None:  # the demo models stand in for SDXL only where SDXL's weights are absent
        preset = "demo" if demo_models_available() and not sdxl_cached() else "sdxl"
    fallback = PRESETS[preset]
    chosen = {}
    for name, arg in (("base", base), ("refiner", refiner), ("fast", fast)):
        value = arg if arg is not None else os.environ.get(ENV_VARS[name])
        chosen[name] = value if value is not None else getattr(fallback, name)
    if chosen["refiner"] is not None and chosen["refiner"].strip().lower() in NO_REFINER:
        chosen["refiner"] = None
    return ModelSources(**chosen)


# ---------------------------------------------------------------------------------------------------------
# Finding weights: local folder, Hugging Face cache, or a download that fails fast when offline.

_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
_WEIGHT_PATTERNS = ["*.json", "*.txt", "*.safetensors"]


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for no network at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect instead of huggingface_hub's retry loop, which takes a minute to give up."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_found(source: str, role: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Could not load the {role} model from {source!r}: {why}.\n"
        "Point at local diffusers folders instead: --base/--refiner/--fast on the command line, or the "
        f"environment variables {', '.join(ENV_VARS.values())} (use --refiner none to skip the refiner)"
        + ("; `--preset demo` uses the small demo models shipped with sdxl-fast." if demo_models_available() else
           ". This copy of sdxl-fast has no demo models (demo_models/); docs/DEMO_MODELS.md says how to train them.")
    )


def find_local_folder(source: str, role: str, subfolders: list[str] | None = None) -> Path:
    """Return a local folder holding `source`: the folder itself, its HF cache snapshot, or a download."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not _REPO_ID.match(source):
        raise _not_found(source, role, "no such local folder, and it is not a hub id of the form owner/name")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = _WEIGHT_PATTERNS if not subfolders else [f"{sub}/{p}" for sub in subfolders for p in _WEIGHT_PATTERNS]
    patterns.append("model_index.json")
    try:
        return Path(snapshot_download(source, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if hub_offline():
        raise _not_found(source, role, "not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise _not_found(source, role, "not in the Hugging Face cache, and the Hugging Face Hub is unreachable")
    log.info("Downloading %s (%s) from the Hugging Face Hub", source, role)
    return Path(snapshot_download(source, allow_patterns=patterns))


def is_unet_only(folder: Path) -> bool:
    """A `distill` student is a bare UNet folder; a full pipeline has model_index.json."""
    if (folder / "model_index.json").is_file():
        return False
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "UNet2DConditionModel"


# Beside a UNet-only student's config.json: {"sampler": "ADD", "prediction_type": "epsilon"}, the Fast sampler it
# was trained for and how its output is read (written by sdxl_fast.distill.export). Without the file (or a key)
# the student runs the ADD sampler and its output is read as the base model's scheduler says (SDXL: epsilon).
STUDENT_CONFIG = "sdxl_fast.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def write_student_config(folder: str | Path, sampler: str = "ADD", prediction_type: str | None = None) -> Path:
    record = {"sampler": sampler, **({"prediction_type": prediction_type} if prediction_type else {})}
    path = Path(folder) / STUDENT_CONFIG
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_student_config(folder: str | Path) -> dict:
    """The student folder's sdxl_fast.json ({} without one), its values checked."""
    from .params import SAMPLERS

    path = Path(folder) / STUDENT_CONFIG
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("sampler", "ADD") not in SAMPLERS["fast"]:
        raise ValueError(f"{path}: unknown sampler {record['sampler']!r}; choose one of {SAMPLERS['fast']}")
    if record.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ValueError(f"{path}: unknown prediction_type {record['prediction_type']!r}; choose one of "
                         f"{PREDICTION_TYPES}")
    return record


def student_prediction_type(folder: str | Path) -> str | None:
    """The prediction type a student folder records; None when it records none (the base's applies)."""
    return read_student_config(folder).get("prediction_type")


def student_scheduler(scheduler, prediction_type: str | None):
    """`scheduler` (same class and noise schedule) reading the UNet's output as `prediction_type` (None: as is)."""
    if prediction_type is None or prediction_type == scheduler.config.prediction_type:
        return scheduler
    return type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)


def fast_sampler(folder: Path) -> str:
    """The Fast sampler a fast model runs by default: diffusers' SDXL-Turbo recipe ("Euler a") for a full
    few-step pipeline (model_index.json), else what the student folder's sdxl_fast.json says, else "ADD"."""
    if not is_unet_only(folder):
        return "Euler a"
    return read_student_config(folder).get("sampler", "ADD")


def model_name(source: str) -> str:
    """Short name for metadata: the hub repo name or the folder name."""
    return Path(source.rstrip("/")).name


PICKLES = ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl")


def _unloadable(cls, folder: Path, err: OSError) -> str:
    """One line: why `cls` could not be loaded from `folder`."""
    if folder.is_dir() and not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
        if pickles:
            return (f"{folder} has only pickled weights ({', '.join(pickles)}); sdxl-fast loads only .safetensors "
                    "(a pickle can run code when loaded): re-save them with save_pretrained(folder, "
                    "safe_serialization=True)")
    return f"could not load {cls.__name__} from {folder}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def read_ahead(folder: Path) -> int:
    """Read the weight files that `from_pretrained` reads in `folder` (not the variants, e.g. `*.fp16.safetensors`)
    once, in chunks, into the OS's page cache; returns the bytes read. A file read releases the GIL while the
    disk works, where safetensors parsing a file that is not cached holds it: so a load beside threads that
    serve requests holds them up for the parse from memory only, not for the disk."""
    total, buffer = 0, bytearray(64 << 20)
    for path in sorted(folder.glob("*.safetensors")):
        if "." in path.stem:  # a variant, which from_pretrained without `variant` does not read
            continue
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


class _Loader:
    """Loads each (folder, subfolder) once and hands back the same object on later requests."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cache: dict | None = None,
                 beside_requests: bool = False):
        self.device, self.dtype, self.cache = device, dtype, cache if cache is not None else {}
        self.beside_requests = beside_requests

    def get(self, cls, folder: Path, subfolder: str | None):
        key = (str(folder.resolve()), subfolder)
        if key not in self.cache:
            kwargs = {"subfolder": subfolder} if subfolder else {}
            try:
                if cls is CLIPTokenizer:
                    obj = cls.from_pretrained(folder, **kwargs)
                else:
                    if self.beside_requests:
                        read_ahead(folder / (subfolder or ""))
                    obj = cls.from_pretrained(folder, use_safetensors=True, torch_dtype=self.dtype, **kwargs)
            except OSError as err:
                raise ModelNotFoundError(_unloadable(cls, folder / (subfolder or ""), err)) from err
            if cls is not CLIPTokenizer:
                obj = obj.to(self.device).eval().requires_grad_(False)
            self.cache[key] = obj
        return self.cache[key]

    def encoders(self, folder: Path) -> TextEncoders:
        has_first = (folder / "text_encoder").is_dir()
        return TextEncoders(
            tokenizer=self.get(CLIPTokenizer, folder, "tokenizer") if has_first else None,
            text_encoder=self.get(CLIPTextModel, folder, "text_encoder") if has_first else None,
            tokenizer_2=self.get(CLIPTokenizer, folder, "tokenizer_2"),
            text_encoder_2=self.get(CLIPTextModelWithProjection, folder, "text_encoder_2"),
        )

    def scheduler(self, folder: Path):
        from diffusers import EulerDiscreteScheduler

        config = EulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
        # The Quality loop is Euler (the SDXL default); read only the noise schedule from the folder.
        return EulerDiscreteScheduler.from_config(config)


def load(modes: tuple[str, ...] = ("quality", "fast"), sources: ModelSources | None = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         cpu_offload: bool = False, share: Models | None = None, beside_requests: bool = False) -> Models:
    """Load the models for the given paths ("quality", "fast") onto one device, as their weights are.

    `sources` defaults to `resolve_sources()`. `dtype` may be a torch dtype or "fp32"/"fp16"/"bf16".
    With `cpu_offload` each model sits in CPU memory and moves to the GPU only while it runs.
    `share`: models loaded earlier (same device and dtype) whose components this load uses instead of reading
    them again, e.g. Quality loaded after Fast takes the student's text encoders and VAE, when they are the base's.
    `beside_requests`: other threads serve requests meanwhile, so each weight file is read ahead (`read_ahead`).
    The speed-ups are applied by the caller: `sdxl_fast.accel.apply(models, options)`.
    """
    unknown = set(modes) - {"quality", "fast"}
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of ('quality', 'fast'), got {modes!r}")
    sources = sources or resolve_sources()
    device, dtype = pick_device_dtype(device, dtype)
    if share is not None and (cpu_offload or (share.device, share.dtype) != (device, dtype)):
        raise ValueError(f"models on {share.device} {share.dtype} cannot be shared with a load for {device} {dtype}"
                         + (" with cpu_offload" if cpu_offload else ""))
    load_device = torch.device("cpu") if cpu_offload else device
    loader = _Loader(load_device, dtype, share.components if share is not None else None, beside_requests)
    models = Models(device=device, dtype=dtype, components=loader.cache)

    need_base = "quality" in modes
    fast_folder = None
    if "fast" in modes:
        fast_folder = find_local_folder(sources.fast, "fast", subfolders=None)
        need_base = need_base or is_unet_only(fast_folder)
    base_folder = find_local_folder(sources.base, "quality base") if need_base else None

    if "quality" in modes:
        refiner, refiner_zeros = None, False
        if sources.refiner is not None:
            refiner_folder = find_local_folder(sources.refiner, "refiner", subfolders=["unet", "scheduler"])
            refiner = loader.get(UNet2DConditionModel, refiner_folder, "unet")
            refiner_index = refiner_folder / "model_index.json"
            if refiner_index.is_file():  # diffusers' default when the pipeline's config leaves it out: True
                refiner_zeros = json.loads(refiner_index.read_text()).get("force_zeros_for_empty_prompt", True)
        index = json.loads((base_folder / "model_index.json").read_text())
        models.quality = QualityModels(
            encoders=loader.encoders(base_folder),
            vae=loader.get(AutoencoderKL, base_folder, "vae"),
            base=loader.get(UNet2DConditionModel, base_folder, "unet"),
            refiner=refiner,
            scheduler=loader.scheduler(base_folder),
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
            refiner_force_zeros_for_empty_prompt=bool(refiner_zeros),
            names={"base": model_name(sources.base), "refiner": model_name(sources.refiner or "")},
        )

    if "fast" in modes:
        if is_unet_only(fast_folder):
            family, student = base_folder, loader.get(UNet2DConditionModel, fast_folder, None)
            # A `distill` student reads the base's noise schedule with its own prediction type (sdxl_fast.json).
            scheduler = student_scheduler(loader.scheduler(family), student_prediction_type(fast_folder))
        else:
            family, student = fast_folder, loader.get(UNet2DConditionModel, fast_folder, "unet")
            scheduler = loader.scheduler(family)
        models.fast = FastModels(
            encoders=loader.encoders(family), vae=loader.get(AutoencoderKL, family, "vae"), student=student,
            scheduler=scheduler, names={"fast": model_name(sources.fast)}, sampler=fast_sampler(fast_folder),
        )

    if cpu_offload:
        models.offload_hooks = _enable_cpu_offload(loader, device)
    return models


def _enable_cpu_offload(loader: _Loader, device: torch.device) -> list:
    """accelerate's hooks move each model to `device` for its forward pass and back to the CPU after the
    next model starts, so only one large model occupies GPU memory at a time."""
    from accelerate import cpu_offload_with_hook

    if device.type == "cpu":
        log.info("cpu_offload has no effect when running on the CPU")
        return []
    hooks, previous = [], None
    for obj in loader.cache.values():
        if isinstance(obj, torch.nn.Module):
            _, previous = cpu_offload_with_hook(obj, device, prev_module_hook=previous)
            hooks.append(previous)
    return hooks
