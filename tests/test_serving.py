"""sdxl_fast.serving without a server: request parsing, limits, the time budget, ZeroGPU's duration estimate."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from sdxl_fast import accel
from sdxl_fast.params import GenerationParams
from sdxl_fast.serving import limits, requests, zerogpu
from sdxl_fast.serving.limits import Deadline, LimitError, Limits, OverBudget

FAST = dict(prompt="a fox", steps=1, seed=7, randomize_seed=False, size="512x512", num_images=1, orig_w=0,
            orig_h=0, crop_top=0, crop_left=0, target_w=0, target_h=0)
QUALITY = dict(FAST, negative_prompt="", steps=50, guidance_scale=5.0, refiner_switch=0.8, aesthetic_score=6.0,
               negative_aesthetic_score=2.5, cache_interval=1)
NUMERIC = {"fast": ["steps", "seed", "num_images", *requests.MICRO],
           "quality": ["steps", "seed", "num_images", *requests.MICRO, "guidance_scale", "refiner_switch",
                       "aesthetic_score", "negative_aesthetic_score", "cache_interval"]}
BAD_NUMBERS = [math.nan, math.inf, -math.inf, 1e300, 10**40, "abc", "", None, True, [1], {"a": 1}, "<b>7</b>"]
# Empty micro-conditioning sizes and crops mean 0 (issue 29's rule: the output size for that side).
BLANK_OK = {None, ""}


def cases():
    for mode, fields in NUMERIC.items():
        for field in fields:
            for value in BAD_NUMBERS:
                if field in requests.MICRO and (value is None or value == ""):
                    continue
                yield pytest.param(mode, field, value, id=f"{mode}-{field}-{value!r}"[:60])


@pytest.mark.parametrize("mode, field, value", list(cases()))
def test_every_bad_number_names_its_field_and_what_is_allowed(mode, field, value):
    raw = dict(FAST if mode == "fast" else QUALITY, **{field: value})
    with pytest.raises(requests.FieldError) as caught:
        requests.parse(mode, raw)
    message = str(caught.value)
    assert caught.value.field == field
    assert message.startswith(f"{requests.LABELS[field]} ({field}) must be ") and " from " in message
    assert "<" not in message


@pytest.mark.parametrize("value", ["<img src=x>", "1024x", "x1024", "1004x1000", "8192x1024", "0x0", "", None, 1024,
                                   "1024x1024x3", "1e3x1e3"])
def test_bad_sizes_name_the_size_field(value):
    with pytest.raises(requests.FieldError, match=r"^Size \(size\) must be a size such as 1024x768") as caught:
        requests.parse("fast", dict(FAST, size=value))
    assert "<" not in str(caught.value)


def test_user_text_is_escaped_and_cut_short():
    with pytest.raises(requests.FieldError) as caught:
        requests.parse("quality", dict(QUALITY, steps="<script>alert(1)</script>" * 10))
    message = str(caught.value)
    assert "&lt;script&gt;" in message and "<" not in message and len(message) < 200


@pytest.mark.parametrize("field, value", [("prompt", 3), ("prompt", "x" * 10_001), ("negative_prompt", ["a"]),
                                          ("randomize_seed", "maybe"), ("randomize_seed", None), ("randomize_seed", 2)])
def test_other_fields_name_themselves_too(field, value):
    with pytest.raises(requests.FieldError, match=rf"\({field}\) must be"):
        requests.parse("quality", dict(QUALITY, **{field: value}))


def test_good_values_in_their_forms_are_accepted():
    raw = dict(QUALITY, steps="20", seed=3.0, num_images=2.0, size=" 640 × 384 ", guidance_scale="7.5",
               randomize_seed="false", prompt=None, negative_prompt=None)
    p = requests.parse("quality", raw).params.resolved()
    assert (p.steps, p.seed, p.num_images, p.width, p.height, p.guidance_scale) == (20, 3, 2, 640, 384, 7.5)
    assert (p.prompt, p.negative_prompt) == ("", "")
    assert requests.parse("fast", dict(FAST, size="768")).params.width == 768


def test_fast_ignores_the_quality_only_fields():
    p = requests.parse("fast", dict(FAST, guidance_scale=math.nan, cache_interval="x")).params
    assert (p.guidance_scale, p.use_refiner, p.cache_interval) == (0.0, False, 1)


def test_a_random_seed_is_drawn_when_asked_whatever_the_seed_field_holds():
    parsed = requests.parse("fast", dict(FAST, randomize_seed=True, seed=None))
    assert parsed.randomized and 0 <= parsed.params.seed <= 2**32 - 1


@pytest.mark.parametrize("orig_w, orig_h, expected", [
    (0, 0, (512, 768)), (None, "", (512, 768)), (0, 1024, (1024, 768)), (1536, 0, (512, 1536)),
    (1536, 1024, (1024, 1536))])
def test_one_side_of_a_micro_conditioning_pair_means_the_output_size_for_the_other(orig_w, orig_h, expected):
    """Issue 29's rule: 0 or empty for either side of a pair is the output size for that side."""
    p = requests.parse("quality", dict(QUALITY, size="768x512", orig_w=orig_w, orig_h=orig_h)).params.resolved()
    assert p.original_size == expected  # (height, width)
    p = requests.parse("fast", dict(FAST, size="768x512", target_w=orig_w, target_h=orig_h)).params.resolved()
    assert p.target_size == expected


# -- limits ------------------------------------------------------------------------------------------------

def test_limits_come_from_the_device_then_env_then_flags():
    assert Limits.resolve("cuda", env={}) == Limits.for_device("cuda")
    assert Limits.for_device("cuda").fast_pixels == 4 * 1024 * 1024
    assert Limits.for_device("cpu").quality_pixels < Limits.for_device("cuda").quality_pixels
    env = {"SDXL_FAST_MAX_FAST_PIXELS": "2x512x512", "SDXL_FAST_TIME_BUDGET": "5.5",
           "SDXL_FAST_MAX_QUALITY_PIXELS": "none"}
    got = Limits.resolve("cuda", {"time_budget": "9", "realtime_pixels": None}, env)
    assert (got.fast_pixels, got.quality_pixels, got.time_budget, got.realtime_pixels) == (
        2 * 512 * 512, None, 9.0, 1024 * 1024)
    with pytest.raises(ValueError, match="SDXL_FAST_MAX_FAST_PIXELS: expected a number"):
        Limits.resolve("cpu", env={"SDXL_FAST_MAX_FAST_PIXELS": "lots"})
    with pytest.raises(ValueError, match="--time-budget"):
        Limits.resolve("cpu", {"time_budget": "soon"}, env={})


def test_a_request_over_the_limit_is_told_the_limit_and_the_flag_that_raises_it():
    lim = Limits(fast_pixels=1024 * 1024, quality_pixels=None)
    ok = GenerationParams("x", mode="fast", width=512, height=512, num_images=4).resolved()
    lim.check(ok)
    big = GenerationParams("x", mode="fast", width=1024, height=1024, num_images=2).resolved()
    with pytest.raises(LimitError) as caught:
        lim.check(big)
    message = str(caught.value)
    assert "2 images of 1024x1024 (2.1 megapixels)" in message and "at most 1.0 megapixels" in message
    assert "--max-fast-pixels" in message and "SDXL_FAST_MAX_FAST_PIXELS" in message
    lim.check(GenerationParams("x", mode="quality", width=4096, height=4096, num_images=4).resolved())  # no limit


def test_realtime_fast_requests_are_the_small_ones():
    lim = Limits(realtime_pixels=1024 * 1024)
    assert lim.realtime(GenerationParams("x", mode="fast", width=1024, height=1024).resolved())
    assert not lim.realtime(GenerationParams("x", mode="fast", width=1024, height=1024, num_images=2).resolved())
    assert not lim.realtime(GenerationParams("x", mode="quality", width=512, height=512).resolved())


def test_the_deadline_stops_a_request_over_its_budget_naming_the_budget():
    now = [0.0]
    deadline = Deadline(10, clock=lambda: now[0])
    deadline.check(SimpleNamespace(index=1, total=4))
    now[0] = 10.5
    with pytest.raises(OverBudget, match=r"Stopped after 10.5 s at step 2 of 4: .*time budget is 10 s.*--time-budget"):
        deadline.check(SimpleNamespace(index=2, total=4))
    Deadline(None, clock=lambda: 1e9).check()  # no budget, never over


def test_served_files_are_deleted_after_an_hour_by_default():
    assert limits.delete_cache(env={}) == (600, 3600)
    assert limits.delete_cache(env={"SDXL_FAST_DELETE_CACHE_AFTER": "60"}) == (30, 60)
    assert limits.delete_cache(2, env={"SDXL_FAST_DELETE_CACHE_AFTER": "60"}) == (1, 2)
    assert limits.delete_cache(0, env={}) is None


# -- ZeroGPU -------------------------------------------------------------------------------------------------

def test_zerogpu_duration_grows_with_the_work_and_stops_at_the_budget():
    lim = Limits(time_budget=60)

    def seconds(mode, steps, side, n):
        return zerogpu.duration_seconds(GenerationParams("x", mode=mode, steps=steps, width=side, height=side,
                                                         num_images=n).resolved(), lim)
    assert seconds("fast", 1, 512, 1) <= zerogpu.START_SECONDS + 1
    assert seconds("quality", 50, 1024, 1) < seconds("quality", 100, 1024, 1) < seconds("quality", 100, 1024, 4)
    assert seconds("quality", 100, 1536, 4) == 60 + zerogpu.START_SECONDS
    assert all(isinstance(seconds("fast", s, 1024, 4), int) for s in (1, 4))


def test_zerogpu_turns_compile_graphs_and_fp8_off():
    options = zerogpu.acceleration(accel.Acceleration(fp8=True))
    assert not (options.compile or options.cuda_graphs or options.fp8) and options.fuse_qkv
