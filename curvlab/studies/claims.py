"""The verdict table: each claim of a study decided from the merged Dataset, never by hand.

    ds = curvlab.studies.verdicts(ds)        # (re)computes claim_value / claim_holds from the data
    print(curvlab.studies.format_verdicts(ds))

Stored in the Dataset as the coordinate ``claim`` (the claim ids) with the non-index coordinates
``claim_statement`` and ``claim_criterion``, the variables ``claim_value`` (float64, the measured
number) and ``claim_holds`` (bool), and per claim the attrs ``claim_<id>_statement`` and
``claim_<id>_criterion`` (and ``claim_<id>_error`` when it could not be computed). A claim whose
computation raises, or whose value is NaN, does not hold; its error is kept.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from curvlab.studies.study import Claim, Study

__all__ = ["verdicts", "format_verdicts", "VERDICT_VARIABLES"]

VERDICT_VARIABLES = ("claim_value", "claim_holds", "claim", "claim_statement", "claim_criterion")


def _decide(claim: Claim, data: xr.Dataset) -> tuple[float, bool, str | None]:
    """(value, holds, error) of one claim on ``data``."""
    import numpy as np

    try:
        result = claim.compute(data)
        value, holds = result
        if not isinstance(holds, (bool, np.bool_)):
            raise TypeError(f"compute must return (float, bool); its second item is {type(holds).__name__}")
        value = float(value)
    except Exception as exc:  # a claim that cannot be computed does not hold; the error is reported
        return math.nan, False, f"{type(exc).__name__}: {exc}"
    if math.isnan(value):
        return value, False, "the measured value is NaN"
    return value, bool(holds), None


def verdicts(ds: xr.Dataset, study: Study | None = None) -> xr.Dataset:
    """``ds`` with its verdict table computed from its data (any earlier table is replaced)."""
    import numpy as np

    from curvlab.studies.results import _study_of

    study = _study_of(ds) if study is None else study
    data = ds.drop_vars([v for v in VERDICT_VARIABLES if v in ds.variables])
    data.attrs = {k: v for k, v in ds.attrs.items() if not k.startswith("claim_")}
    if not study.claims:
        return data
    decided = [_decide(c, data) for c in study.claims]
    ids = [c.id for c in study.claims]
    out = data.assign_coords(claim=("claim", ids),
                             claim_statement=("claim", [c.statement for c in study.claims]),
                             claim_criterion=("claim", [c.criterion for c in study.claims]))
    out["claim_value"] = ("claim", np.array([d[0] for d in decided], dtype=np.float64),
                          {"units": "as the criterion states",
                           "description": "the measured value each claim's criterion is decided on"})
    out["claim_holds"] = ("claim", np.array([d[1] for d in decided], dtype=bool),
                          {"description": "whether the criterion is met (computed from the data)"})
    out["claim"].attrs["description"] = "claim id (the paper's claim this study tests)"
    for c, (_, _, error) in zip(study.claims, decided):
        out.attrs[f"claim_{c.id}_statement"] = c.statement
        out.attrs[f"claim_{c.id}_criterion"] = c.criterion
        if error is not None:
            out.attrs[f"claim_{c.id}_error"] = error
    return out


def format_verdicts(ds: xr.Dataset) -> str:
    """Return the verdict table as text: claim, holds, value, statement, criterion (one row per claim)."""
    from curvlab.cli import format_table

    if "claim" not in ds.coords:
        return "(no claims)"
    rows = []
    for i, cid in enumerate(str(c) for c in ds["claim"].values):
        error = ds.attrs.get(f"claim_{cid}_error")
        holds = "error" if error and error != "the measured value is NaN" else \
            ("yes" if bool(ds["claim_holds"].values[i]) else "no")
        rows.append([cid, holds, f"{float(ds['claim_value'].values[i]):.4g}",
                     str(ds["claim_statement"].values[i]), str(ds["claim_criterion"].values[i])])
    table = format_table(["claim", "holds", "value", "statement", "criterion"], rows,
                         right=[False, False, True, False, False])
    notes = [f"{cid}: {ds.attrs[f'claim_{cid}_error']}" for cid in (str(c) for c in ds["claim"].values)
             if f"claim_{cid}_error" in ds.attrs]
    return table + ("\n" + "\n".join(notes) if notes else "")
