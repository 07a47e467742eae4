"""The share of each training step the GPU would wait for data: the training step's clips/s
(`bench/train_step.py --json`) beside the augmented data path's (`bench/data_loading.py
--cache --augment --json`).

    python bench/data_wait.py TRAIN_STEP_JSON DATA_LOADING_JSON

With the loader working beside the step, a step of n clips takes max(n / step rate, n /
data rate) seconds, so the GPU waits 1 - data rate / step rate of it when the data path is
the slower one (device augmentation's own GPU time is counted in its data rate). The two
files should come from the same machine (bench/gpu_check.sh makes them one after the other).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def wait_share(step_rate: float, data_rate: float) -> float:
    """The fraction of a step the GPU waits for data: 0 when the data path keeps up."""
    return max(0.0, 1.0 - data_rate / step_rate)


def main(argv: list[str] | None = None) -> None:
    train_path, data_path = argv if argv is not None else sys.argv[1:]
    step = json.loads(Path(train_path).read_text())
    data = json.loads(Path(data_path).read_text())
    step_rate = step["clips_per_s"]
    print(f"training step: {step_rate:.1f} clips/s ({step['preset']}, batch {step['batch_size']} x "
          f"{step['max_frames']} frames of {step['image_size']} px, {step['device']}: {step['machine']})")
    settings = data["settings"]
    for name, rate in data["clips_per_s"].items():
        print(f"data path, {name}: {rate:.1f} clips/s ({settings['workers']} workers, batch "
              f"{settings['batch']}): the GPU would wait {100 * wait_share(step_rate, rate):.0f} % of each step")


if __name__ == "__main__":
    main()
