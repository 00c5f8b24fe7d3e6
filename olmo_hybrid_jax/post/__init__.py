"""Post-training: chat data and SFT (``chat``), low-rank adapters (``lora``), preference optimisation (``dpo``)."""
