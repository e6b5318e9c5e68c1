"""SR3 super-resolution variants (filled in by the family recipe)."""

VARIANTS: dict = {}
