"""KV communication between agents: KV caches, RoPE moves, segments, anchors, blending, stores."""
