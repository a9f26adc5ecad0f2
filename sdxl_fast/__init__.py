"""sdxl-fast: SDXL text-to-image along two paths.

    import sdxl_fast
    models = sdxl_fast.load()                      # quality (base + refiner) and fast (ADD student)
    images = sdxl_fast.generate(models, sdxl_fast.GenerationParams("a red fox", mode="fast", seed=1))
    sdxl_fast.save_png(images[0], "fox.png")       # PNG with its generation parameters

The data flow, one module each: prompts -> conditioning -> schedules + sampling -> decoding -> metadata.
"""

from .generate import generate
from .loading import ModelNotFoundError, Models, ModelSources, PRESETS, load, native_side, resolve_sources
from .metadata import VERSION as __version__
from .metadata import infotext, parse_infotext, read_parameters, save_png
from .params import GenerationParams
from .prompts import PromptTruncatedWarning
from .sampling import Step

__all__ = [
    "GenerationParams", "ModelNotFoundError", "ModelSources", "Models", "PRESETS", "PromptTruncatedWarning",
    "Step", "generate", "infotext", "load", "native_side", "parse_infotext", "read_parameters", "resolve_sources", "save_png",
]
