"""DinoSR as reproduced by the official SpidR code (spec §4.2): all prediction heads read the student's final layer.

Data flow of one training forward:
waveforms (B, S) → conv extractor + projection → feats (B, T, D)
  ├─ student: feats with masked frames replaced by ``mask_embedding`` → head inputs (one per codebook)
  └─ teacher (EMA copy, no grad): feats → top-K layer outputs, instance-normalised → codebook labels
loss per masked frame = mean over codebooks of the cross-entropy between head i and codebook i's label.
The codebooks are updated inside the forward (training mode only), or once per optimizer step from the statistics
of its micro-batches (``codebook_updates_pooled``); the teacher by ``update_ema`` after the optimizer step.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spidr import distributed
from spidr.config import DinoSRConfig, ModelConfig
from spidr.models.codebook import Codebook
from spidr.models.components import (
    FeatureProjection,
    FrameMasks,
    build_encoder,
    build_feature_extractor,
    frame_masks,
    init_transformer_,
    scale_grad,
)
from spidr.models.frames import front_end_input, warn_if_padding_changes_features
from spidr.models.schedules import dinosr_ema_decay

logger = logging.getLogger(__name__)


class LogSoftmaxFp32(nn.Module):
    """Log-softmax over the last dim, always in fp32 (under bf16 autocast too). No parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().log_softmax(dim=-1)


class DinoSR(nn.Module):
    """Student–teacher model with online codebooks; ``cfg`` defaults to ``DinoSRConfig()`` (spec §3–§4).

    The state dict has the official keys, shapes and order (spec §9.1), so official checkpoints load strictly.
    """

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = DinoSRConfig() if cfg is None else cfg
        self.cfg = cfg
        dim, num_codebooks = cfg.encoder_embed_dim, cfg.num_codebooks
        # Creation order matters: extractor, projection, student, heads, codebooks, teacher, mask embedding
        # reproduces the official random draws, so a seeded build equals the official initial weights.
        self.feature_extractor = build_feature_extractor(cfg)
        self.feature_projection = FeatureProjection(cfg.extractor_conv_layer_config[-1][0], dim)
        self.projection_dropout = nn.Dropout(cfg.encoder_projection_dropout)
        self.student = build_encoder(cfg)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, cfg.codebook_size), LogSoftmaxFp32()) for _ in range(num_codebooks)
        )
        self.codebooks = nn.ModuleList(
            Codebook(dim, cfg.codebook_size, decay=cfg.codebook_decay, distance=cfg.codebook_distance)
            for _ in range(num_codebooks)
        )
        # The teacher starts as a re-initialised copy of the student encoder (official, spec §4.1: its draws come
        # here, before the mask embedding's) or as an exact copy (teacher_init = "copy", fairseq DinoSR).
        self.teacher = copy.deepcopy(self.student).float()
        if cfg.teacher_init == "reinit":
            init_transformer_(self.teacher)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())  # U[0, 1)
        self.register_buffer("current_step", torch.zeros(1, dtype=torch.long))
        if cfg.teacher_feature_encoder == "ema":
            # An exact copy at step 0, then EMA-averaged with the teacher's decay; named "teacher_*" so the
            # optimizer's exclude_from_optimizer prefix ("teacher") leaves it out.
            self.teacher_feature_extractor = copy.deepcopy(self.feature_extractor).float().requires_grad_(False)
            self.teacher_feature_projection = copy.deepcopy(self.feature_projection).float().requires_grad_(False)
        # codebook_init = "data" happens once: None until the first training forward decides (initialise at step 0;
        # resumed past it, the codebooks come from the checkpoint), then True; False when it is due again at the
        # next training forward whatever the step (the step that did it was skipped: redo_codebook_init).
        self._codebooks_from_data: bool | None = None
        self._codebooks_loaded = False  # keep_loaded_codebooks: no data initialisation, ever
        # Inside codebook_updates_pooled: (summed statistics (K, V, 1 + D) or None, the first batch's targets)
        self._pooled_codebook_stats: list[object] | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Forward pieces, in data-flow order
    # ----------------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.student.layers)

    @property
    def num_codebooks(self) -> int:
        return len(self.codebooks)

    @property
    def head_layers(self) -> range:
        """The layers (1-based) whose outputs the prediction heads read: the top ``num_codebooks``."""
        return range(self.num_layers - self.num_codebooks + 1, self.num_layers + 1)

    def features(self, waveforms: torch.Tensor, warp: torch.Tensor | None = None) -> torch.Tensor:
        """Projected conv features (B, T, D) of waveforms (B, S); no dropout, no masking. ``warp``: per-utterance
        frequency-warp factors (B,) of a log-mel front end (``student_frequency_warp``), None for none."""
        waveforms = front_end_input(
            waveforms, self.cfg, dtype=self.feature_projection.projection.weight.dtype, check_finite=not self.training
        )
        grad_mult = self.cfg.feature_grad_mult
        if grad_mult == 0.0:
            with torch.no_grad():
                x = self.feature_extractor(waveforms, warp)
        else:
            x = scale_grad(self.feature_extractor(waveforms, warp), grad_mult)
        return self.feature_projection(x)

    def _student_outputs(self, x: torch.Tensor, masks: FrameMasks) -> list[torch.Tensor]:
        """The inputs (B, T, D) of the K heads: DinoSR feeds the student's final output to every head."""
        return [self.student(x, masks=masks)] * self.num_codebooks

    def _head_inputs(self, layer_outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """``_student_outputs`` in eval mode, out of the student's ``layer_outputs`` (full, before-residual) of one
        pass: the final output, for every head."""
        return [self.student.final_norm(layer_outputs[-1][0])] * self.num_codebooks

    def _student_warp(self, waveforms: torch.Tensor) -> torch.Tensor | None:
        """Per-utterance frequency-warp factors (B,) drawn from [1 − w, 1 + w] in training, else None."""
        width = self.cfg.student_frequency_warp
        if not self.training or width == 0.0:
            return None
        return 1.0 + width * (2.0 * torch.rand(waveforms.shape[0], device=waveforms.device) - 1.0)

    @torch.no_grad()
    def _teacher_features(
        self, waveforms: torch.Tensor, feats: torch.Tensor, *, student_warped: bool = False
    ) -> torch.Tensor:
        """The teacher's input (B, T, D): the student's ``feats`` (official, shared front end; recomputed from the
        clean ``waveforms`` when the student's were warped), or with ``teacher_feature_encoder = "ema"`` the output
        of the teacher's own EMA front end on ``waveforms``."""
        if self.cfg.teacher_feature_encoder == "shared":
            return self.features(waveforms) if student_warped else feats
        return self.teacher_feature_projection(self.teacher_feature_extractor(waveforms))

    @torch.no_grad()
    def _teacher_targets(self, feats: torch.Tensor, masks: FrameMasks) -> list[torch.Tensor]:
        """The teacher's top-K before-residual layer outputs for its input ``feats`` (B, T, D), each
        instance-normalised over time per channel in fp32: K × (B, T, D). Padded frames count in the statistics
        (official) or, with ``target_norm_frames = "valid"``, are left out of them and set to 0."""
        # Detached: the teacher takes no gradient (and no-grad modules fed grad-requiring tensors confuse hooks).
        outputs = self.teacher.get_intermediate_outputs(feats.detach(), masks=masks, before_residual=True)
        valid = masks.valid if self.cfg.target_norm_frames == "valid" else None
        with torch.autocast(feats.device.type, enabled=False):
            return [_instance_norm(y.float(), valid) for y in outputs[-self.num_codebooks:]]

    def forward(
        self,
        waveforms: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        mask_count: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked-prediction loss of waveforms (B, S).

        ``mask`` (B, T) bool: frames to mask and score. Without it nothing is masked and every (non-padded) frame
        is scored. Padding: ``attention_mask`` (B, 1, T, T) bool, True = key may be attended (official form), or
        ``padding_mask`` (B, T) bool, True = padded. ``mask_count``: the number of True in ``mask`` when the caller
        knows it without reading the device (the data loader counts it); the masked frames are then gathered with
        no host synchronisation. A wrong count gives wrong results: leave it None when unsure.

        Returns the per-scored-frame loss (N,), the mean over codebooks of the cross-entropy, in row-major
        (batch, frame) order, and detached metrics: ``target_ppl``, ``pred_ppl`` (means over codebooks),
        ``loss_per_codebook``, ``target_ppl_per_codebook``, ``pred_ppl_per_codebook``, ``active_codewords`` (all
        (K,), global over ranks), ``metric_sums`` (the sums they come from: ``metrics_from_sums``) and
        ``num_frames`` (N on this rank, int64).
        In training mode the codebooks are updated from this batch (after their labels were taken), or, inside
        ``codebook_updates_pooled``, its statistics are pooled for one update at the end.
        """
        # Checked and cast once here too: the teacher's own front end (teacher_feature_encoder = "ema") reads them.
        waveforms = front_end_input(waveforms, self.cfg, dtype=self.feature_projection.projection.weight.dtype)
        warp = self._student_warp(waveforms)
        feats = self.features(waveforms, warp)
        masks = frame_masks(feats, attention_mask=attention_mask, padding_mask=padding_mask)
        x = self.projection_dropout(feats)
        if mask is None:
            scored = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            if masks.valid is not None:
                scored = masks.valid
        else:
            if mask.shape != feats.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor of shape (B, T) = {tuple(feats.shape[:2])}; got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
            scored = mask
        predictions = self._student_outputs(x, masks)
        targets = self._teacher_targets(
            self._teacher_features(waveforms, feats, student_warped=warp is not None), masks
        )

        # The scored frames' row-major positions (N,), found once: boolean indexing would look for them again in
        # each of the K targets and K predictions, each time reading their count back from the device (a
        # synchronisation on GPU). With the count known on the host there is no read at all.
        scored_index = _positions(scored, count=mask_count if mask is not None else None)
        target_frames = [_rows_at(t, scored_index) for t in targets]  # K × (N, D)
        if self.training and self.cfg.codebook_init == "data" and self._codebooks_from_data is not True:
            if self._codebooks_from_data is False or int(self.current_step) == 0:  # the step is read once
                # (rank 0's batch without a scored frame, possible with masking.min_masks = 0, has no frame to
                # give: the initialisation stays due for the next training forward)
                self._codebooks_from_data = self._initialise_codebooks_from_data(target_frames)
            else:
                self._codebooks_from_data = True
        log_probs, labels, cross_entropies = [], [], []
        # DinoSR's heads share one input: gather its scored frames once. Compared with `is`, not by id(): under
        # torch.compile an id() of a tensor becomes a guard on that very object, failed by the next step's tensors,
        # and the rest of the forward was recompiled at every step until Dynamo's recompile limit.
        gathered_from, rows = None, None
        for head, codebook, prediction, z in zip(self.heads, self.codebooks, predictions, target_frames, strict=True):
            if prediction is not gathered_from:
                gathered_from, rows = prediction, _rows_at(prediction, scored_index)  # (N, D)
            log_prob = head(rows)  # (N, V) fp32
            label = codebook.assign(z)  # (N,)
            cross_entropies.append(-log_prob.gather(-1, label[:, None]).squeeze(-1))  # against a one-hot target
            log_probs.append(log_prob)
            labels.append(label)
        frame_losses = torch.stack(cross_entropies)  # (K, N)
        losses = frame_losses.sum(0) / self.num_codebooks  # (N,)
        if self.training:
            if self.cfg.codebook_update_frames == "all":
                valid = masks.valid if masks.valid is not None else torch.ones_like(scored)
                valid_index = _positions(valid)
                every_frame = [_rows_at(t, valid_index) for t in targets]
                self._update_codebooks(every_frame, [c.assign(z) for c, z in zip(self.codebooks, every_frame,
                                                                                 strict=True)])
            else:
                self._update_codebooks(target_frames, labels)
        return losses, self._metrics(log_probs, labels, frame_losses)

    # ----------------------------------------------------------------------------------------------------------
    # Codebook update and metrics (no gradients)
    # ----------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def codebook_updates_pooled(self) -> Iterator[None]:
        """Within: each training forward labels its frames with the codebooks as they are and pools its statistics
        instead of updating them; on leaving (without an error), one EMA step from the pool, summed over ranks.
        The micro-batches of an optimizer step (gradient accumulation) then move the codebooks as that many ranks
        do (spec §3.10): once per step, every batch labelled by the step's codebooks. Dead codewords restart at
        frames of the first batch (as at rank 0's)."""
        if self._pooled_codebook_stats is not None:
            raise RuntimeError("codebook_updates_pooled is already active")
        self._pooled_codebook_stats = [None, None]
        try:
            yield
            stats, targets = self._pooled_codebook_stats
            if stats is not None:
                self._apply_codebook_stats(stats, targets)
        finally:
            self._pooled_codebook_stats = None

    @torch.compiler.disable
    def _pool_codebook_stats(self, stats: torch.Tensor, targets: list[torch.Tensor]) -> None:
        pool = self._pooled_codebook_stats
        if pool[0] is None:
            pool[0], pool[1] = stats, targets if self.cfg.codebook_reseed_dead else None
        else:
            pool[0] = pool[0] + stats

    @torch.no_grad()
    def _update_codebooks(self, targets: list[torch.Tensor], labels: list[torch.Tensor]) -> None:
        """EMA step of every codebook from this batch's assignments, summed over ranks in one collective (pooled
        instead inside ``codebook_updates_pooled``)."""
        if self.cfg.codebook_decay >= 1.0:
            return
        size = self.cfg.codebook_size
        stats = torch.stack([
            codebook.statistics(z, _one_hot(lab, size))
            for codebook, z, lab in zip(self.codebooks, targets, labels, strict=True)
        ])  # (K, V, 1 + D)
        if self._pooled_codebook_stats is not None:
            self._pool_codebook_stats(stats, targets)
            return
        self._apply_codebook_stats(stats, targets)

    @torch.no_grad()
    def _apply_codebook_stats(self, stats: torch.Tensor, targets: list[torch.Tensor] | None) -> None:
        """The EMA step from statistics (K, V, 1 + D) of this rank, summed over ranks here; ``targets`` (K × (N, D),
        this rank's frames; needed with ``codebook_reseed_dead`` only) are where dead codewords restart."""
        distributed.all_reduce_sum(stats)
        reseed = self.cfg.codebook_reseed_dead
        for codebook, codebook_stats in zip(self.codebooks, stats, strict=True):
            codebook.update(codebook_stats, decay_unused=reseed)
        if reseed:
            floors = [self.cfg.codebook_dead_threshold * codebook.counts.mean() for codebook in self.codebooks]
            dead = [codebook.counts < floor for codebook, floor in zip(self.codebooks, floors, strict=True)]
            # A restarted codeword starts at twice the floor (at least 1): at count 1 it had to win about half an
            # average cluster in its first step, or be restarted again, every step (at 400 frames per codeword per
            # step the floor is 20). It is then judged on what it wins over the next steps.
            self._reseed_codebooks(targets, dead, counts=[(2 * floor).clamp(min=1.0) for floor in floors])

    @torch.no_grad()
    def _reseed_codebooks(self, targets: list[torch.Tensor], unused: list[torch.Tensor], *,
                          counts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Restart codewords nobody used at random frames of rank 0's batch (broadcast as a sum with zeros from
        the other ranks, so the codebooks stay identical everywhere), with ``counts`` (one per codebook; 1 if None).
        Nothing is restarted where rank 0's batch has no frame (its candidates would be zeros). Returns the number
        of rank 0's frames, a () tensor on the device."""
        size = self.cfg.codebook_size
        candidates = torch.stack([_random_rows(z, size) for z in targets])  # (K, V, D)
        # rank 0's frame count travels with its candidates: one collective
        shared = torch.cat([candidates.flatten(), candidates.new_full((1,), float(len(targets[0])))])
        if distributed.rank() != 0:
            shared.zero_()
        distributed.all_reduce_sum(shared)
        candidates, available = shared[:-1].view_as(candidates), shared[-1]
        # a no-op where nothing is dead; asking first would cost a device sync
        for codebook, dead, cand, count in zip(self.codebooks, unused, candidates, counts or [None] * len(unused),
                                               strict=True):
            codebook.reseed(dead & (available > 0), cand, count=count)
        return available

    @property
    def codebook_init_due(self) -> bool:
        """Whether the next training forward initialises the codebooks from data whatever the step (the step that
        did it was skipped): a checkpoint saved in between records it, or the resumed run keeps random codebooks."""
        return self.cfg.codebook_init == "data" and self._codebooks_from_data is False

    def keep_loaded_codebooks(self) -> None:
        """The codebooks were loaded with the weights (``run.init_ckpt``): ``codebook_init = "data"`` must not
        replace them at step 0, under heads trained on them, nor after a skipped first step."""
        self._codebooks_from_data = True
        self._codebooks_loaded = True

    def redo_codebook_init(self) -> None:
        """The first step, which initialised the codebooks from data, was skipped (non-finite) and its codebooks
        restored: the next training forward initialises them again, whatever the step count (a skip on the device
        counts the step). No effect for another ``codebook_init``, or for codebooks loaded with the weights."""
        if not self._codebooks_loaded:
            self._codebooks_from_data = False

    @torch.no_grad()
    def _initialise_codebooks_from_data(self, targets: list[torch.Tensor]) -> bool:
        """``codebook_init = "data"``: centroids := distinct random target frames of the first training batch (a
        random codebook on few frames makes a handful of codewords win everything; spec §3.10 init is kept
        otherwise). Returns whether it was done: not where rank 0's batch has no frame (read once, at this step)."""
        available = self._reseed_codebooks(targets, [torch.ones_like(c.counts, dtype=torch.bool)
                                                     for c in self.codebooks])
        return bool(available > 0)

    @torch.compiler.disable
    @torch.no_grad()
    def _metrics(
        self, log_probs: list[torch.Tensor], labels: list[torch.Tensor], frame_losses: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Codebook-usage and prediction perplexities (spec §4.5) and per-codebook losses: in training, global
        frame-weighted means over ranks (one collective); in eval mode, this batch's alone, so that validation (the
        mean over batches) gives one checkpoint the same numbers on any number of ranks. ``metric_sums`` holds the
        sums they are computed from, which the micro-batches of a step add up (``metrics_from_sums``)."""
        size = self.cfg.codebook_size
        target_sums = torch.stack([_one_hot(lab, size).sum(0).float() for lab in labels])  # (K, V)
        pred_sums = torch.stack([lp.exp().sum(0) for lp in log_probs])  # (K, V)
        num_frames = frame_losses.shape[1]
        packed = torch.cat([
            target_sums.flatten(),
            pred_sums.flatten(),
            frame_losses.detach().float().sum(1),
            frame_losses.new_full((1,), num_frames, dtype=torch.float32),
        ])
        if self.training:
            distributed.all_reduce_sum(packed)
        return {**self.metrics_from_sums(packed), "metric_sums": packed,
                "num_frames": torch.tensor(num_frames, dtype=torch.long)}

    def metrics_from_sums(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logged codebook metrics of ``metric_sums`` (K·V codeword counts, K·V prediction sums, K loss sums,
        the frame count), those of one batch or the sum over a step's micro-batches: each perplexity is that of
        the frame-weighted mean distribution, and a codeword is active where any frame took it."""
        size, k = self.cfg.codebook_size, self.num_codebooks
        target_sums, pred_sums = packed[: k * size].view(k, size), packed[k * size : 2 * k * size].view(k, size)
        loss_sums, total = packed[2 * k * size : 2 * k * size + k], packed[-1].clamp(min=1)
        target_ppl, pred_ppl = perplexity(target_sums / total), perplexity(pred_sums / total)
        return {
            "target_ppl": target_ppl.mean(),
            "pred_ppl": pred_ppl.mean(),
            "loss_per_codebook": loss_sums / total,
            "target_ppl_per_codebook": target_ppl,
            "pred_ppl_per_codebook": pred_ppl,
            "active_codewords": (target_sums > 0).sum(-1),
        }

    # ----------------------------------------------------------------------------------------------------------
    # Inference API
    # ----------------------------------------------------------------------------------------------------------

    def get_intermediate_outputs(
        self,
        waveforms: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        before_residual: bool = True,
        num_layers: int | None = None,
    ) -> list[torch.Tensor]:
        """Student layer outputs for waveforms (B, S): a list of (B, T, D), layer l (1-based) at index l − 1.

        ``before_residual=True`` (default, the official features): each layer's FFN output before its residual add
        and final LayerNorm; False: each layer's full output. ``num_layers`` stops early. Call ``eval()`` first:
        in training mode dropout is active.
        """
        warn_if_padding_changes_features(self.cfg, attention_mask, padding_mask)
        feats = self.features(waveforms)
        return self.student.get_intermediate_outputs(
            feats,
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
        """Codebook predictions per layer for waveforms (B, S): a list of ``num_layers`` entries, None for layers
        without a head, then (B, T, V) fp32 probabilities, or with ``onehot=True`` the int64 one-hot of their
        arg-max. Never squeezed (the official output loses its batch dim for B = 1)."""
        warn_if_padding_changes_features(self.cfg, attention_mask, padding_mask)
        feats = self.features(waveforms)
        masks = frame_masks(feats, attention_mask=attention_mask, padding_mask=padding_mask)
        outputs: list[torch.Tensor | None] = [None] * (self.num_layers - self.num_codebooks)
        for head, prediction in zip(self.heads, self._student_outputs(feats, masks), strict=True):
            log_probs = head(prediction)
            if onehot:
                outputs.append(F.one_hot(log_probs.argmax(-1), log_probs.shape[-1]))
            else:
                outputs.append(log_probs.exp())
        return outputs

    def get_layers_and_codebooks(
        self,
        waveforms: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        before_residual: bool = True,
        num_layers: int | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """``get_intermediate_outputs`` and ``get_codebooks`` (probabilities) of waveforms (B, S) from one pass of
        the front end and the student instead of one each: the first ``num_layers`` layer outputs, a list of
        (B, T, D), and per layer None or its head's (B, T, V) fp32 probabilities. Eval mode only (a training pass
        drops layers at random, so the two would follow different paths)."""
        if self.training:
            raise RuntimeError("get_layers_and_codebooks runs in eval mode: call model.eval() first")
        self.student.check_num_layers(num_layers)
        warn_if_padding_changes_features(self.cfg, attention_mask, padding_mask)
        feats = self.features(waveforms)
        masks = frame_masks(feats, attention_mask=attention_mask, padding_mask=padding_mask)
        layer_outputs = self.student.layer_outputs(feats, masks=masks)
        layers = [ffn if before_residual else out for out, ffn in layer_outputs[:num_layers]]
        probabilities: list[torch.Tensor | None] = [None] * (self.num_layers - self.num_codebooks)
        probabilities += [head(x).exp() for head, x in zip(self.heads, self._head_inputs(layer_outputs), strict=True)]
        return layers, probabilities

    # ----------------------------------------------------------------------------------------------------------
    # Training state: teacher EMA, extractor freeze, train/eval
    # ----------------------------------------------------------------------------------------------------------

    def ema_decay(self, step: int) -> float:
        """Teacher EMA decay after optimizer step ``step`` (1-based); 1 means frozen."""
        cfg = self.cfg
        return dinosr_ema_decay(
            step,
            start_decay=cfg.ema_start_decay,
            final_decay=cfg.ema_final_decay,
            final_step=cfg.ema_final_step,
            freeze_step=cfg.freeze_step,
        )

    @property
    def feature_encoder_frozen(self) -> bool:
        """True once the conv extractor and projection stopped training (``freeze_step``)."""
        return not any(p.requires_grad for p in self._feature_encoder_parameters())

    def _feature_encoder_parameters(self) -> list[nn.Parameter]:
        return [*self.feature_extractor.parameters(), *self.feature_projection.parameters()]

    def freeze_feature_encoder(self) -> None:
        """Stop training the conv extractor and the feature projection (done by ``update_ema`` at
        ``freeze_step``; call it after loading a checkpoint whose ``current_step`` is past it)."""
        if not self.feature_encoder_frozen:
            logger.info("freezing the conv feature extractor and projection at step %d", int(self.current_step))
            for p in self._feature_encoder_parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def update_ema(self, step: int, *, skipped: torch.Tensor | None = None) -> float:
        """After optimizer step ``step`` (1-based): record it in ``current_step``, freeze the feature encoder once
        ``step >= freeze_step``, and move the teacher toward the student with the scheduled decay β
        (teacher ← β·teacher + (1 − β)·student) when 0 < β < 1; parameters under ``ema_exclude_layers`` are copied
        instead. Returns β.

        ``skipped``: a () bool tensor on the model's device, True when the step was skipped on the device (the
        trainer's ``run.host_sync = "log"``); the teacher then stays where it is, decided without a host read."""
        self.current_step.fill_(step)
        decay = self.ema_decay(step)
        if step >= self.cfg.freeze_step:
            self.freeze_feature_encoder()
        if 0.0 < decay < 1.0:
            averaged_t, averaged_s, copied_t, copied_s = [], [], [], []
            student = dict(self.student.named_parameters())
            for name, param in self.teacher.named_parameters():
                excluded = any(name.startswith(prefix) for prefix in self.cfg.ema_exclude_layers)
                (copied_t if excluded else averaged_t).append(param)
                (copied_s if excluded else averaged_s).append(student[name])
            if self.cfg.teacher_feature_encoder == "ema":
                averaged_t += [*self.teacher_feature_extractor.parameters(),
                               *self.teacher_feature_projection.parameters()]
                averaged_s += self._feature_encoder_parameters()
            if averaged_t:
                # Weight 1 − β taken in fp32, as the official update does (bit-identical teacher weights).
                weight = float(1 - torch.tensor(decay, dtype=torch.float32))
                students = [p.to(torch.float32) for p in averaged_s]
                if skipped is None:
                    torch._foreach_lerp_(averaged_t, students, weight)
                else:
                    weights = torch.where(skipped, 0.0, weight).to(torch.float32)  # lerp by 0 leaves the teacher
                    torch._foreach_lerp_(averaged_t, students, [weights] * len(averaged_t))
            for t, s in zip(copied_t, copied_s, strict=True):
                t.copy_(s)
            student_buffers = dict(self.student.named_buffers())
            for name, buffer in self.teacher.named_buffers():
                buffer.copy_(student_buffers[name])
        return decay

    def train(self, mode: bool = True) -> DinoSR:  # noqa: FBT001, FBT002 (nn.Module's signature)
        """As ``nn.Module.train``, but the teacher always stays in eval mode (no dropout, no layer drop)."""
        super().train(mode)
        self.teacher.eval()
        return self


def _instance_norm(y: torch.Tensor, valid: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """``y`` (B, T, D) normalised per utterance and channel to zero mean and unit biased variance over time; with
    ``valid`` (B, T) bool, over the True frames only, and the others set to 0."""
    if valid is None:
        return F.instance_norm(y.transpose(1, 2), eps=eps).transpose(1, 2)
    weights = valid[..., None].to(y.dtype)  # (B, T, 1)
    count = weights.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1, 1)
    mean = (y * weights).sum(1, keepdim=True) / count
    centred = (y - mean) * weights
    variance = centred.square().sum(1, keepdim=True) / count
    return centred * torch.rsqrt(variance + eps)


def perplexity(probs: torch.Tensor) -> torch.Tensor:
    """2^entropy (bits) of each mean distribution in (..., V) → (...): 2^(−Σ p log₂(p + 1e-8))."""
    return torch.exp2(-(probs * torch.log2(probs + 1e-8)).sum(-1))


def _one_hot(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Bool one-hot (N, V) of labels (N,) in [0, size). Built by comparison: ``F.one_hot`` checks the labels' range
    and ``bincount`` their maximum with a read-back to the host (a device synchronisation on GPU)."""
    return labels[:, None] == torch.arange(size, device=labels.device)


def _positions(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Row-major positions (N,) of the True entries of mask (B, T). With ``count``, their number known on the host,
    they are found without reading anything back from the device."""
    flat = mask.flatten()
    return (flat.nonzero() if count is None else torch.nonzero_static(flat, size=count)).squeeze(1)


def _rows_at(frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The frames (B, T, D) at row-major positions ``index`` (N,) → (N, D): ``frames[mask]`` for
    ``index = _positions(mask)``, with the same values, order and gradient."""
    return frames.flatten(0, 1)[index]


def _random_rows(z: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows of z (N, D) drawn at random, distinct while N allows (fp32; zeros if z is empty)."""
    if len(z) == 0:
        return z.new_zeros(count, z.shape[1], dtype=torch.float32)
    if len(z) >= count:
        index = torch.randperm(len(z), device=z.device)[:count]
    else:
        index = torch.randint(len(z), (count,), device=z.device)
    return z[index].float()
