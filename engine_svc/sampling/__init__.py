"""The sampler's parts: per-request state in persistent device tensors (state.py) and the logits
processing steps (processing.py). engine_svc/sampler.py puts them together and states the contract."""
