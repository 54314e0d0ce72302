"""`python -m vlmeff ...`: the `vlmeff` command, as launchers start it (`torchrun ... -m vlmeff eval ...`)."""
from .cli import main

if __name__ == "__main__":
    main()
