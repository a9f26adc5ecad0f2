"""Serving: what a web request may ask for and how it runs.

requests.py turns the raw values of a UI event or API call into GenerationParams, every error naming its field;
limits.py bounds the work one request may ask for (pixels × images per mode, a time budget); zerogpu.py runs
the handlers through `spaces.GPU` on a Hugging Face ZeroGPU Space, with a duration estimated per request;
batcher.py runs the live requests of many typists as shared batched calls; compiler.py compiles each new
shape in a background thread while it is served uncompiled; packages.py loads (or compiles once, in the
background) the Fast UNet and VAE decoder compiled ahead of time for every size and batch.
"""
