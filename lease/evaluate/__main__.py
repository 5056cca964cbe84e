"""`python -m lease.evaluate <protocol> ...`: the evaluation commands without the `lease` entry point."""
from lease.evaluate import main

raise SystemExit(main())
