"""The demo models' data, probe classifier and evaluation (see docs/DEMO_MODELS.md).

    from sdxl_fast.shapes import sample
    image, caption, labels = sample(seed=7)   # 128x128 RGB, "a large red star at the top left on ...", {...}

Modules: data (the generator and its held-out split), writer (image-folder output), probe (the classifier),
frechet (Fréchet distance), evaluate (the sampler table); the demo family's training: demo_family (architectures),
demo_config (run settings), pool (parallel drawing), train_demo (stages), feature_net (the discriminator's ViT),
export_demo (fp16 diffusers folders).
"""

from .data import HELDOUT_START, heldout_seeds, parse_caption, sample

__all__ = ["HELDOUT_START", "heldout_seeds", "parse_caption", "sample"]
