"""Model building blocks, SpidR and DinoSR, checkpoint loading and conversion."""
