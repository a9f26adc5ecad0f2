"""What the web app needs beyond the pipeline: compiling new shapes in the background, batching requests."""
