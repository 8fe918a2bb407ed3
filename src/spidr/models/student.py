"""The inference half of a SpidR / DinoSR model: conv front end, projection and student encoder, nothing else.

What a model exported to Hugging Face ``transformers`` holds (``spidr.models.hf_export``), and so what
``load_model`` gives back from such a directory: no teacher, prediction heads or codebooks, so it extracts features
but cannot train or produce codebook units. Module names, and so state-dict keys, are those of ``DinoSR``.
"""

from __future__ import annotations

import torch
from torch import nn

from spidr.config import ModelConfig
from spidr.models.components import FeatureProjection, build_encoder, build_feature_extractor
from spidr.models.frames import front_end_input, warn_if_padding_changes_features


class Student(nn.Module):
    """Feature extractor of ``cfg``'s architecture (inference only); the same inference API as ``DinoSR``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = build_feature_extractor(cfg)
        self.feature_projection = FeatureProjection(cfg.extractor_conv_layer_config[-1][0], cfg.encoder_embed_dim)
        self.student = build_encoder(cfg)
        # Unused at inference; kept so an export back to Hugging Face carries it (its masked_spec_embed).
        self.mask_embedding = nn.Parameter(torch.empty(cfg.encoder_embed_dim).uniform_())
        self.register_buffer("current_step", torch.zeros(1, dtype=torch.long))  # the training step it came from

    @property
    def num_layers(self) -> int:
        return len(self.student.layers)

    @property
    def num_codebooks(self) -> int:
        """0: an exported student has no prediction heads."""
        return 0

    @property
    def head_layers(self) -> range:
        """Empty: no layer has a prediction head (codebook units need k-means centroids here)."""
        return range(self.num_layers + 1, self.num_layers + 1)

    def features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Projected conv features (B, T, D) of waveforms (B, S)."""
        waveforms = front_end_input(
            waveforms, self.cfg, dtype=self.feature_projection.projection.weight.dtype, check_finite=not self.training
        )
        return self.feature_projection(self.feature_extractor(waveforms))

    def get_intermediate_outputs(
        self,
        waveforms: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        before_residual: bool = True,
        num_layers: int | None = None,
    ) -> list[torch.Tensor]:
        """Student layer outputs for waveforms (B, S), as ``DinoSR.get_intermediate_outputs``: a list of (B, T, D),
        layer l (1-based) at index l − 1; before-residual FFN outputs unless ``before_residual=False``."""
        warn_if_padding_changes_features(self.cfg, attention_mask, padding_mask)
        return self.student.get_intermediate_outputs(
            self.features(waveforms),
            attention_mask=attention_mask,
            padding_mask=padding_mask,
            num_layers=num_layers,
            before_residual=before_residual,
        )

    def get_codebooks(
        self,
        waveforms: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        onehot: bool = False,
    ) -> list[torch.Tensor | None]:
        """One None per layer: an exported student has no codebook heads (``DinoSR.get_codebooks`` gives None for the
        layers without a head)."""
        return [None] * self.num_layers
