"""``python -m gateway``: run the data plane."""

from gateway.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
