"""Convert t5x checkpoints (flaxformer's Switch / MoE models, or moe_jax's own) to moe_jax, and
moe_jax checkpoints to t5x.

  python scripts/convert_t5x.py to_moe_jax --t5x_path /path/to/checkpoint_1000000 \
      --preset switch --out /tmp/switch_base
  python scripts/convert_t5x.py to_t5x --moe_jax_path /tmp/run/checkpoint_500 \
      --out /tmp/t5x_model_dir [--names moe_jax] [--format tensorstore]

to_moe_jax reads either t5x format (Orbax, or the older msgpack + tensorstore one of Google's
released checkpoints) and writes OUT/checkpoint_0/params (orbax; the trainer's layout) and
OUT/model.gin (the model's gin bindings, flaxformer's semantics), e.g. for evaluation:

  python -m moe_jax.eval --gin_file=OUT/model.gin --gin_file=gin/runs/eval.gin \
      --gin.CHECKPOINT_PATH=\"OUT/checkpoint_0\" ...

The routing hyper-parameters come from --preset (flaxformer's model gin family); override any
with --binding, e.g. --binding 'GROUP_SIZE = 2048'.

to_t5x writes MODEL_DIR/checkpoint_<step> in t5x's Orbax format (what t5x's train restores by
default) or its legacy tensorstore format, with flaxformer's parameter names (for flaxformer's
model in t5x) or moe_jax's (for moe_jax's model through the t5x bridge).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from moe_jax.checkpoints import hf_switch
from moe_jax.checkpoints import orbax_utils
from moe_jax.checkpoints import t5x_checkpoints
from moe_jax.models import count_params


def to_moe_jax(args: argparse.Namespace) -> None:
  params, gin_text, step = t5x_checkpoints.load_t5x(args.t5x_path, args.preset, args.names)
  if args.binding:
    gin_text += "\n# --binding overrides\n" + "\n".join(args.binding) + "\n"
  os.makedirs(args.out, exist_ok=True)
  step_dir = hf_switch.save_params(params, args.out)
  gin_path = os.path.join(args.out, "model.gin")
  with open(gin_path, "w") as f:
    f.write(gin_text)
  print(f"t5x step {step}: {count_params(params):,} parameters -> {step_dir}/params; "
        f"gin bindings -> {gin_path}")


def to_t5x(args: argparse.Namespace) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  model_dir, step = orbax_utils.resolve_path(args.moe_jax_path)
  item = os.path.join(orbax_utils.step_dir(model_dir, step), orbax_utils.ITEMS[0])
  params = ocp.StandardCheckpointer().restore(item)  # as saved: no model or mesh needed
  params = t5x_checkpoints.unflatten(
      {k: np.asarray(v, np.float32) for k, v in t5x_checkpoints.flatten(params).items()})
  if args.names == "flaxformer":
    params = t5x_checkpoints.moe_jax_to_flaxformer(params)
  out_step = step if args.step is None else args.step
  step_dir = t5x_checkpoints.write_t5x_checkpoint(args.out, params, out_step, args.format)
  print(f"moe_jax step {step}: {count_params(params):,} parameters -> {step_dir} "
        f"({args.format}, {args.names} names)")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  down = commands.add_parser("to_moe_jax", help="t5x checkpoint -> moe_jax checkpoint + gin")
  down.add_argument("--t5x_path", required=True,
                    help="t5x checkpoint_<step> directory, or a model dir (its latest step)")
  down.add_argument("--out", required=True, help="output directory (created)")
  down.add_argument("--preset", choices=sorted(t5x_checkpoints.PRESETS), default="switch",
                    help="flaxformer model gin family: routing and activations")
  down.add_argument("--names", choices=("auto",) + t5x_checkpoints.NAMES, default="auto",
                    help="parameter names in the checkpoint (auto: detected)")
  down.add_argument("--binding", action="append", default=[],
                    help="gin binding appended to model.gin, e.g. 'GROUP_SIZE = 2048'")
  up = commands.add_parser("to_t5x", help="moe_jax checkpoint -> t5x checkpoint")
  up.add_argument("--moe_jax_path", required=True,
                  help="moe_jax checkpoint_<step> directory, or a model dir (its latest step)")
  up.add_argument("--out", required=True, help="t5x model dir; checkpoint_<step> is created")
  up.add_argument("--names", choices=t5x_checkpoints.NAMES, default="flaxformer",
                  help="flaxformer: for flaxformer's model in t5x; moe_jax: for the t5x bridge")
  up.add_argument("--format", choices=t5x_checkpoints.FORMATS, default="orbax",
                  help="orbax: t5x's default; tensorstore: its legacy Checkpointer's format")
  up.add_argument("--step", type=int, default=None,
                  help="step of the t5x checkpoint (default: the moe_jax checkpoint's)")
  args = parser.parse_args(argv)
  try:
    if args.command == "to_moe_jax":
      to_moe_jax(args)
    else:
      to_t5x(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one line
    parser.exit(2, f"convert_t5x.py {args.command}: error: {e}\n")


if __name__ == "__main__":
  main(sys.argv[1:])
