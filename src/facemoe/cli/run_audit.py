"""``facemoe-run``'s ``--audit-*`` options: their declarations, checks, and starting the audit of a run.

Nothing here imports torch; the ``torch`` reference imports it when it is made (facemoe.runtime.audit_reference).
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from facemoe.errors import FaceMoEError

# An alarm ends a --audit-strict run with this status (distinct from user errors, 2, and interrupts, 130).
EXIT_ACCURACY_ALARM = 3
# The export's default cosine_mean gates (docs/EXPORT.md, "Parity"), for a manifest that records none.
FALLBACK_MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.98}


class AuditReference(str, enum.Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


AuditRate = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Share of embedded faces re-embedded by a reference in the background to check accuracy (0: off).",
    ),
]
AuditReferenceOption = Annotated[
    AuditReference,
    typer.Option(help="Audit reference: PyTorch fp32 (torch), the bundle's fp32 ONNX on the CPU (onnx), auto."),
]
AuditMinCosine = Annotated[
    float | None,
    typer.Option(min=-1.0, max=1.0, help="Alarm below this running mean cosine (default: the artifact's parity gate)."),
]
AuditSave = Annotated[Path | None, typer.Option(help="Save the aligned crops of the worst faces of each alarm here.")]
AuditStrict = Annotated[
    bool, typer.Option("--audit-strict", help=f"Stop the run on an accuracy alarm (exit {EXIT_ACCURACY_ALARM}).")
]
AuditQueue = Annotated[
    int, typer.Option(min=1, help="Audit samples waiting for the reference; beyond it they are dropped (counted).")
]


def check_audit_options(rate: float, min_cosine: float | None, save: Path | None, reference: str) -> None:
    """One-line errors before anything is loaded."""
    import importlib.util

    if rate > 0 and reference == "torch" and importlib.util.find_spec("torch") is None:
        raise FaceMoEError("--audit-reference torch needs PyTorch (pip install 'facemoe-edge[export]'); use onnx")
    if not math.isfinite(rate):
        raise FaceMoEError(f"--audit-rate must be between 0 and 1, got {rate}")
    if min_cosine is not None and not math.isfinite(min_cosine):
        raise FaceMoEError(f"--audit-min-cosine must be between -1 and 1, got {min_cosine}")
    if save is not None and save.exists() and not save.is_dir():
        raise FaceMoEError(f"{save}: --audit-save needs a directory, this is a file")
    if save is not None and rate == 0:
        raise FaceMoEError("--audit-save saves audited faces: set --audit-rate above 0")


def audit_threshold(bundle: Any, precision: str, given: float | None) -> tuple[float, str]:
    """The alarm threshold and where it came from: given, or the artifact's recorded parity gate."""
    if given is not None:
        return given, "--audit-min-cosine"
    gates = bundle.artifact(precision).parity.get("gates") or {}
    if "cosine_mean" in gates:
        return float(gates["cosine_mean"]), f"the {precision} artifact's parity gate"
    return FALLBACK_MIN_COSINE.get(precision, 0.98), f"the default {precision} parity gate"


def start_audit(
    bundle: Any,
    engine: Any,
    *,
    rate: float,
    reference: str,
    min_cosine: float | None,
    save: Path | None,
    strict: bool,
    queue_size: int,
    gallery: Any,
    match_threshold: float,
    flip: bool,
    say: Any,
) -> tuple[Any, dict[str, Any]]:
    """The auditor of this run (None when the rate is 0; its events are bound later) and its header fields."""
    if rate <= 0:
        return None, {"audit": None}
    from facemoe.runtime.audit import AuditConfig, Auditor
    from facemoe.runtime.audit_reference import ArtifactRouting, open_reference

    precision = str(engine.precision)
    threshold, source = audit_threshold(bundle, precision, min_cosine)
    chosen = open_reference(bundle, reference)
    routing = ArtifactRouting(bundle, engine)
    recorded = bundle.artifact(precision).parity.get("routing_agreement_per_layer") or {}
    config = AuditConfig(
        rate=rate,
        min_cosine=threshold,
        queue_size=queue_size,
        save_dir=save,
        strict=strict,
        match_threshold=match_threshold,
        flip=flip,
    )
    auditor = Auditor(
        chosen.reference,
        None,
        config,
        artifact=precision,
        gallery=gallery,
        routing=routing,
        layer_names=list(recorded),
    )
    routing_text = "per-layer routing compared" if routing.session is not None else f"routing {routing.unavailable}"
    say(
        escape(
            f"audit: {rate:g} of embedded faces vs {chosen.reference.detail} ({chosen.why}); alarm below "
            f"cosine {threshold:g} ({source}); {routing_text}"
        )
    )
    header = {
        "audit": {
            "rate": rate,
            "reference": chosen.reference.name,
            "reference_detail": chosen.reference.detail,
            "reference_choice": chosen.why,
            "min_cosine": threshold,
            "min_cosine_source": source,
            "routing": None if routing.session is None else "compared",
            "routing_note": routing.unavailable or None,
            "strict": strict,
        }
    }
    return auditor, header


def audit_lines(result: dict[str, Any] | None) -> list[str]:
    """The end-of-run lines (rich markup) of an audited run."""
    if not result:
        return []
    name, faces = result["reference"], result["faces"]
    lost = f"; dropped {result['dropped']} of {result['sampled']} sampled (reference behind the stream)"
    lost = lost if result["dropped"] else f"; {result['sampled']} sampled, none dropped"
    if result["unfinished"]:
        lost += f"; {result['unfinished']} not checked before the end"
    if not faces:
        return [f"audit ({name} reference): no face checked{lost}"]
    lines = [
        f"audit ({name} reference, {result['artifact']}): {faces} faces, cosine mean {result['cosine_mean']:.6f} "
        f"min {result['cosine_min']:.6f} (alarm below {result['min_cosine']:g}){lost}"
    ]
    if result["decision_agreement"] is not None:
        lines.append(f"audit: gallery decision same for {100 * result['decision_agreement']:.1f}% of audited faces")
    if result["routing_agreement_mean"] is not None:
        lines.append(
            f"audit: routing agreement mean {result['routing_agreement_mean']:.4f} "
            f"min {result['routing_agreement_min']:.4f}"
        )
    elif result.get("routing_note"):
        lines.append(f"audit: routing {result['routing_note']}")
    if result["alarms"]:
        lines.append(f"[bold red]audit: {result['alarms']} accuracy alarm(s)[/]")
    if result.get("error"):
        lines.append(f"[yellow]audit: {result['errors']} faces failed in the reference: {escape(result['error'])}[/]")
    return lines


__all__ = [
    "EXIT_ACCURACY_ALARM",
    "AuditReference",
    "audit_lines",
    "audit_threshold",
    "check_audit_options",
    "start_audit",
]
