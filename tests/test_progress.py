"""kdlab.progress without a terminal: plain lines at an interval (half a minute unless
KDLAB_PROGRESS_SECONDS says otherwise), and the epoch line's img/s counts training time alone.
"""

from __future__ import annotations

import time


def test_progress_lines_without_a_terminal(monkeypatch):
    from kdlab import progress

    monkeypatch.setenv("KDLAB_PROGRESS_SECONDS", "0.01")
    lines: list[str] = []
    p = progress.Progress(total_epochs=3, steps_per_epoch=20, batch_size=8, log=lines.append)
    p.start_epoch(0)
    for step in range(20):
        time.sleep(0.02)
        p.step(step)
    plain = [ln for ln in lines if ln.startswith("epoch 1/3 step ")]
    assert len(plain) >= 5 and "img/s" in plain[-1] and "ETA epoch" in plain[-1] and "run " in plain[-1]
    p.training_done(1.0)
    p.end_epoch({"epoch": 1, "lr": 0.1, "train_loss": 1.0, "seconds": 10.0})
    assert lines[-1].endswith("| 160 img/s training")  # 20 steps x 8 images in 1 s of training, not 10 s


def test_progress_interval_defaults_to_half_a_minute(monkeypatch):
    from kdlab import progress

    monkeypatch.delenv("KDLAB_PROGRESS_SECONDS", raising=False)
    assert progress.plain_interval() == 30.0
    monkeypatch.setenv("KDLAB_PROGRESS_SECONDS", "nonsense")
    assert progress.plain_interval() == 30.0
