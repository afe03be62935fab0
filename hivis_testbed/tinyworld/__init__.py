"""The tiny world: procedural scenes, prompts, and the small LLaVA target trained on them."""
