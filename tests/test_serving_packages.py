"""sdxl_fast.serving.packages: the Fast UNet's and VAE decoder's ahead-of-time packages loaded at start, or
compiled in the background while the modules serve uncompiled, then swapped in while no generation runs.
The compile is a stand-in here (the real one takes minutes in another process; tests/test_accel_aot.py runs it)."""

import pickle
import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from sdxl_fast.accel import aot
from sdxl_fast.serving import packages
from sdxl_fast.testing import random_weights


@pytest.fixture
def fast():
    """Models whose Fast path is a tiny UNet and VAE (all FastPackages looks at)."""
    parts = random_weights.build_random_components(random_weights.tiny_configs(), device="cpu")
    return SimpleNamespace(fast=SimpleNamespace(student=parts["unet"], vae=parts["vae"]))


@pytest.fixture
def stand_in(monkeypatch):
    """The compile in another process writes a file once `release` is set (or raises `fail`); aot's use
    functions record which module they were given and whether the exclusive lock was held."""
    calls = {"compiled": [], "processes": [], "used": [], "release": threading.Event(), "fail": None,
             "held": threading.Lock()}

    def compile_elsewhere(part, module, path, process=None):
        calls["compiled"].append(module)
        calls["processes"].append(process)
        calls["release"].wait(10)
        path.write_bytes(b"kernels")
        if calls["fail"]:  # after writing part of its file, as a compile may
            raise calls["fail"]
        return path

    def use_package(module, path):
        calls["used"].append((module, path.read_bytes(), calls["held"].locked()))

    monkeypatch.setattr(packages, "compile_elsewhere", compile_elsewhere)
    for part in ("unet", "decoder"):
        monkeypatch.setattr(aot, f"use_{part}_package", use_package)
    return calls


def exclusive(calls):
    @contextmanager
    def hold():
        with calls["held"]:
            yield
    return hold


def test_without_packages_it_compiles_in_the_background_then_swaps_while_no_generation_runs(
        fast, stand_in, tmp_path):
    swapped = []
    aot_ = packages.FastPackages(fast, exclusive(stand_in), lambda: swapped.append(True), tmp_path).start()
    assert set(aot_.states.values()) <= {"queued", "compiling"} and not stand_in["used"]  # start() did not wait
    stand_in["release"].set()
    aot_.thread.join(10)
    assert aot_.states == {"unet": "compiled", "vae-decoder": "compiled"} and swapped == [True, True]
    modules = [fast.fast.vae, fast.fast.student]  # the decoder first: uncompiled, it is most of a live batch
    # The served modules run the packages compiled for them, swapped in under the lock, both compiled by one
    # process (one set of imports).
    assert stand_in["compiled"] == modules
    first, second = stand_in["processes"]
    assert first is second and first is not None
    assert [(u, data, held) for u, data, held in stand_in["used"]] == [(m, b"kernels", True) for m in modules]
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["unet", "vae"]  # no partial files left

    # The next start (a restart, or a replica given the folder) loads them at once and compiles nothing.
    again = packages.FastPackages(fast, exclusive(stand_in), lambda: swapped.append(True), tmp_path).start()
    assert again.states == {"unet": "loaded", "vae-decoder": "loaded"}
    assert len(stand_in["compiled"]) == 2 and swapped == [True, True] and not again.thread.is_alive()


def test_a_package_that_stopped_the_last_start_is_not_loaded_again(fast, stand_in, tmp_path):
    stand_in["release"].set()
    first = packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start()
    first.thread.join(10)
    loads = packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start()
    assert loads.states == {"unet": "loaded", "vae-decoder": "loaded"} and len(stand_in["used"]) == 4
    # That start "crashed" before a generation ran through the packages: the next one serves uncompiled.
    after_crash = packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start()
    assert all(state.startswith("failed: a start stopped") for state in after_crash.states.values())
    assert len(stand_in["used"]) == 4 and len(stand_in["compiled"]) == 2 and not after_crash.thread.is_alive()
    # Deleted, they are compiled again, and once a generation has run through them they are trusted.
    for path in after_crash.paths.values():
        path.unlink()
    packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start().thread.join(10)
    packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start().ran()
    assert packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start().states == {
        "unet": "loaded", "vae-decoder": "loaded"}


def test_a_failed_compile_leaves_that_module_uncompiled_and_stores_nothing(fast, stand_in, tmp_path):
    stand_in["fail"] = RuntimeError("out of memory")
    stand_in["release"].set()
    aot_ = packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start()
    aot_.thread.join(10)
    assert aot_.states["unet"] == "failed: RuntimeError: out of memory"
    assert not stand_in["used"] and not list(tmp_path.iterdir())


def test_a_compile_that_stops_its_process_leaves_the_next_part_a_new_one(fast, stand_in, tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    stand_in["release"].set()
    compile_elsewhere = packages.compile_elsewhere

    def crash_first(part, module, path, process=None):
        compile_elsewhere(part, module, path, process)
        if part == "vae-decoder":
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(packages, "compile_elsewhere", crash_first)
    aot_ = packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start()
    aot_.thread.join(10)
    assert aot_.states["vae-decoder"].startswith("failed: BrokenProcessPool")
    assert aot_.states["unet"] == "compiled"
    first, second = stand_in["processes"]
    assert first is not second and second is not None


def test_the_compiling_process_gets_a_module_without_data_whose_package_is_the_served_modules(fast, tmp_path):
    unet = fast.fast.student.to(memory_format=torch.channels_last)  # strides, as on a GPU, are part of the name
    skeleton = packages._skeleton(unet)
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    assert all(not t.is_meta for t in unet.parameters())  # the served module is left as it was
    # What the compiling process makes of it: memory on the device, and the name of the served module's package.
    rebuilt = pickle.loads(pickle.dumps(skeleton)).to_empty(device="cpu")
    assert packages.package_path("unet", rebuilt, tmp_path) == packages.package_path("unet", unet, tmp_path)


def test_the_package_name_follows_what_the_kernels_depend_on(fast, tmp_path):
    unet = fast.fast.student
    name = packages.package_path("unet", unet, tmp_path)
    assert packages.package_path("unet", unet, tmp_path) == name
    with torch.no_grad():
        unet.conv_in.weight.mul_(2)
    assert packages.package_path("unet", unet, tmp_path) == name  # weights are not in the package
    unet.to(memory_format=torch.channels_last)
    assert packages.package_path("unet", unet, tmp_path) != name  # strides are
    unet.to(torch.float16)
    assert packages.package_path("unet", unet, tmp_path) != name


def test_the_app_with_compile_aot_serves_at_once_and_swaps_the_packages_in_while_holding_every_slot(
        tiny_models, stand_in, tmp_path, monkeypatch):
    import app
    import sdxl_fast

    monkeypatch.setattr(packages, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(sdxl_fast, "generate", lambda models, params: None)
    studio = app.Studio(tiny_models)
    held = []
    for part in ("unet", "decoder"):
        monkeypatch.setattr(aot, f"use_{part}_package", lambda module, path: held.append(studio.slots._value))
    app.start_serving(studio, "aot")
    assert studio.status()["fast_ahead_of_time"]["unet"] in ("queued", "compiling")
    stand_in["release"].set()
    studio.packages.thread.join(10)
    assert studio.status()["fast_ahead_of_time"] == {"unet": "compiled", "vae-decoder": "compiled"}
    assert held == [0, 0]  # the only slot: no generation ran during either swap


def test_with_cpu_offload_the_app_leaves_aot_off_and_says_so(tiny_models, stand_in, monkeypatch, caplog):
    import app
    import sdxl_fast

    monkeypatch.setattr(sdxl_fast, "generate", lambda models, params: None)
    monkeypatch.setattr(tiny_models, "offload_hooks", ["a hook"])  # the weights move on every call
    studio = app.Studio(tiny_models)
    app.start_serving(studio, "aot")
    assert studio.packages is None and "fast_ahead_of_time" not in studio.status()
    assert "--compile aot is ignored with --cpu-offload" in caplog.text


def test_a_stored_package_that_does_not_load_is_compiled_again_and_the_server_starts(fast, stand_in, tmp_path,
                                                                                     caplog, monkeypatch):
    path = packages.package_path("unet", fast.fast.student, tmp_path)
    path.write_bytes(b"truncated")
    used = stand_in["used"]

    def use_package(module, p):
        if p.read_bytes() == b"truncated":
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        used.append((module, p.read_bytes(), stand_in["held"].locked()))

    monkeypatch.setattr(aot, "use_unet_package", use_package)
    monkeypatch.setattr(aot, "use_decoder_package", use_package)
    stand_in["release"].set()
    aot_ = packages.FastPackages(fast, exclusive(stand_in), lambda: None, tmp_path).start()
    aot_.thread.join(10)
    assert "could not be loaded (PytorchStreamReader failed" in caplog.text
    assert aot_.states == {"unet": "compiled", "vae-decoder": "compiled"} and path.read_bytes() == b"kernels"
