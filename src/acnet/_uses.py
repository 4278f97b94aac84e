"""What the pairing proof finds for each conv (a ``ConvUse``, collected in a ``Pairing``) and how
the findings of several modes combine: the types the graph proof and the probe share."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PROBED", "ConvUse", "Pairing", "agree"]

PROBED = "the given inputs"  # ConvUse.how of a pairing proven by a probe run on example_inputs


@dataclass
class ConvUse:
    """How one conv module is used: the BN it alone feeds (if any), or why to leave it alone."""

    bn: str | None = None
    skip: str | None = None
    how: str = "graph"  # "graph", "graph of SUBMODULE" or PROBED


@dataclass
class Pairing:
    """The result of ``find_pairs``: one ``ConvUse`` per conv, and notes for the report."""

    uses: dict[str, ConvUse] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def agree(name: str, per_mode: list[tuple[str, ConvUse]]) -> ConvUse:
    """One ConvUse from those of every mode: a pair only if every mode shows the same one."""
    for label, use in per_mode:
        if use.skip:
            return ConvUse(skip=f"{use.skip} (in {label})" if len(per_mode) > 1 else use.skip,
                           how=use.how)
    bns = {use.bn for _, use in per_mode}
    if len(bns) > 1:
        seen = ", ".join(f"{use.bn or 'no BatchNorm'} in {label}" for label, use in per_mode)
        return ConvUse(skip=f"its output goes to different layers by mode ({seen})",
                       how=per_mode[0][1].how)
    hows = list(dict.fromkeys(use.how for _, use in per_mode))
    return ConvUse(bn=bns.pop(), how=" and ".join(hows))
