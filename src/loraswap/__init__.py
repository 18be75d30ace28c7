"""loraswap: one OpenAI-compatible endpoint for a base model and many hot-swappable LoRAs."""

__version__ = "0.1.0"
