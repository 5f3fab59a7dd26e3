"""peftlab: LoRA and QLoRA fine-tuning experiments as recipes, run folders and comparisons."""

__version__ = "0.1.0"
