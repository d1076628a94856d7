"""Tracker association, confirmation and ending; embedding aggregation and the recognition budget."""

from __future__ import annotations

import numpy as np

from facemoe.preprocess import l2_normalize
from facemoe.runtime.aggregation import EmbeddingAggregate, RecognitionBudget
from facemoe.runtime.detection import Detection
from facemoe.runtime.tracking import Tracker


def det(x: float, y: float, size: float = 40.0, score: float = 0.95) -> Detection:
    box = np.array([x, y, x + size, y + size], dtype=np.float32)
    eyes = np.array([[x + 0.3 * size, y + 0.4 * size], [x + 0.7 * size, y + 0.4 * size]])
    rest = np.array(
        [[x + 0.5 * size, y + 0.6 * size], [x + 0.35 * size, y + 0.8 * size], [x + 0.65 * size, y + 0.8 * size]]
    )
    return Detection(box=box, score=score, landmarks=np.vstack([eyes, rest]).astype(np.float32))


def test_crossing_faces_keep_their_ids_through_occlusion() -> None:
    """Two faces pass each other; one is hidden for several frames while they overlap."""
    tracker = Tracker(max_age=15)
    history: dict[int, list[float]] = {}
    for i in range(60):
        ax, bx = 10 + 6 * i, 370 - 6 * i  # A moves right, B moves left
        detections = [det(ax, 50)]
        if not 27 <= i <= 33:  # B is behind A around the crossing
            detections.append(det(bx, 62))
        update = tracker.update(detections, i)
        for track, d in update.matched:
            assert track.track_id is not None
            history.setdefault(track.track_id, []).append(float(d.box[0]))
    assert sorted(history) == [1, 2], "a third id means a track was lost or swapped"
    moves = {tid: np.sign(np.diff(xs)) for tid, xs in history.items()}
    directions = sorted(int(m[0]) for m in moves.values())
    assert directions == [-1, 1]
    for m in moves.values():
        assert (m == m[0]).all(), "a track jumped to the other face"


def test_confirmation_needs_min_hits_and_single_frame_blips_get_no_id() -> None:
    tracker = Tracker(min_hits=2)
    assert tracker.update([det(0, 0), det(200, 0)], 0).started == []
    update = tracker.update([det(2, 0)], 1)  # the blip at x=200 is not seen again
    assert [t.track_id for t in update.started] == [1]
    for i in range(2, 5):
        update = tracker.update([det(2 + i, 0)], i)
        assert update.started == []
    assert [t.track_id for t in tracker.active] == [1]


def test_track_ends_after_max_age_and_a_new_face_gets_a_new_id() -> None:
    tracker = Tracker(max_age=3)
    for i in range(3):
        tracker.update([det(100, 100)], i)
    ended = []
    for i in range(3, 8):
        ended += tracker.update([], i).ended
    assert [t.track_id for t in ended] == [1]
    assert ended[0].last_frame == 2
    tracker.update([det(100, 100)], 8)
    update = tracker.update([det(100, 100)], 9)
    assert [t.track_id for t in update.started] == [2]
    assert [t.track_id for t in tracker.finish()] == [2]
    assert tracker.tracks == []


def test_low_score_detections_extend_but_never_start_tracks() -> None:
    tracker = Tracker(detect_threshold=0.5)
    for i in range(3):
        tracker.update([det(50, 50)], i)
    update = tracker.update([det(52, 50, score=0.35), det(300, 300, score=0.4)], 3)
    assert [(t.track_id, round(d.score, 2)) for t, d in update.matched] == [(1, 0.35)]
    for i in range(4, 8):
        assert tracker.update([det(300, 300, score=0.4)], i).started == []


def test_motion_prediction_bridges_a_frame_gap() -> None:
    """Fast motion with dropped frames: without prediction the boxes would not overlap at all."""
    tracker = Tracker()
    for i in range(4):
        tracker.update([det(20 * i, 0)], i)
    update = tracker.update([det(20 * 8, 0)], 8)  # frames 4-7 dropped; the face moved 80 px
    assert [t.track_id for t, _ in update.matched] == [1]


def test_detection_every_fourth_frame_keeps_one_track_and_predicts_coasted_boxes() -> None:
    """A face moving at constant speed, detected on every 4th frame only (a detection interval)."""
    tracker = Tracker()
    jitter = np.random.default_rng(3).uniform(-0.5, 0.5, size=(40, 2))
    ids: set[int] = set()
    errors = []
    for i in range(40):
        x, y = 20 + 3.0 * i, 30 + 1.5 * i  # true top-left corner at frame i
        if i % 4 == 0:
            update = tracker.update([det(x + jitter[i, 0], y + jitter[i, 1])], i, i / 30)
            ids |= {t.track_id for t, _ in update.matched if t.track_id is not None}
        else:
            update = tracker.coast(i, i / 30)
            assert update.matched == [] and update.started == [] and update.ended == []
            if i > 8:  # the velocity needs two detections
                (track,) = tracker.tracks
                assert track.coasting and track.box_frame == i and track.last_frame == i - i % 4
                errors.append(np.abs(track.box - [x, y, x + 40, y + 40]).max())
                # The landmarks travel with the box.
                np.testing.assert_allclose(track.landmarks[0], track.box[:2] + np.array([12, 16]), atol=1e-3)
    assert ids == {1}
    assert max(errors) < 3.0, f"coasted boxes {max(errors):.1f} px off"
    # The velocity is per frame (3 and 1.5 px), not per detection (12 and 6 px).
    np.testing.assert_allclose(tracker.tracks[0].velocity, [3, 1.5, 3, 1.5], atol=0.5)


def test_a_face_that_leaves_ends_after_max_age_frames_while_coasting() -> None:
    tracker = Tracker(max_age=10)
    for i in range(12):  # detected on frames 0, 4 and 8, moving right 2 px a frame
        if i % 4 == 0:
            tracker.update([det(100 + 2 * i, 100)], i, i / 30)
        else:
            tracker.coast(i, i / 30)
    ended_at = {}
    for i in range(12, 40):
        update = tracker.update([], i, i / 30) if i % 4 == 0 else tracker.coast(i, i / 30)
        for track in update.ended:
            ended_at[track.track_id] = (i, track)
    # Counted in frames since the last detection (frame 8), not in missed detections (which would be 40).
    assert list(ended_at) == [1]
    frame, track = ended_at[1]
    assert frame == 8 + 10 + 1
    # The ended track reports its last detection, not a box coasted off by 20 px.
    assert track.last_frame == 8 and not track.coasting
    np.testing.assert_allclose(track.box, [116, 100, 156, 140])
    assert tracker.tracks == []


def test_coast_never_starts_or_matches_and_keeps_tentative_tracks() -> None:
    tracker = Tracker(min_hits=2)
    for i in range(10):
        update = tracker.coast(i, 0.0)
        assert update.started == update.matched == update.ended == []
    assert tracker.tracks == []
    tracker.update([det(50, 50)], 10)  # tentative: one hit
    for i in range(11, 14):
        update = tracker.coast(i, 0.0)
        assert update.started == update.matched == []
    assert len(tracker.tracks) == 1 and not tracker.tracks[0].confirmed
    # The next detection confirms it: the coasted frames were not misses.
    update = tracker.update([det(52, 50)], 14)
    assert [t.track_id for t in update.started] == [1]
    assert [t.track_id for t in tracker.finish()] == [1]


def test_aggregate_is_norm_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(6, 16)) * rng.uniform(0.1, 10, (6, 1))
    agg = EmbeddingAggregate()
    assert agg.vector is None
    for r in raw:
        agg.add(r)
    agg.add(np.full(16, np.nan))  # ignored
    assert agg.vector is not None
    np.testing.assert_allclose(agg.vector, l2_normalize(raw.sum(axis=0)), atol=1e-6)
    assert agg.count == 6
    assert agg.mean_norm == np.linalg.norm(raw, axis=1).mean()
    # A long vector dominates: the fused identity leans towards high-norm (high-quality) faces.
    strong, weak = np.eye(16)[0] * 20, np.eye(16)[1] * 1
    both = EmbeddingAggregate()
    both.add(strong)
    both.add(weak)
    assert both.vector is not None and both.vector[0] > 0.99


def test_budget_slows_down_once_confident() -> None:
    budget = RecognitionBudget(every=5, confident_after=3, max_embeddings=20, recheck=60)
    assert budget.is_due(0, None, 0, 0)
    assert not budget.is_due(4, 0, 1, 1)
    assert budget.is_due(5, 0, 1, 1)
    assert not budget.is_due(30, 0, 3, 3)
    assert budget.is_due(60, 0, 3, 3)
    assert not budget.is_due(30, 0, 20, 0)
