"""`python -m pretrain_worker FLAGS...` (tests/ on the path): `electra-triton pretrain FLAGS...` with two test probes,
for runs launched as their own processes (torchrun). Each rank writes OUTPUT/../rank<R>.pt at the end: its full
model state, its next example, and the electra_triton ops of its first step.
With WORKER_FAIL=<rank>:<step>:raise|hang, that rank's step <step> raises (bad data) or never ends (a stuck rank)."""

import os
import sys
import time

from test_pretrain_ddp import _dump_final_state, _record_ops_of_first_step

from electra_triton.pretrain.model import ElectraPretrainer
from electra_triton.pretrain.train import main


def _fail_in_step(rank: int, step: int, how: str) -> None:
    forward, calls = ElectraPretrainer.forward, []

    def failing_forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            if how == "hang":
                time.sleep(3600)
            raise ValueError(f"bad data on rank {rank} in step {step}")
        return forward(self, *args, **kwargs)

    ElectraPretrainer.forward = failing_forward


if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    ran: set[str] = set()
    _record_ops_of_first_step(ran)
    _dump_final_state(rank, ran)
    if os.environ.get("WORKER_FAIL"):
        failing_rank, step, how = os.environ["WORKER_FAIL"].split(":")
        if int(failing_rank) == rank:
            _fail_in_step(rank, int(step), how)
    sys.exit(main(sys.argv[1:]))
