from capacitor_trio.cli import main

raise SystemExit(main())
