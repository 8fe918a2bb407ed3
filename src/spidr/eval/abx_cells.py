"""ABX cells: items grouped by (phone, context, speaker) and subsampled, then streamed as *units*, the sets of cells
that share their B candidates (one BY group within speaker; one BY group and speaker across)."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from spidr.eval.items import NEXT_COLUMN, PHONE_COLUMN, PREV_COLUMN, SPEAKER_COLUMN, Items

Context = Literal["within", "any"]
MIN_A_LEN = 2  # within-speaker cells need two A items: one of them is X, compared with the others


@dataclass(frozen=True)
class Labels:
    """Integer codes of each item's phone, context (0 for context "any") and speaker, with the phone and speaker
    names (``phone_names[code]``)."""

    phone: np.ndarray
    context: np.ndarray
    speaker: np.ndarray
    phone_names: np.ndarray
    speaker_names: np.ndarray

    @classmethod
    def from_items(cls, items: Items, *, context: Context) -> Labels:
        phone_names, phone = np.unique(np.asarray(items.column(PHONE_COLUMN)), return_inverse=True)
        speaker_names, speaker = np.unique(np.asarray(items.column(SPEAKER_COLUMN)), return_inverse=True)
        if context == "within":
            pairs = np.stack([np.asarray(items.column(PREV_COLUMN)), np.asarray(items.column(NEXT_COLUMN))], axis=1)
            _, context_code = np.unique(pairs, axis=0, return_inverse=True)
        else:
            context_code = np.zeros(len(items), dtype=np.int64)
        return cls(phone.ravel(), context_code.ravel(), speaker.ravel(), phone_names, speaker_names)


@dataclass(frozen=True)
class Groups:
    """Items grouped by (phone, context, speaker), each group subsampled once.

    ``members[g]`` are the kept item indices of group g (in item order), ``size[g]`` its size before subsampling.
    """

    phone: np.ndarray
    context: np.ndarray
    speaker: np.ndarray
    size: np.ndarray
    members: list[np.ndarray]

    @classmethod
    def build(cls, labels: Labels, *, max_size_group: int | None, seed: int) -> Groups:
        keys = np.stack([labels.phone, labels.context, labels.speaker], axis=1)
        unique, group_of_item = np.unique(keys, axis=0, return_inverse=True)
        group_of_item = group_of_item.ravel()
        order = np.argsort(group_of_item, kind="stable")
        sizes = np.bincount(group_of_item, minlength=len(unique))
        members = np.split(order, np.cumsum(sizes)[:-1])
        if max_size_group is not None:
            members = [m if m.size <= max_size_group else m[np.sort(_permutation(m.size, seed)[:max_size_group])]
                       for m in members]
        return cls(unique[:, 0], unique[:, 1], unique[:, 2], sizes, members)


@functools.cache
def _permutation(size: int, seed: int) -> np.ndarray:
    """The seeded permutation used for every group of ``size`` elements (same size, same choice, as in fastabx)."""
    return np.random.default_rng(seed).permutation(size)


# ----------------------------------------------------------------------------------------------------------------
# Units: one BY group (within) or one (BY group, speaker) (across), holding every cell whose A lives there
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """Cells sharing their B candidates, scored from one (rows × cols) matrix of item distances.

    Columns are the items of ``col_groups`` (the A and B groups), rows the X items of ``row_groups``. Row group r
    holds the X items of group ``row_groups[r]`` and is paired with the A column group ``row_a[r]``. In a symmetric
    (within speaker) unit the row groups are A groups themselves and each row item is excluded as its own A.
    """

    col_groups: np.ndarray
    row_groups: np.ndarray
    row_a: np.ndarray
    symmetric: bool
    cols: np.ndarray = field(init=False)
    col_group_of: np.ndarray = field(init=False)
    col_start: np.ndarray = field(init=False)
    rows: np.ndarray = field(init=False)
    row_group_of: np.ndarray = field(init=False)
    pending: int = 0
    counts: torch.Tensor | None = None

    def lay_out(self, groups: Groups) -> None:
        col_members = [groups.members[g] for g in self.col_groups]
        self.cols = np.concatenate(col_members)
        col_sizes = np.array([m.size for m in col_members])
        self.col_group_of = np.repeat(np.arange(len(col_members)), col_sizes)
        self.col_start = np.concatenate([[0], np.cumsum(col_sizes)[:-1]])
        row_members = [groups.members[g] for g in self.row_groups]
        self.rows = np.concatenate(row_members)
        self.row_group_of = np.repeat(np.arange(len(row_members)), [m.size for m in row_members])


def within_units(groups: Groups) -> Iterator[Unit]:
    by_key: dict[tuple[int, int], list[int]] = defaultdict(list)
    for g, key in enumerate(zip(groups.context.tolist(), groups.speaker.tolist(), strict=True)):
        by_key[key].append(g)
    for members in by_key.values():
        col_groups = np.asarray(members)
        a_local = np.flatnonzero(groups.size[col_groups] >= MIN_A_LEN)
        if col_groups.size < 2 or a_local.size == 0:
            continue  # no B phone, or no A group with two items
        yield Unit(col_groups=col_groups, row_groups=col_groups[a_local], row_a=a_local, symmetric=True)


def across_units(groups: Groups, *, max_x_across: int | None, seed: int) -> Iterator[Unit]:
    same_phone: dict[tuple[int, int], list[int]] = defaultdict(list)  # (phone, context) → groups, by speaker
    by_key: dict[tuple[int, int], list[int]] = defaultdict(list)  # (context, speaker) → groups
    for g, (phone, context, speaker) in enumerate(
        zip(groups.phone.tolist(), groups.context.tolist(), groups.speaker.tolist(), strict=True)
    ):
        same_phone[phone, context].append(g)
        by_key[context, speaker].append(g)
    for members in by_key.values():
        if len(members) < 2:
            continue  # no B phone
        row_groups, row_a = [], []
        for a_local, a in enumerate(members):
            candidates = [g for g in same_phone[int(groups.phone[a]), int(groups.context[a])] if g != a]
            if max_x_across is not None and len(candidates) > max_x_across:
                chosen = np.sort(_permutation(len(candidates), seed)[:max_x_across])
                candidates = [candidates[c] for c in chosen]
            row_groups += candidates
            row_a += [a_local] * len(candidates)
        if row_groups:
            yield Unit(np.asarray(members), np.asarray(row_groups), np.asarray(row_a), symmetric=False)


