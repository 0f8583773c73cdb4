from momkit.cli import main

raise SystemExit(main())
