from pillsnap_dali.bench import main

raise SystemExit(main())
