"""The edit benchmark's rows: means, standard errors and the paired gain over the unedited source, checked against
numpy on per-pair values laid out as `EditEvaluator` names them."""

from __future__ import annotations

import numpy as np
import torch

from experiments.benchmarks.edit import row


def test_row_gives_means_standard_errors_and_paired_gains_over_the_source() -> None:
    rng = np.random.default_rng(0)
    model, source = rng.integers(0, 2, 12).astype(float), rng.integers(0, 2, 12).astype(float)
    kinds = np.array(["replace"] * 5 + ["recolour"] * 7)
    values = {"edit_success": torch.tensor(model), "edit_success_source": torch.tensor(source),
              "preservation": torch.tensor(rng.random(12)), "temporal_error": torch.tensor(rng.random(12))}
    for kind in ("replace", "recolour"):
        values[f"edit_success_{kind}"] = torch.tensor(model[kinds == kind])
        values[f"edit_success_source_{kind}"] = torch.tensor(source[kinds == kind])
    out = row(values, floor=values)
    replace = model[kinds == "replace"]
    assert np.isclose(out["success_replace"], replace.mean())
    assert np.isclose(out["success_replace_se"], replace.std(ddof=1) / np.sqrt(5))
    gain = model - source
    assert np.isclose(out["gain_edit_success"], gain.mean())
    assert np.isclose(out["gain_edit_success_se"], gain.std(ddof=1) / np.sqrt(12))
    assert out["success_add"] is None and "gain_success_add" not in out  # no pair of that kind
    assert np.isclose(out["preservation"], values["preservation"].mean().item())
    # The source's own row: its values under the "_source" names, and no gain over itself.
    own = row(values, "_source")
    assert np.isclose(own["edit_success"], source.mean()) and "gain_edit_success" not in own
