"""Adapters: small trainable modules beside a frozen model (LoRA)."""
