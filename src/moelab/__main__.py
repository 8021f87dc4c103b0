from moelab.cli.main import main

raise SystemExit(main())
