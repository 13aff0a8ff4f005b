"""The registry of training methods (``rl.method``): name -> ``Method`` class.

``none`` is not a method but the absence of one: the generative policy is trained by SFT only
(the arm every in-loop method is measured against).
"""

from __future__ import annotations

from agorasim.errors import UserInputError
from agorasim.rl.blade import Blade
from agorasim.rl.flame import Flame
from agorasim.rl.flexrec import FlexRec
from agorasim.rl.flower import Flower
from agorasim.rl.grpo import GRPO
from agorasim.rl.trainer import Method
from agorasim.rl.ugr import UGR

METHODS: dict[str, type[Method]] = {
    "grpo": GRPO,
    "ugr": UGR,
    "flexrec": FlexRec,
    "flame": Flame,
    "blade": Blade,
    "flower": Flower,
}


def make_method(config) -> Method:
    """The method of ``config.method`` built on the rl config section."""
    if config.method not in METHODS:
        raise UserInputError(f"rl.method: unknown method {config.method!r}; allowed: none, {', '.join(METHODS)}")
    return METHODS[config.method](config)
