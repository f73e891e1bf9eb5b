"""``python -m himo_fast.demo``: see himo_fast.train.demo."""
from .train.demo import main

if __name__ == "__main__":
    main()
