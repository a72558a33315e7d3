"""HealthAI: LoRA fine-tuning of Qwen2.5 to diagnose Chinese case records as JSON."""

__version__ = "0.1.0"
