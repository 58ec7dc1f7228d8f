"""Convert a HF transformers Switch Transformers (or dense T5) checkpoint to moe_jax.

  python scripts/convert_hf_switch.py --hf_dir /path/to/switch-base-8 --out /tmp/switch_base_8

The HF directory is `save_pretrained` output (config.json + safetensors or pytorch_model.bin).
Writes OUT/checkpoint_0/params (orbax; the trainer's checkpoint layout) and OUT/model.gin (the
model's gin bindings), e.g. for fine-tuning:

  python -m moe_jax.train --gin_file=OUT/model.gin --gin_file=gin/runs/finetune.gin \
      --gin.INITIAL_CHECKPOINT_PATH=\"OUT/checkpoint_0\" ...
"""
from __future__ import annotations

import argparse
import os
import sys

from moe_jax.checkpoints import hf_switch
from moe_jax.models import count_params


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hf_dir", required=True, help="HF save_pretrained directory")
  parser.add_argument("--out", required=True, help="output directory (created)")
  parser.add_argument("--capacity", choices=hf_switch.CAPACITY_CHOICES, default="hf",
                      help="hf: route as HF (a group per sequence, config.expert_capacity "
                           "tokens per expert; exact for evaluation and decoding); moe_jax: "
                           "moe_jax's capacity factors per routing group (for fine-tuning)")
  args = parser.parse_args(argv)

  params, gin_text = hf_switch.load_hf_switch(args.hf_dir, args.capacity)
  os.makedirs(args.out, exist_ok=True)
  step_dir = hf_switch.save_params(params, args.out)
  gin_path = os.path.join(args.out, "model.gin")
  with open(gin_path, "w") as f:
    f.write(gin_text)
  print(f"{count_params(params):,} parameters -> {step_dir}/params; gin bindings -> {gin_path}")


if __name__ == "__main__":
  main(sys.argv[1:])
