"""spidr: SpidR and DinoSR self-supervised speech representation learning."""

from spidr.config import DinoSRConfig, MaskingConfig, SpidRConfig

__version__ = "0.1.0"

__all__ = ["DinoSRConfig", "MaskingConfig", "SpidRConfig", "__version__"]
