"""Audio decoding, manifests, bucketed sampling, span masking and collation for pretraining."""
