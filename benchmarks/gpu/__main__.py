import sys

from .runner import main

if __name__ == "__main__":  # a spawned worker imports this module too: it must not start a run
    sys.exit(main())
