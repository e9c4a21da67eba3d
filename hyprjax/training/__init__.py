"""Adapter training: data (data.py), the trainable LoRA (lora.py), the jitted step (step.py),
orbax checkpoints (checkpoint.py) and the loop with its output files (trainer.py).

`hyprjax.train(...)` is the `train` function below (the package is named `training` so the
function does not shadow it). It imports the trainer (and orbax) only when called.
"""


def train(model, data, out, **options):
    """Train an adapter: `hyprjax.train("MODEL", "train.jsonl", "out/", steps=100, rank=16, ...)`.

    The options are `hyprjax train`'s (see `hyprjax train --help` and trainer.TrainOptions);
    returns a trainer.TrainResult. Files under `out`: trainer.py's docstring.
    """
    from .trainer import train as run

    return run(model, data, out, **options)
