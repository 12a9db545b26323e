"""Matmul FLOPs of a compiled XLA program, counting every loop iteration.

XLA's ``cost_analysis()`` counts a while loop's body once, whatever its trip count, so it
undercounts any program that scans (over layers, over attention chunks, over loss segments). This
walks the optimised HLO instead: a computation's FLOPs are its own ``dot`` and ``convolution``
instructions (2 per multiply-add) plus those of the computations it calls (fusions, calls, the
largest branch of a conditional), a while loop's body counted ``known_trip_count`` times. Only
matmul-like work is counted: it dominates every model here, and elementwise costs are backend noise.

A ``conditional`` counts its largest branch: an upper bound. Chunked attention skips the tiles a
causal mask hides with ``lax.cond``, so its compiled count is every tile's; ``categorised_flops``
reports how much of each category sits under a conditional, so a caller can say what skipping them
would save.

:func:`categorised_flops` splits the count by where each matmul comes from. The optimised HLO keeps
the Python call stack of every instruction (``stack_frame_id`` into the module's ``StackFrames``
table, which holds file and function names); a dot without one (e.g. inside a fusion) takes its
caller's. The stack decides the category by :data:`CATEGORY_RULES`, so no named scopes are needed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

_HEADER = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s+([a-z0-9]+\[[0-9,]*\])")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s+=\s+(.*?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_FIELDS = re.compile(r"(\w+)=(\d+)")


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


CATEGORIES = ("projections", "attention", "mlp", "selection", "head", "other")
"""The categories of :func:`categorised_flops`, in report order. ``projections``: q, k, v, o with
their LoRA adapters; ``attention``: the core (q·kᵀ and p·v); ``mlp``: the feed-forward;
``selection``: choosing the kept blocks (oracle scoring, predictors, their q/k projections);
``head``: the LM head and loss; ``other``: any matmul no rule claims."""


@dataclasses.dataclass(frozen=True)
class CategoryRule:
    """A matmul belongs to ``category`` when a frame of its Python stack is in a file whose path
    ends with one of ``files`` or in a function named in ``functions`` (``"f*"``: any name starting
    with ``f``). ``anywhere``: any frame of the stack decides; otherwise the innermost frame that
    some rule matches does (a LoRA adapter's matmul is a projection's, an MLP's Linear the MLP's).
    ``batched``: only dots with (True) or without (False) batch dimensions match."""

    category: str
    files: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    anywhere: bool = False
    batched: bool | None = None

    def matches(self, file: str, function: str, batched: bool) -> bool:
        if self.batched is not None and batched != self.batched:
            return False
        return file.endswith(self.files) or any(
            function.startswith(f[:-1]) if f.endswith("*") else function == f
            for f in self.functions)


CATEGORY_RULES: tuple[CategoryRule, ...] = (
    # Selection first, from anywhere in the stack: the oracle's q/k projections are selection cost.
    CategoryRule("selection", files=("tokensparse/lemo/selection.py", "tokensparse/lemo/scoring.py",
                                     "tokensparse/lemo/rules.py", "tokensparse/lemo/learned_selector.py",
                                     "tokensparse/lemo/predictor.py", "kernels_pallas/block_scores.py"),
                 functions=("lemo_router*", "layer_selection", "oracle_block_scores"), anywhere=True),
    CategoryRule("head", functions=("Llama.head", "head_function*", "cross_entropy_sum",
                                    "segmented_cross_entropy_sum*")),
    CategoryRule("attention", files=("tokensparse/chunked_attention.py", "tokensparse/attention.py",
                                     "kernels_pallas/segment_attention.py",
                                     "tokensparse/lemo/two_d.py"),
                 functions=("Attention.core",)),
    CategoryRule("mlp", files=("tokensparse/lemo/mlp.py",),
                 functions=("MLP.__call__", "swiglu", "DecoderBlock.feed_forward")),
    CategoryRule("projections", functions=("Attention.project_qkv", "Attention.project_out",
                                           "_normed_qkv")),
    # A custom_vjp's backward may keep only its caller's frame: inside a block's attention half,
    # the batched (per-head) matmuls are the core's, the others the projections'.
    CategoryRule("attention", functions=("DecoderBlock.attend_and_norm",), batched=True),
    CategoryRule("projections", functions=("DecoderBlock.attend_and_norm",), batched=False),
)
"""How :func:`categorised_flops` names a matmul's category from its stack (tokensparse's own
functions and files); a stack no rule matches is ``other``."""


def _table(lines: list[str], name: str) -> dict[int, str]:
    """A header table of the HLO text (``FileNames``, ``StackFrames``, ...): id → entry text."""
    out, inside = {}, False
    for line in lines:
        if line.strip() == name:
            inside = True
            continue
        if inside:
            if not line.strip():
                break
            key, _, value = line.strip().partition(" ")
            out[int(key)] = value.strip().strip('"')
    return out


def _stacks(hlo: str) -> dict[int, tuple[tuple[str, str], ...]]:
    """stack_frame_id → its stack as ((file, function), ...), innermost first. The text prints a
    frame's parent as the parent's id + 1 (1: none)."""
    lines = hlo.split("\n%", 1)[0].splitlines()  # the tables precede the first computation
    files, functions = _table(lines, "FileNames"), _table(lines, "FunctionNames")
    locations = {i: dict((k, int(v)) for k, v in _FIELDS.findall(text))
                 for i, text in _table(lines, "FileLocations").items()}
    frames = {i: dict((k, int(v)) for k, v in _FIELDS.findall(text))
              for i, text in _table(lines, "StackFrames").items()}
    memo: dict[int, tuple] = {}

    def stack(frame: int) -> tuple:
        chain, seen = [], set()
        while frame in frames and frame not in seen and frame not in memo:
            seen.add(frame)
            loc = locations.get(frames[frame].get("file_location_id"), {})
            chain.append((frame, (files.get(loc.get("file_name_id"), ""),
                                  functions.get(loc.get("function_name_id"), ""))))
            frame = frames[frame].get("parent_frame_id", 1) - 1
        tail = memo.get(frame, ())
        for i in range(len(chain) - 1, -1, -1):
            tail = (chain[i][1], *tail)
            memo[chain[i][0]] = tail
        return tail

    return {i: stack(i) for i in frames}


def _categorise(stack: tuple[tuple[str, str], ...], batched: bool,
                rules: tuple[CategoryRule, ...]) -> str:
    for rule in rules:
        if rule.anywhere and any(rule.matches(*frame, batched) for frame in stack):
            return rule.category
    for frame in stack:
        for rule in rules:
            if not rule.anywhere and rule.matches(*frame, batched):
                return rule.category
    return "other"


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


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
    """Matmul FLOPs of a program by :data:`CATEGORIES` (every loop iteration counted).
    ``conditional``: the part of each category inside a ``conditional``'s largest branch, i.e.
    work the program may skip at run time (chunked attention's causally masked tiles)."""

    by_category: dict[str, float]
    conditional: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.by_category.values())


def _walk(hlo: str, categorise: Callable[[int | None, bool], str]) -> dict[tuple[str, bool], float]:
    """{(category, inside a conditional): FLOPs} of the entry computation, loops fully counted."""
    computations, entry = _parse(hlo)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text.")
    memo: dict[tuple, dict] = {}

    def add(into: dict, part: dict, times: float = 1.0, conditional: bool = False) -> None:
        for (category, cond), flops in part.items():
            key = (category, cond or conditional)
            into[key] = into.get(key, 0.0) + times * flops

    def total(name: str, frame: int | None) -> dict:
        key = (name, frame)
        if key in memo:
            return memo[key]
        memo[key] = {}  # recursion guard
        flops: dict = {}
        for op, out_dims, operand_dims, rest in computations.get(name, []):
            own = _FRAME.search(rest)
            here = int(own.group(1)) if own else frame
            if op in ("dot", "convolution"):
                count = (_dot_flops(out_dims, operand_dims, rest) if op == "dot"
                         else _conv_flops(out_dims, operand_dims))
                batched = op == "dot" and _attr(rest, "lhs_batch_dims") is not None
                add(flops, {(categorise(here, batched), False): count})
            elif op == "while":
                trips = _TRIP.search(rest)
                add(flops, total(_attr(rest, "body").lstrip("%"), here),
                    int(trips.group(1)) if trips else 1)
            elif op == "conditional":
                branches = [total(b, here) for b in _OPERAND.findall(
                    _attr(rest, "branch_computations") or "")]
                if branches:
                    add(flops, max(branches, key=lambda b: sum(b.values())), conditional=True)
            else:
                for attr in ("calls", "to_apply"):
                    called = _attr(rest, attr)
                    if called and op != "reduce" and not op.startswith(("all-", "reduce-", "scatter",
                                                                        "sort", "map")):
                        for c in _OPERAND.findall(called):
                            add(flops, total(c, here))
        memo[key] = flops
        return flops

    return total(entry, None)


def hlo_flops_breakdown(hlo: str, rules: tuple[CategoryRule, ...] = CATEGORY_RULES) -> FlopsBreakdown:
    """:class:`FlopsBreakdown` of an HLO module's text (``compiled.as_text()``), categorised by
    ``rules``. A matmul with no stack at all (XLA drops it in some fusions) is ``attention`` when
    batched (over heads: a Llama step's only batched matmuls besides selection scoring, which keeps
    its stack), else ``other``."""
    stacks = _stacks(hlo)
    names: dict[tuple[int, bool], str] = {}

    def categorise(frame: int | None, batched: bool) -> str:
        if frame is None:
            return "attention" if batched else "other"
        if (frame, batched) not in names:
            names[frame, batched] = _categorise(stacks.get(frame, ()), batched, rules)
        return names[frame, batched]

    counts = _walk(hlo, categorise)
    by_category = {c: 0.0 for c in CATEGORIES}
    conditional = {c: 0.0 for c in CATEGORIES}
    for (category, cond), flops in counts.items():
        by_category[category] = by_category.get(category, 0.0) + flops
        if cond:
            conditional[category] = conditional.get(category, 0.0) + flops
    return FlopsBreakdown(by_category, conditional)


def hlo_matmul_flops(hlo: str) -> float:
    """Matmul FLOPs of an HLO module's text (``compiled.as_text()``), loops fully counted."""
    return sum(_walk(hlo, lambda frame, batched: "all").values())


def compiled_flops(compiled) -> float:
    """Matmul FLOPs of a ``jax.stages.Compiled`` program (see the module docstring)."""
    return hlo_matmul_flops(compiled.as_text())


def categorised_flops(compiled, rules: tuple[CategoryRule, ...] = CATEGORY_RULES) -> FlopsBreakdown:
    """:func:`compiled_flops` split by :data:`CATEGORIES` (see :func:`hlo_flops_breakdown`)."""
    return hlo_flops_breakdown(compiled.as_text(), rules)
