"""Write the inputs of the tiny training run with sdjax alone (no torch or diffusers needed): a synthetic
captioned image folder, and a random tiny SD1-like diffusers folder whose CLIP tokenizer is learned from
those captions. Run from the repository root:
    python experiments/train_tiny/make_inputs.py runs/train_tiny_inputs
"""
import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.*

from sdjax.models.components import COMPONENTS, STABLE_DIFFUSION  # noqa: E402
from sdjax.pipeline import Pipeline  # noqa: E402
from sdjax.tokenizer import learn_bpe, write_clip_tokenizer  # noqa: E402
from tests.train.synthetic import write_synthetic_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
# SD 1.x's noise schedule and a 3-layer text encoder as wide as unet.json's cross-attention.
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}
TEXT_ENCODER = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
                "max_position_embeddings": 77, "hidden_act": "quick_gelu"}


def write_model(folder: Path, captions: list[str], seed: int = 0) -> None:
    tokenizer = write_clip_tokenizer(folder / "tokenizer", learn_bpe(captions, min_count=1))
    raw = {"unet": {k: v for k, v in json.loads((HERE / "unet.json").read_text()).items() if k != "_comment"},
           "vae": COMPONENTS["vae"].presets["tiny"].to_dict(),
           "text_encoder": {**TEXT_ENCODER, "vocab_size": len(tokenizer)}}
    configs = {name: COMPONENTS[name].config_class.from_dict(raw[name]) for name in STABLE_DIFFUSION}
    params = {name: COMPONENTS[name].init(configs[name], jax.random.fold_in(jax.random.key(seed), i))
              for i, name in enumerate(STABLE_DIFFUSION)}
    Pipeline(configs, params, tokenizer, SCHEDULER, raw_configs=raw).save_pretrained(folder)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/train_tiny_inputs")
    data = write_synthetic_dataset(out / "data", count=32)
    write_model(out / "model", [json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines()])
    print(f"wrote {out / 'model'} and {out / 'data'}")
