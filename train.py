#!/usr/bin/env python
"""Train OLMo Hybrid from a clone: ``python train.py --config configs/tiny.yaml --steps 40 --out runs/tiny``.

The same entry point as ``python -m olmo_hybrid_jax.train`` and the ``olmo-hybrid-train`` script (see
``olmo_hybrid_jax/train/__main__.py`` for the options).
"""

import sys

from olmo_hybrid_jax.train.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
