"""``python -m cubcam.train`` = ``cubcam``."""

from cubcam.train.cli import main

if __name__ == "__main__":
    main()
