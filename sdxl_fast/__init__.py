"""sdxl-fast: SDXL text-to-image along two paths.

    import sdxl_fast
    from sdxl_fast import accel
    models = sdxl_fast.load()                      # quality (base + refiner) and fast (ADD student)
    accel.apply(models, accel.Acceleration.for_device(models.device))   # the speed-ups, where they help
    images = sdxl_fast.generate(models, sdxl_fast.GenerationParams("a red fox", mode="fast", seed=1))
    sdxl_fast.save_png(images[0], "fox.png")       # PNG with its generation parameters

The data flow: params -> loading -> pipeline (prompts -> conditioning -> schedules + sampling -> decoding)
-> metadata. Names are imported on first use, so `import sdxl_fast` (and the CLI's argument checks) cost no
torch or diffusers start-up.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "GenerationParams": "params",
    "ModelNotFoundError": "loading", "ModelSources": "loading", "PRESETS": "loading", "load": "loading",
    "resolve_sources": "loading",
    "Models": "models", "native_side": "models",
    "PromptTruncatedWarning": "pipeline.prompts",
    "Step": "pipeline.sampling",
    "generate": "pipeline.generate",
    "infotext": "metadata", "parse_infotext": "metadata", "read_parameters": "metadata", "save_png": "metadata",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdxl_fast' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
