"""kvmesh's inference engine: model, tokenizer, KV caches, prefix cache, scheduler, speculation."""
