"""A torchrun worker script for the restart tests: `late_start.py MODULE ARGS...` runs `python -m MODULE ARGS` in
this process, rank 1 of a restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) only after LATE_START_S seconds
(default 3). Ranks of a real job arrive seconds apart; this makes the order the one in which a restarted rank 0
finds the dead attempt's keys in torchrun's store before its live peer has replaced them (pytorch/pytorch#135712)."""

import os
import runpy
import sys
import time

if os.environ.get("RANK") == "1" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
    time.sleep(float(os.environ.get("LATE_START_S", "3")))
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
