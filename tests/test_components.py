"""Record kinds and objectives round-trip through their saved form; nothing but their own subclasses is built."""

from __future__ import annotations

import pytest

from muco.data.kinds import RecordKind, build_record_kind
from muco.data.m3t.kind import M3TRecords
from muco.data.pairs.kind import PairRecords
from muco.objectives import FinetuneObjective, Objective, PretrainObjective, build_objective


@pytest.mark.parametrize("component", [
    M3TRecords(turns_per_sample=3, turn_order="batch", negatives={"sidecar": "mined", "band": [2, 5]}),
    PairRecords(mask_ratio=0.3, full_mask_prob=0.0, collapse_mask_runs=False),
    PretrainObjective(symmetric_loss=True),
    FinetuneObjective(loss="joint_masked", hard_negatives=False, released_placeholder=True),
])
def test_spec_round_trip(component):
    build = build_objective if isinstance(component, Objective) else build_record_kind
    spec = component.spec()
    rebuilt = build(spec)
    assert type(rebuilt) is type(component) and rebuilt.init_args() == component.init_args()
    assert build(rebuilt) is rebuilt
    assert spec == rebuilt.spec()  # plain values: what YAML and checkpoints hold


def test_only_subclasses_are_built():
    with pytest.raises(ValueError, match="data.records.class_path='collections.OrderedDict' is not a RecordKind"):
        build_record_kind({"class_path": "collections.OrderedDict"})
    with pytest.raises(ValueError, match="model.objective.class_path='muco.data.m3t.kind.M3TRecords' is not an? Obj"):
        build_objective({"class_path": "muco.data.m3t.kind.M3TRecords"})
    with pytest.raises(ValueError, match="is not importable.*PretrainObjective"):
        build_objective({"class_path": "muco.objectives.NoSuchObjective"})
    with pytest.raises(TypeError, match="must be a RecordKind"):
        build_record_kind("m3t")  # type: ignore[arg-type]
    assert isinstance(build_record_kind({"class_path": "muco.data.pairs.kind.PairRecords"}), RecordKind)
