"""`harness run` as a rank of a data parallel run that dies: rank RANK_DIES exits (as a killed process would,
no cleanup) when it starts the cell of method METHOD_DIES. Run by test_distributed under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/rank_dies.py run ...
"""

import os
import sys

from harness import cli
from harness.evaluation.lmms_backend import VTPLlava

configure = VTPLlava.configure


def dying_configure(self, method="none", budget=None):
    name = method if isinstance(method, str) else getattr(method, "name", "")
    if name == os.environ["METHOD_DIES"] and os.environ["RANK"] == os.environ["RANK_DIES"]:
        os._exit(3)
    configure(self, method, budget)


VTPLlava.configure = dying_configure
sys.exit(cli.main(sys.argv[1:]))
