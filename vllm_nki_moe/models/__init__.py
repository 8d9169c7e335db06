"""vLLM model classes of this plugin."""
