"""Matmul FLOPs of a compiled XLA program, counting every loop iteration.

XLA's ``cost_analysis()`` counts a while loop's body once, whatever its trip count, so it
undercounts any program that scans (over layers, over attention chunks, over loss segments). This
walks the optimised HLO instead: a computation's FLOPs are its own ``dot`` and ``convolution``
instructions (2 per multiply-add) plus those of the computations it calls (fusions, calls, the
largest branch of a conditional), a while loop's body counted ``known_trip_count`` times. Only
matmul-like work is counted: it dominates every model here, and elementwise costs are backend noise.
"""

from __future__ import annotations

import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s+([a-z0-9]+\[[0-9,]*\])")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s+=\s+(.*?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(shape: str) -> tuple[int, ...]:
    m = _SHAPE.match(shape)
    if m is None:
        return ()
    return tuple(int(d) for d in m.group(1).split(",") if d)


def _attr(rest: str, name: str) -> str | None:
    m = re.search(name + r"=(\{[^}]*\}|%[\w.\-]+)", rest)
    return None if m is None else m.group(1)


def _braced_ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or ""))


def _parse(hlo: str) -> tuple[dict[str, list], str | None]:
    """{computation: [(op, out dims, operand dims, attributes text)]} and the entry's name."""
    computations: dict[str, list] = {}
    entry, current, shapes = None, None, {}
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            shapes = {name: _dims(shape) for name, shape in _PARAM.findall(header.group(2))}
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        instr = _INSTR.match(line)
        if instr is None:
            continue
        name, shape, op, rest = instr.groups()
        shapes[name] = _dims(shape)
        operands = rest.split(")", 1)[0]
        operand_dims = [shapes.get(o, ()) for o in _OPERAND.findall(operands)]
        computations[current].append((op, shapes[name], operand_dims, rest))
    return computations, entry


def _dot_flops(out_dims, operand_dims, rest) -> float:
    lhs = operand_dims[0] if operand_dims else ()
    contracting = _braced_ints(_attr(rest, "lhs_contracting_dims"))
    return 2.0 * math.prod(out_dims) * math.prod(lhs[d] for d in contracting if d < len(lhs))


def _conv_flops(out_dims, operand_dims) -> float:
    kernel = operand_dims[1] if len(operand_dims) > 1 else ()
    # out elements x (kernel elements / output features): each output sums over the kernel's
    # spatial and input-feature extent.
    return 2.0 * math.prod(out_dims) * (math.prod(kernel) / max(kernel[-1], 1) if kernel else 0)


def hlo_matmul_flops(hlo: str) -> float:
    """Matmul FLOPs of an HLO module's text (``compiled.as_text()``), loops fully counted."""
    computations, entry = _parse(hlo)
    memo: dict[str, float] = {}

    def total(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # recursion guard
        flops = 0.0
        for op, out_dims, operand_dims, rest in computations.get(name, []):
            if op == "dot":
                flops += _dot_flops(out_dims, operand_dims, rest)
            elif op == "convolution":
                flops += _conv_flops(out_dims, operand_dims)
            elif op == "while":
                trips = _TRIP.search(rest)
                body = _attr(rest, "body")
                flops += (int(trips.group(1)) if trips else 1) * total(body.lstrip("%"))
            elif op == "conditional":
                branches = _attr(rest, "branch_computations") or ""
                flops += max((total(b) for b in _OPERAND.findall(branches)), default=0.0)
            else:
                for key in ("calls", "to_apply"):
                    called = _attr(rest, key)
                    if called and op != "reduce" and not op.startswith(("all-", "reduce-", "scatter",
                                                                        "sort", "map")):
                        flops += sum(total(c) for c in _OPERAND.findall(called))
        memo[name] = flops
        return flops

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text.")
    return total(entry)


def compiled_flops(compiled) -> float:
    """Matmul FLOPs of a ``jax.stages.Compiled`` program (see the module docstring)."""
    return hlo_matmul_flops(compiled.as_text())
