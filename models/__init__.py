"""The ML side: `models.contract` (torch-free records every layer shares) and `models.core` (torch training)."""
