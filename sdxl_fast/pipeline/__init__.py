"""The stages of a generation in data-flow order: prompts -> conditioning -> schedules -> sampling (with the
step cache) -> decoding, wired together by `generate`."""
