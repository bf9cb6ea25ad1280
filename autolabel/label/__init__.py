"""Labels for features, drafted by an LLM and scored on held-out examples."""
