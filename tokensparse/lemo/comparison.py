"""Fair comparisons of LeMo with LoRA: the baseline and the split of LeMo's saving into its parts.

LeMo changes two things in a LoRA fine-tuning step: sparse layers eliminate tokens from attention
(:mod:`tokensparse.lemo.selection`), and the MLP backward may keep only its strongest channels
(``mlp_mode="channel_sparse_bwd"``, :mod:`tokensparse.lemo.mlp`). A number that credits LeMo must
say which of the two it comes from, and the LoRA baseline must get everything that is *not* LeMo's
own: the same remat policy, attention kernel and loss segmentation (the caller's job), and the same
MLP rematerialisation (``mlp_mode="recompute"`` is plain activation checkpointing of the MLP, which
any LoRA run can use).

Every configuration here is a :class:`~tokensparse.config.LeMoConfig`, run through the one LeMo
forward (:func:`tokensparse.lemo.forward.lemo_loss`): a config whose layers all keep 1.0 is a dense
forward, and with ``mlp_mode="dense"`` exactly :func:`tokensparse.train.lm_loss`.
"""

from __future__ import annotations

from tokensparse.config import LeMoConfig

# The rows of a fair comparison, in report order: the baseline, then LeMo's two parts, then both.
ROWS = ("lora", "lemo_elimination", "lemo_mlp", "lemo")
ROW_HELP = {
    "lora": "LoRA baseline: every layer dense, the MLP treatment any LoRA run can have",
    "lemo_elimination": "LeMo's token elimination alone (the baseline's MLP)",
    "lemo_mlp": "LeMo's MLP treatment alone (every layer dense)",
    "lemo": "LeMo: elimination and its MLP treatment",
}


def baseline_mlp_mode(lemo: LeMoConfig) -> str:
    """The MLP treatment the baseline gets: ``recompute`` (rematerialisation) when LeMo uses it,
    else the plain MLP. The channel-sparse backward is LeMo's own approximation."""
    return "recompute" if lemo.mlp_mode == "recompute" else "dense"


def dense_everywhere(lemo: LeMoConfig) -> LeMoConfig:
    """``lemo`` with every layer dense (its MLP treatment kept)."""
    return lemo.replace(schedule="all", keep_ratio=1.0, profile=None)


def lora_baseline(lemo: LeMoConfig) -> LeMoConfig:
    """The fair LoRA baseline for ``lemo``: every layer dense, :func:`baseline_mlp_mode`'s MLP."""
    return dense_everywhere(lemo).replace(mlp_mode=baseline_mlp_mode(lemo))


def is_plain_lora(lemo: LeMoConfig) -> bool:
    """Whether ``lemo`` is the plain LoRA step: every layer dense, the ordinary MLP and no offload
    plan (a baseline with ``offload`` gets the same per-layer host budget through the LeMo forward;
    with every layer dense, ``sparsity`` equals ``uniform``)."""
    return lemo.mlp_mode == "dense" and lemo.offload == "none" and lemo.schedule in (
        "all", "profile") and all(
        r >= 1.0 for r in (lemo.profile or (lemo.keep_ratio,)))


def comparison_configs(lemo: LeMoConfig) -> dict[str, LeMoConfig]:
    """:data:`ROWS` → the config that row runs, for the LeMo setting ``lemo``.

    With ``mlp_mode`` ``"recompute"`` or ``"dense"`` LeMo's MLP is the baseline's, so
    ``lemo_mlp`` equals ``lora`` and ``lemo`` equals ``lemo_elimination``: the split is then all
    elimination, and the rows say so by being equal."""
    return {
        "lora": lora_baseline(lemo),
        "lemo_elimination": lemo.replace(mlp_mode=baseline_mlp_mode(lemo)),
        "lemo_mlp": dense_everywhere(lemo),
        "lemo": lemo,
    }


def measure_rows(lemo: LeMoConfig, measure) -> dict[str, dict]:
    """``{row: measure(row)}`` for every row of :data:`ROWS`, in order; a row whose config equals
    an earlier row's is not measured again but copied with ``same_as`` naming that row (e.g. with
    ``mlp_mode="recompute"``, ``lemo_mlp`` is ``lora``)."""
    configs, rows = comparison_configs(lemo), {}
    for method in ROWS:
        twin = next((m for m in rows if configs[m] == configs[method]), None)
        rows[method] = ({**rows[twin], "method": method, "same_as": twin} if twin
                        else measure(method))
    return rows

