"""decode_worker: receives KV into its own pool and decodes on compressed pages."""
