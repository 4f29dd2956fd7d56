"""Adaptation strategies: freezing, progressive unfreezing, LoRA (peft) and layer-wise lr decay."""
