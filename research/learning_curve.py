"""The model card's learning-curve picture from `screen panel --train-fraction F --out X.json`
results: `python research/learning_curve.py OUT.png PANEL.json [PANEL.json ...]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.plots import plot_learning_curve  # noqa: E402


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    panels = [json.loads(Path(name).read_text()) for name in argv[1:]]
    print(plot_learning_curve(panels, Path(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
