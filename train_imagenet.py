"""Train a (Race-)DiT: ``python train_imagenet.py --config configs/demo.yaml [key=value ...]``.

Also ``accelerate launch train_imagenet.py ...`` and ``torchrun --nproc_per_node N train_imagenet.py ...``.
Thin on purpose: the loop lives in ``racedit/training``; ``--help`` lists every flag.
"""

from racedit.cli.train import cli

if __name__ == "__main__":
    cli()
