from gatesim.cli import main

raise SystemExit(main())
