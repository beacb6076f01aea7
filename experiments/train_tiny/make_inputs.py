"""Write the inputs of the tiny training run: a random tiny SD1-like diffusers folder (built with diffusers, a
test dependency) and a synthetic captioned image folder. Run from the repository root:
    python experiments/train_tiny/make_inputs.py runs/train_tiny_inputs
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.*

from tests import fixtures
from tests.train.synthetic import write_synthetic_dataset

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/train_tiny_inputs")
    fixtures.save_pipeline_folder(fixtures.SD1, out / "model")
    write_synthetic_dataset(out / "data", count=32)
    print(f"wrote {out / 'model'} and {out / 'data'}")
