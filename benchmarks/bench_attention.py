"""The benchmark as a script: same as `python -m fastattn bench [--quick]`."""
import sys

from fastattn.__main__ import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
