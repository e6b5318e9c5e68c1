"""DDPM variants on the embedded data (filled in by the family recipe)."""

VARIANTS: dict = {}
