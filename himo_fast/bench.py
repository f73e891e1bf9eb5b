"""``python -m himo_fast.bench``: see himo_fast.train.bench."""
from .train.bench import main

if __name__ == "__main__":
    main()
