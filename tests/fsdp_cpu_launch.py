"""`python -m sdxl_fast.distill` under FSDP2 on CPU processes (gloo), for tests only: run it with torchrun and the FSDP_*
environment that `accelerate launch --config_file configs/accelerate/fsdp.yaml` would set.

accelerate enables FSDP only on accelerators (its MULTI_CPU type ignores the FSDP plugin), although torch's
fully_shard works on CPU tensors with gloo. So the process state is first set up as CPU (device cpu, backend
gloo) and then labelled MULTI_GPU, which lets the Accelerator that distill creates turn on FSDP. Nothing in
distill itself knows about this.
"""

import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU

from sdxl_fast.distill.__main__ import main  # noqa: E402

sys.exit(main())
