"""Adaptation strategies: freezing by depth or name (more arrive with LoRA and progressive unfreezing)."""
