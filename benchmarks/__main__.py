"""`python -m benchmarks NAME ...` is `lease bench NAME ...` (the GPU machine needs no Prefect for it)."""
from benchmarks.cli import main

raise SystemExit(main())
