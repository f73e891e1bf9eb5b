"""``python -m himo_fast``: see himo_fast.train.step_timing."""
from .train.step_timing import main

main()
