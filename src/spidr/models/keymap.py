"""State-dict key renaming between our layout and another framework's, in both directions, from one table.

A table lists (their key, our key) templates, in which ``{i}`` stands for a layer index, ``{p}`` for ``weight`` or
``bias`` and ``{x}`` for one of ``q``, ``k``, ``v``. Our fused attention projection ``attention.qkv`` (rows q, k, v) is
split into the temporary keys ``attention.{q,k,v}`` before renaming to the other layout, and fused back after
renaming from it, so the tables only ever pair separate q, k, v projections.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

_PLACEHOLDERS = {"i": r"\d+", "p": r"weight|bias", "x": r"[qkv]"}


def _pattern(template: str) -> re.Pattern[str]:
    regex = re.escape(template)
    for name, alternatives in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alternatives})")
    return re.compile(regex)


class KeyMap:
    """Renames keys between another layout (``theirs``) and ours; a key that no row covers is an error that names
    ``where`` it came from."""

    def __init__(self, pairs: Sequence[tuple[str, str]], *, theirs: str) -> None:
        self.theirs = theirs
        self._to_ours = [(_pattern(their), our) for their, our in pairs]
        self._to_theirs = [(_pattern(our), their) for their, our in pairs]

    @staticmethod
    def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, template in rules:
            match = pattern.fullmatch(key)
            if match is not None:
                return template.format(**match.groupdict())
        return None

    def to_ours(self, key: str) -> str:
        renamed = self._rename(key, self._to_ours)
        if renamed is None:
            raise ValueError(f"{self.theirs} key {key!r} has no counterpart in a spidr model")
        return renamed

    def to_theirs(self, key: str) -> str:
        renamed = self._rename(key, self._to_theirs)
        if renamed is None:
            raise ValueError(f"spidr key {key!r} has no counterpart in the {self.theirs} layout")
        return renamed


def split_qkv(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every fused ``….attention.qkv.{weight,bias}`` by its three row blocks ``….attention.{q,k,v}.*``
    (contiguous copies, so the result can be written to safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.+\.attention)\.qkv\.(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        base, kind = match.groups()
        for part, block in zip("qkv", value.chunk(3, dim=0), strict=True):
            out[f"{base}.{part}.{kind}"] = block.clone().contiguous()
    return out


def fuse_qkv(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate the temporary ``….attention.{q,k,v}.{weight,bias}`` entries into ``….attention.qkv.*`` (q, k,
    v); the inverse of ``split_qkv``."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}  # "<layer>.attention.qkv.<kind>" → {"q": ..., "k": ..., "v": ...}
    for key, value in state.items():
        match = re.fullmatch(r"(.+\.attention)\.([qkv])\.(weight|bias)", key)
        if match is None:
            out[key] = value
        else:
            base, part, kind = match.groups()
            parts.setdefault(f"{base}.qkv.{kind}", {})[part] = value
    for key, found in parts.items():
        if set(found) != {"q", "k", "v"}:
            raise ValueError(f"checkpoint lacks the {'/'.join(sorted(set('qkv') - set(found)))} projection for {key}")
        out[key] = torch.cat([found["q"], found["k"], found["v"]], dim=0)
    return out
