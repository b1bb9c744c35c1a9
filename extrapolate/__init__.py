"""ExPO model extrapolation, out of core: `wspo-extrapolate` (see README, DESIGN section 1).

`tensors` reads and writes safetensors checkpoints piece by piece, `lora` reads a PEFT LoRA adapter
as per-weight deltas, `expo` checks the models, plans the output and does the arithmetic, `cli` is
the command line. The package is also the API function: `wspo.extrapolate(RECIPE.yaml?, **keys)`
(see wspo.api and docs/api.md).
"""

from wspo.api import make_callable

from .expo import NonFiniteTensorError, SwallowedStepWarning, alpha_dir_name, extrapolate, make_plan
from .tensors import CheckpointError

__all__ = ["CheckpointError", "NonFiniteTensorError", "SwallowedStepWarning", "alpha_dir_name", "extrapolate", "make_plan"]

make_callable(__name__)
