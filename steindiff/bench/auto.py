"""The evidence rule for ``--stabilizer auto`` (issue: "a default chosen by evidence").

A candidate qualifies when, on the whole benchmark grid, at equal NFE against the same vanilla
solver, schedule and noise, on each model's primary metric (excess sliced-W2 for mixtures,
excess digits-FID for the digits model):

- it is never worse: no cell "hurts" (higher by more than 2% of vanilla's excess plus the seed
  spread), none failed, and none past that threshold where vanilla is already at the floor;
- it is strictly better ("helps") in at least 80% of the cells with NFE <= 8 that have room;
- its secondary metrics (mixtures: NLL, mode TV, MMD; image models: digits-KID, precision, recall)
  are none of them worse ("hurts" or "failed") in at least 90% of the cells.

(The help threshold was 70% until the calibrated sampler; issue 9 raised it to 80% and added the
secondary-metric condition, so that a trade, better shape for worse likelihood, cannot qualify.)
"""

from __future__ import annotations

from typing import Iterable

from .runner import label_of, summarize

__all__ = ["auto_rule", "evaluate_candidates"]


#: Secondary metrics per primary metric (their verdicts must not be worse in ``min_secondary`` % of cells).
SECONDARY = {"sw2": ("nll", "mode_tv", "mmd"), "digits_fid": ("digits_kid", "precision", "recall"),
             "patch_fd": ("spectrum", "pixel_sw2")}


def auto_rule(cells: Iterable[dict], label: str, *, max_nfe: int = 8, min_help: float = 80.0,
              min_secondary: float = 90.0) -> dict:
    """Evaluate one stabilizer label (``name`` or ``name/coords``) over summary cells."""
    n_cells = worse = helps = room_small = secondary_worse = 0
    worst = None
    for c in cells:
        if label_of(c) != label or "verdicts" not in c:
            continue
        v = c["verdicts"].get(c["primary"])
        if v is None:
            continue
        n_cells += 1
        sec = [c["verdicts"][m]["verdict"] for m in SECONDARY.get(c["primary"], ()) if m in c["verdicts"]]
        secondary_worse += any(s in ("hurts", "failed") for s in sec)
        if v["verdict"] in ("hurts", "failed") or v["worse_at_floor"]:
            worse += 1
            worst = worst or f"{c['model']} {c['solver']} {c['schedule']} NFE {c['nfe_budget']}"
        if c["nfe_budget"] <= max_nfe and v["room"]:
            room_small += 1
            helps += v["verdict"] == "helps"
    pct = 100.0 * helps / room_small if room_small else 0.0
    sec_ok = 100.0 * (n_cells - secondary_worse) / n_cells if n_cells else 0.0
    return {"label": label, "cells": n_cells, "worse_cells": worse, "first_worse": worst,
            "helps_small_nfe": helps, "room_small_nfe": room_small, "helps_pct": pct,
            "secondary_worse_cells": secondary_worse, "secondary_ok_pct": sec_ok,
            "qualifies": n_cells > 0 and worse == 0 and pct >= min_help and sec_ok >= min_secondary}


def evaluate_candidates(results: list[dict]) -> list[dict]:
    """Apply :func:`auto_rule` to every stabilizer label in one or more ``steindiff.bench/1`` results."""
    cells = []
    for res in results:
        summ = summarize(res)
        for c in summ["cells"]:
            c["primary"] = summ["primary"][c["model"]]
        cells.extend(summ["cells"])
    labels = sorted({label_of(c) for c in cells if c["stabilizer"] != "none"})
    return [auto_rule(cells, lab) for lab in labels]
