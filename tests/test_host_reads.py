"""How often a training step reads device data back to the host: each such read is a synchronisation on GPU, where
the host must wait for the device to finish its queue. Checked on CPU by following which tensors derive from the
step's device-resident inputs (weights, buffers, optimizer state, the batch) through every dispatched op.

Self-contained (no ../shared).
"""

from __future__ import annotations

import collections
import dataclasses
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from spidr.config import DinoSRConfig, OptimizerConfig, SpidRConfig
from spidr.data.collate import Batch
from spidr.models import build_model, num_frames
from spidr.models.dinosr import _one_hot, _rows_at
from spidr.train.loop import train_step
from spidr.train.optim import build_optimizer, build_scheduler
from spidr.train.precision import Precision

# Ops whose output shape depends on tensor values: the host must read the device's answer to allocate it.
SHAPE_FROM_VALUES = {"nonzero", "bincount", "masked_select", "unique", "_unique2", "unique_dim", "unique_consecutive"}


class HostReads(TorchDispatchMode):
    """Counts host reads of device data, by op and by spidr source line: scalar reads (``item``, ``bool``,
    ``int``; ``_local_scalar_dense``), value-dependent shapes (boolean indexing included) and ``tolist``.

    A tensor is device data when it is one of ``device_tensors`` or an op made it from one; tensors made on the
    host (``torch.rand(1)``, ``torch.tensor(0.5)``) stay host data, so reading them costs nothing on GPU.

    Also counted, as ``host_constant``: an op where a tensor made from Python data (``torch.tensor(x)``,
    ``t.new_tensor(x)``: ``lift_fresh``), or one derived from it, meets device data. On a GPU such a constant is
    copied from pageable host memory, and that copy waits for every queued kernel: a synchronisation as costly as a
    read. (A Python number, or ``new_full`` / ``torch.full`` on the device, costs none.)
    """

    def __init__(self, device_tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.on_device = WeakTensorKeyDictionary()
        for tensor in device_tensors:
            self.on_device[tensor] = True
        self.from_python = WeakTensorKeyDictionary()
        self.reads: collections.Counter[tuple[str, str]] = collections.Counter()

    def _count(self, name: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/spidr/" in f.filename]
        self.reads[name, f"{frames[-1].filename.rsplit('/spidr/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        from_device = any(t in self.on_device for t in inputs)
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1])[0]
        )
        if (name == "_local_scalar_dense" and from_device) or name in SHAPE_FROM_VALUES or boolean_index:
            self._count(name + ("[bool]" if boolean_index else ""))
        from_python = name in ("lift_fresh", "lift_fresh_copy") or any(t in self.from_python for t in inputs)
        if from_python and from_device:
            self._count("host_constant")
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                if from_device:
                    self.on_device[tensor] = True
                elif from_python:
                    self.from_python[tensor] = True
        return out

    def __enter__(self):
        # tolist reads the data without dispatching an op: count it on device data.
        self._tolist = torch.Tensor.tolist
        probe = self

        def tolist(tensor):
            if tensor in probe.on_device:
                probe._count("tolist")
            return probe._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


CONV = ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2


def _model_and_batch(model_type: str, **overrides):
    cls = SpidRConfig if model_type == "spidr" else DinoSRConfig
    cfg = cls(extractor_conv_layer_config=CONV, encoder_embed_dim=32, encoder_num_layers=4, encoder_num_heads=2,
              encoder_ff_interm_features=64, num_codebooks=3, codebook_size=16, **overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    generator = torch.Generator().manual_seed(0)
    samples = 8000
    waves = F.layer_norm(torch.randn(2, samples, generator=generator), (samples,))
    mask = torch.rand(2, num_frames(samples, CONV), generator=generator) < 0.5
    batch = Batch(waveforms=waves, lengths=torch.full((2,), samples), padding_mask=None, mask=mask, ids=["a", "b"],
                  mask_count=int(mask.sum()))  # counted on the host, as the collate function does
    return model, batch


@pytest.mark.parametrize("model_type", ["spidr", "dinosr"])
@pytest.mark.parametrize("overrides", [{}, {"codebook_init": "data", "codebook_reseed_dead": True}],
                         ids=["official", "demo-codebooks"])
@pytest.mark.parametrize("skip_on_device", [False, True], ids=["guard-read-every-step", "guard-on-device"])
@pytest.mark.parametrize("count_known", [True, False], ids=["mask-count-from-loader", "mask-count-unknown"])
def test_a_training_step_reads_device_data_only_for_what_the_host_cannot_know(
    model_type, overrides, skip_on_device, count_known
):
    """None at all with the data loader's masked-frame count and the NaN/Inf verdict gating the update on the
    device (``run.host_sync = "log"``); otherwise one read to count the scored frames (it sets the loss's shape)
    and one for the guard and the metrics. None per codebook (K = 3 here), none in the backward, the codebook
    update, AdamW or the teacher EMA; and no constant made from Python data meets device data."""
    model, batch = _model_and_batch(model_type, **overrides)
    if not count_known:
        batch = dataclasses.replace(batch, mask_count=None)
    cfg = OptimizerConfig(max_steps=10, warmup_steps=2, hold_steps=4, decay_steps=4)
    optimizer = build_optimizer(model, cfg, device=torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg)
    precision = Precision("cpu", None)
    train_step(model, [batch], optimizer, scheduler, step=0, precision=precision, scaler=None, max_norm=10.0,
               skip_on_device=skip_on_device)

    state = [v for values in optimizer.state.values() for v in values.values() if isinstance(v, torch.Tensor)]
    probe = HostReads([*model.parameters(), *model.buffers(), *state, batch.waveforms, batch.mask, batch.lengths])
    with probe:
        out = train_step(model, [batch], optimizer, scheduler, step=1, precision=precision, scaler=None,
                         max_norm=10.0, skip_on_device=skip_on_device)
    by_op = collections.Counter()
    for (op, _), count in probe.reads.items():
        by_op[op] += count
    expected = collections.Counter(nonzero=0 if count_known else 1, tolist=0 if skip_on_device else 1)
    assert by_op == +expected, probe.reads
    assert not out.skipped


def test_the_probe_sees_what_boolean_indexing_and_item_cost():
    """The probe itself: boolean indexing, bincount and item on device data are counted (forward and backward);
    reads of host-made tensors are not."""
    weights = torch.randn(6, 3, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False, False])
    with HostReads([weights, mask]) as probe:
        weights[mask].sum().backward()
        torch.bincount(mask.long())
        float(weights.detach().sum())
        float(torch.rand(1))  # host data
        weights.detach().tolist()
        weights.detach() * (1 - torch.tensor(0.5))  # a constant from Python data, via an op, meets device data
        weights.detach() * 0.5 + weights.new_full((), 2.0)  # a Python number and a fill on the device: free
        float(1 - torch.tensor(0.5))  # Python data read on the host: free
    ops = collections.Counter()
    for (op, _), count in probe.reads.items():
        ops[op] += count
    assert ops["index[bool]"] == 1
    assert ops["index_put[bool]"] + ops["index_put_[bool]"] == 1  # the backward's, with the mask again
    assert ops["bincount"] == 1
    assert ops["_local_scalar_dense"] == 1
    assert ops["tolist"] == 1
    assert ops["host_constant"] == 1


def test_gathering_by_index_equals_boolean_indexing_values_order_and_gradient():
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(3, 7, 5, generator=generator, requires_grad=True)
    mask = torch.rand(3, 7, generator=generator) < 0.4
    weights = torch.randn(int(mask.sum()), 5, generator=generator)

    expected = frames[mask]
    (expected * weights).sum().backward()
    expected_grad, frames.grad = frames.grad.clone(), None
    gathered = _rows_at(frames, mask.flatten().nonzero().squeeze(1))
    (gathered * weights).sum().backward()
    assert torch.equal(gathered, expected)
    assert torch.equal(frames.grad, expected_grad)


def test_one_hot_by_comparison_equals_torch_one_hot():
    labels = torch.tensor([3, 0, 15, 3, 7])
    assert torch.equal(_one_hot(labels, 16), F.one_hot(labels, 16).bool())
    assert torch.equal(_one_hot(labels, 16).sum(0), torch.bincount(labels, minlength=16))


@pytest.mark.parametrize("model_type", ["spidr", "dinosr"])
def test_the_loaders_mask_count_changes_nothing_but_the_reads(model_type):
    model, batch = _model_and_batch(model_type)
    model.eval()
    with torch.no_grad():
        counted = model(batch.waveforms, mask=batch.mask, mask_count=batch.mask_count)
        found = model(batch.waveforms, mask=batch.mask)
    assert torch.equal(counted[0], found[0])
    for name, value in found[1].items():
        assert torch.equal(counted[1][name], value), name
