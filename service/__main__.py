"""`python -m service ...` does what `logitserve ...` does."""

from service.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
