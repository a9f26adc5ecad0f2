"""The probe: a small CNN that reads shape, colour, position cell and count off a shapes image.

It is trained on real (procedurally drawn) training-seed images only, and is then used, frozen, to score
generated images against their prompts and to embed images for the Fréchet distance (`features`: the
penultimate layer). Images of any size are box-resized to `input_size` (64 px) first, so a 128 px data image
and a 128 px generated image take exactly the same path.

Architecture: 4 x [conv3x3 -> BatchNorm -> ReLU -> maxpool2] (16, 32, 64, 64 channels; 64 px -> 4 px), then
flatten -> linear -> ReLU (the `feature_dim` features), then one linear head per attribute. The flatten keeps
the 4x4 spatial layout that the position head needs (a global average pool would discard it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import data

DEFAULT_DIR = Path(__file__).resolve().parent / "probe_weights"
# Class lists per head; position has no class for multi-object images (their captions name no position).
HEADS = {"shape": data.SHAPES, "colour": data.COLOUR_NAMES, "position": data.POSITIONS, "count": data.COUNTS}
IGNORE = -1  # target index for "this caption does not state this attribute"


@dataclass(frozen=True)
class ProbeConfig:
    input_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)
    feature_dim: int = 128


class Probe(nn.Module):
    def __init__(self, config: ProbeConfig = ProbeConfig()):
        super().__init__()
        self.config = config
        layers, previous = [], 3
        for ch in config.channels:
            layers += [nn.Conv2d(previous, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            previous = ch
        self.trunk = nn.Sequential(*layers)
        spatial = config.input_size // 2 ** len(config.channels)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(previous * spatial * spatial, config.feature_dim),
                                   nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, len(classes))
                                    for name, classes in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [-1, 1] -> [N, feature_dim] penultimate features."""
        return self.embed(self.trunk(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------------------
# Images and labels as tensors.

def to_uint8(images: list[Image.Image], input_size: int = 64) -> torch.Tensor:
    """PIL images of any size -> [N, 3, input_size, input_size] uint8 (box filter: an exact 2x2 mean at 128 px)."""
    arrays = [np.asarray(im.convert("RGB").resize((input_size, input_size), Image.BOX)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def label_targets(labels: list[dict], heads: dict = HEADS) -> dict[str, torch.Tensor]:
    """Label dicts -> class-index tensors per head; an attribute a caption does not state becomes IGNORE."""
    out = {}
    for name, classes in heads.items():
        out[name] = torch.tensor([classes.index(lab[name]) if lab.get(name) is not None else IGNORE
                                  for lab in labels])
    return out


def render(seeds, input_size: int = 64) -> tuple[torch.Tensor, list[dict]]:
    """Draw seeds at the data resolution and resize them for the probe, as a generated image would be."""
    images, labels = [], []
    for seed in seeds:
        image, _, lab = data.sample(seed)
        images.append(image)
        labels.append(lab)
    return to_uint8(images, input_size), labels


# ---------------------------------------------------------------------------------------------------------
# Prediction and scoring.

@torch.no_grad()
def predict_indices(probe: Probe, x_uint8: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    probe.eval()
    parts = [probe(normalise(x_uint8[i:i + batch_size])) for i in range(0, len(x_uint8), batch_size)]
    return {name: torch.cat([p[name] for p in parts]).argmax(dim=1) for name in HEADS}


@torch.no_grad()
def features(probe: Probe, images) -> np.ndarray:
    """Penultimate features of PIL images (or a uint8 tensor from `to_uint8`) -> [N, feature_dim] float64."""
    probe.eval()
    x = images if isinstance(images, torch.Tensor) else to_uint8(images, probe.config.input_size)
    parts = [probe.features(normalise(x[i:i + 256])) for i in range(0, len(x), 256)]
    return torch.cat(parts).double().numpy()


def predict(probe: Probe, images: list[Image.Image]) -> list[dict]:
    """PIL images -> [{"shape": "circle", "colour": "red", "position": "top left", "count": 1}, ...]."""
    idx = predict_indices(probe, to_uint8(images, probe.config.input_size))
    return [{name: HEADS[name][int(idx[name][i])] for name in HEADS} for i in range(len(images))]


def score(predicted: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
          heads: dict = HEADS) -> dict[str, float]:
    """Per-attribute accuracy over the captions that state the attribute, and "all": the fraction of captions
    whose every stated attribute is predicted correctly."""
    out, all_ok = {}, None
    for name in heads:
        stated = targets[name] != IGNORE
        ok = (predicted[name] == targets[name]) | ~stated
        out[name] = float(ok[stated].float().mean()) if stated.any() else float("nan")
        all_ok = ok if all_ok is None else all_ok & ok
    out["all"] = float(all_ok.float().mean())
    return out


def evaluate_real(probe: Probe, n: int = 2000) -> dict[str, float]:
    """Accuracy on the first n held-out seeds (real images), the probe's ceiling for generated ones."""
    x, labels = render(data.heldout_seeds(n), probe.config.input_size)
    return score(predict_indices(probe, x), label_targets(labels))


# ---------------------------------------------------------------------------------------------------------
# Training.

def train_probe(steps: int = 2000, train_images: int = 20000, batch_size: int = 64, lr: float = 3e-3,
                seed: int = 0, config: ProbeConfig = ProbeConfig(), log_every: int = 0,
                first_seed: int = 0) -> Probe:
    """Train on training seeds first_seed .. first_seed + train_images - 1 (drawn once, then reused for
    several epochs: drawing costs more than a training step). AdamW with a cosine learning-rate decay."""
    if first_seed + train_images > data.HELDOUT_START:
        raise ValueError("training seeds must stay below HELDOUT_START")
    torch.manual_seed(seed)
    x, labels = render(range(first_seed, first_seed + train_images), config.input_size)
    targets = label_targets(labels)
    probe = Probe(config)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(train_images)
    cursor, started = 0, time.time()
    probe.train()
    for step in range(steps):
        if cursor + batch_size > train_images:
            order, cursor = torch.randperm(train_images), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        logits = probe(normalise(x[idx]))
        loss = sum(F.cross_entropy(logits[n], targets[n][idx], ignore_index=IGNORE) for n in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:.0f}s", flush=True)
    return probe.eval()


# ---------------------------------------------------------------------------------------------------------
# Saving: safetensors weights + a JSON config that also records how the probe was made and how well it does.

def save_probe(probe: Probe, out: str | Path, info: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(out / "probe.safetensors"))
    config = {"config": asdict(probe.config), "heads": {k: list(v) for k, v in HEADS.items()}, **(info or {})}
    (out / "probe.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_probe(folder: str | Path = DEFAULT_DIR) -> Probe:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "probe.safetensors").is_file():
        raise FileNotFoundError(f"No probe in {folder}; train one with `python -m sdxl_fast.shapes train-probe --out {folder}`")
    meta = json.loads((folder / "probe.json").read_text())
    if meta["heads"] != {k: list(v) for k, v in HEADS.items()}:
        raise ValueError(f"The probe in {folder} was trained for other classes; retrain it")
    cfg = meta["config"]
    probe = Probe(ProbeConfig(input_size=cfg["input_size"], channels=tuple(cfg["channels"]),
                              feature_dim=cfg["feature_dim"]))
    probe.load_state_dict(load_file(str(folder / "probe.safetensors")))
    return probe.eval()
