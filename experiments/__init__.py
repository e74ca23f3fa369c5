"""Entry points: ``python -m experiments.<name> --config=configs/<recipe>.py --workdir=DIR``."""
