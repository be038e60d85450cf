"""Command-line progress (workbench.console): a long run says what it is doing, without a line per image."""

import io

from workbench.console import ConsoleProgress


def test_progress_prints_each_stage_and_every_few_percent_not_every_call():
    out, now = io.StringIO(), [0.0]
    progress = ConsoleProgress(out, step=0.1, every=30.0, clock=lambda: now[0])
    for k in range(1, 201):  # 200 images of a base-model evaluation, one second each
        now[0] += 1.0
        progress(0.2 * k / 200, f"eval: image {k}/200")
    progress(0.2, "train: step 1/800")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[  0%] eval: image 1/200"
    assert lines[-1] == "[ 20%] train: step 1/800"  # a new stage is said at once
    assert 3 <= len(lines) <= 10  # every 30 s or 10% of the run, not 200 lines


def test_a_slow_stage_still_reports_within_the_interval():
    out, now = io.StringIO(), [0.0]
    progress = ConsoleProgress(out, step=0.5, every=30.0, clock=lambda: now[0])
    for k in range(10):
        now[0] += 31.0
        progress(0.01 * k, f"train: step {k}/100")
    assert len(out.getvalue().splitlines()) == 10
