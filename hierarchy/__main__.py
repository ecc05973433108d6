from hierarchy.commands.cli import main

raise SystemExit(main())
