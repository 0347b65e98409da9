"""prefill_worker: runs prompts and sends their KV, layer by layer, to a decode worker."""
