"""sdxl_fast.serving.packages: the Fast UNet's ahead-of-time package loaded at start, or compiled in the
background while the UNet serves uncompiled, then swapped in while no generation runs. The compile is a
stand-in here (the real one takes minutes; tests/test_accel_aot.py runs it)."""

import threading
from contextlib import contextmanager

import pytest
import torch

from sdxl_fast.accel import aot
from sdxl_fast.serving import packages
from sdxl_fast.testing import random_weights


@pytest.fixture
def unet():
    return random_weights.build_random_components(random_weights.tiny_configs(), device="cpu")["unet"]


@pytest.fixture
def stand_in(monkeypatch):
    """aot.compile_unet writes a file once `release` is set (or raises `fail`); aot.use_package records which
    module it was given and whether the exclusive lock was held."""
    calls = {"compiled": [], "used": [], "release": threading.Event(), "fail": None, "held": threading.Lock()}

    def compile_unet(unet, path, max_batch):
        calls["compiled"].append(unet)
        calls["release"].wait(10)
        if calls["fail"]:
            raise calls["fail"]
        path.write_bytes(b"kernels")
        return path

    def use_package(unet, path):
        calls["used"].append((unet, path.read_bytes(), calls["held"].locked()))

    monkeypatch.setattr(aot, "compile_unet", compile_unet)
    monkeypatch.setattr(aot, "use_package", use_package)
    return calls


def exclusive(calls):
    @contextmanager
    def hold():
        with calls["held"]:
            yield
    return hold


def test_without_a_package_it_compiles_a_copy_in_the_background_then_swaps_while_no_generation_runs(
        unet, stand_in, tmp_path):
    swapped = []
    package = packages.FastPackage(unet, exclusive(stand_in), lambda: swapped.append(True), 16, tmp_path).start()
    assert package.state == "compiling" and not stand_in["used"]  # start() did not wait for the compile
    stand_in["release"].set()
    package.thread.join(10)
    assert package.state == "compiled" and swapped == [True]
    assert stand_in["compiled"][0] is not unet  # a copy is traced, never the module being served
    assert [(u is unet, data, held) for u, data, held in stand_in["used"]] == [(True, b"kernels", True)]
    assert package.path.is_file() and not list(tmp_path.glob("*.partial.pt2"))

    # The next start (a restart, or a replica given the folder) loads it at once and compiles nothing.
    again = packages.FastPackage(unet, exclusive(stand_in), lambda: swapped.append(True), 16, tmp_path).start()
    assert again.state == "loaded" and len(stand_in["compiled"]) == 1 and swapped == [True]


def test_a_failed_compile_leaves_the_unet_uncompiled_and_stores_nothing(unet, stand_in, tmp_path):
    stand_in["fail"] = RuntimeError("out of memory")
    stand_in["release"].set()
    package = packages.FastPackage(unet, exclusive(stand_in), lambda: None, 16, tmp_path).start()
    package.thread.join(10)
    assert package.state == "failed: RuntimeError: out of memory"
    assert not stand_in["used"] and not list(tmp_path.iterdir())


def test_the_package_name_follows_what_the_kernels_depend_on(unet, tmp_path):
    name = packages.package_path(unet, 16, tmp_path)
    assert packages.package_path(unet, 16, tmp_path) == name
    assert packages.package_path(unet, 8, tmp_path) != name  # the largest batch
    with torch.no_grad():
        unet.conv_in.weight.mul_(2)
    assert packages.package_path(unet, 16, tmp_path) == name  # weights are not in the package
    unet.to(memory_format=torch.channels_last)
    assert packages.package_path(unet, 16, tmp_path) != name  # strides are
    unet.to(torch.float16)
    assert packages.package_path(unet, 16, tmp_path) != name


def test_the_app_with_compile_aot_serves_at_once_and_swaps_the_package_in_while_holding_every_slot(
        tiny_models, stand_in, tmp_path, monkeypatch):
    import app
    import sdxl_fast

    monkeypatch.setattr(packages, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(sdxl_fast, "generate", lambda models, params: None)
    studio = app.Studio(tiny_models)
    held = []
    monkeypatch.setattr(aot, "use_package", lambda unet, path: held.append(studio.slots._value))
    app.start_serving(studio, "aot")
    assert studio.status()["fast_unet_ahead_of_time"] == "compiling"
    stand_in["release"].set()
    studio.package.thread.join(10)
    assert studio.status()["fast_unet_ahead_of_time"] == "compiled"
    assert held == [0]  # the only slot: no generation ran during the swap
