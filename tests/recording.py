"""Record what the UNets receive during generation, through forward hooks (no mocking of the models)."""

from contextlib import contextmanager


@contextmanager
def record_unet_calls(**unets):
    """Yields a list of dicts {unet, timestep, latents, time_ids, text_embeds, context, output} in call order."""
    calls, handles = [], []
    for name, unet in unets.items():
        def hook(module, args, kwargs, output, name=name):
            sample, timestep = args[0], args[1]
            added = kwargs["added_cond_kwargs"]
            calls.append(dict(unet=name, timestep=int(timestep), latents=sample.clone(),
                              time_ids=added["time_ids"].clone(), text_embeds=added["text_embeds"].clone(),
                              context=kwargs["encoder_hidden_states"].clone(), output=output.sample.clone()))
        handles.append(unet.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
