"""Each recipe's ``final_loss`` after a short CPU run, printed to every digit: the check that a change meant to
move code (not to change what it computes) trains exactly as before.

Every recipe trains the CI-sized local run (``params/ci.yaml``: 20 steps, 300 synthetic samples; the critic's
stage 1 10 steps) on the tiny models, one process, one thread (CPU reductions depend on the thread count).

    python bench/recipe_losses.py --out /tmp/recipe-losses --models-dir models
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ["WMTP_CI"] = "1"  # the CI sizing, before the config module reads it
os.environ["OMP_NUM_THREADS"] = "1"

from wmtp_lib.config import RECIPES  # noqa: E402
from wmtp_lib.launch import ensure_tiny_models, launch_training, prepare_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="runs directory (emptied of these runs' names first)")
    p.add_argument("--models-dir", default="models", help="staged tiny models (built there when missing)")
    p.add_argument("--recipes", default=",".join(RECIPES))
    args = p.parse_args(argv)
    losses = {}
    for recipe in args.recipes.split(","):
        overrides = {"paths.runs_dir": str(args.out.resolve()), "paths.models_dir": str(Path(args.models_dir).resolve()),
                     "train.resume": "never"}
        cfg, path = prepare_run(recipe, "local", run_name=f"losses-{recipe}", overrides=overrides, log=lambda m: None)
        ensure_tiny_models(cfg)
        run_dir = launch_training(cfg, path, progress=False)
        losses[recipe] = json.loads((run_dir / "summary.json").read_text())["final_loss"]
        print(f"{recipe:16s} final_loss {losses[recipe]!r}", flush=True)
    (args.out / "recipe_losses.json").write_text(json.dumps(losses, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
